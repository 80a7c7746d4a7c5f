"""The URL a row asks for, the form that identifies it, and request fingerprints: pure functions,
no I/O. It must never touch the network, and never decode an escape in what is sent.

Two forms of every accepted URL (`parse_url` returns both):

* `url`, what is sent: the row's URL with only the changes a browser makes before sending, as the
  WHATWG URL standard's parser (ada, through `ada_url`) makes them: surrounding C0 controls and
  spaces and any tab or newline dropped, scheme and host in lower case, an IDN host in punycode,
  an IPv4 host in any spelling as a dotted quad ("0x7f.1" -> "127.0.0.1"), an IPv6 host
  compressed, the default port dropped, an empty path as "/", dot segments resolved ("/a/../b" ->
  "/b", also "%2e%2e"), an empty password dropped, and what cannot be sent as written
  percent-encoded (a space as "%20", never "+"; non-ASCII as UTF-8). Beyond a browser, the
  characters RFC 3986 does not allow in a request target (`"<>[\\]^`{|}`) are percent-encoded too,
  the fragment is dropped (a browser never sends it), and so is an empty query ("/?" is "/"):
  aiohttp's URLs (yarl) cannot send one. An escape already present is kept as written, in its
  case, even a stray "%".
* `normalized`, which spellings are one request (the fingerprint's input): the sent form with
  the normalizations RFC 3986 section 6.2.2 allows and no others: percent-encoding hex in upper
  case, escapes of unreserved characters (ALPHA, DIGIT, "-", ".", "_", "~") decoded; and, with
  sort_query, the query's parameters ordered by key. So "/%7Euser" and "/~user" are one request;
  "/a%2Fb" and "/a/b", "?x=a+b" and "?x=a%20b" are two.

A fast path skips the parser for a plain ASCII URL that it would leave as written but for the
case of scheme and host, a default port, an empty path and the fragment (`_parse_plain`); its
result is the parser's, byte for byte (tests/test_urls.py checks, and that it decides most plain
URLs).

Refused (InvalidURL, with the reason): what the WHATWG parser refuses (malformed hosts such as
"[v1.x]" or "[1:2]", ports with signs, spaces or non-ASCII digits), and beyond it: an empty URL,
one longer than 8 KiB of UTF-8 before or after encoding, a scheme other than http/https, a host
that is not a DNS name (labels of letters, digits, "-" and "_", at most 63 and 253 characters) or
an IP address, port 0, lone surrogates. Userinfo is kept (aiohttp sends it as an Authorization
header): a URL may therefore hold a password, which `mask_password` hides wherever a URL is shown.
"""

from __future__ import annotations

import hashlib
import re
import struct

import ada_url

__all__ = [
    "MAX_URL_LENGTH",
    "InvalidURL",
    "fingerprint",
    "mask_password",
    "normalize_url",
    "parse_url",
    "request_url",
]

MAX_URL_LENGTH = 8192  # bytes of UTF-8; longer URLs are refused by most servers anyway

FINGERPRINT_SIZE = 16
_FINGERPRINT_PERSON = b"crawler.req.v1"  # blake2b personalization: a new version never collides
_length = struct.Struct(">Q").pack  # a part's length prefix: 8 bytes, big-endian
_FINGERPRINT_HASHER = hashlib.blake2b(digest_size=FINGERPRINT_SIZE, person=_FINGERPRINT_PERSON)  # only copied
_GET_PART = _length(3) + b"GET"
_NO_BODY_PART = _length(0)

_DEFAULT_PORTS = {"http": "80", "https": "443"}
_C0_AND_SPACE = "".join(map(chr, range(0x21)))  # what the WHATWG parser strips from either end
# A registered name as DNS can resolve it: labels of letters, digits, "-" and "_" (underscores
# occur in real hostnames), an optional trailing dot. The parser has lower-cased and punycoded it.
_HOST_NAME = re.compile(r"[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*\.?")
_DOTTED_QUAD = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")  # the parser's only spelling of IPv4
_SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*):")
# The authority of a URL the parser refused, to say which part was wrong.
_AUTHORITY = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:[/\\]*(?:[^/\\?#]*@)?([^/\\?#]*)")
# What RFC 3986 does not allow in a path or query and the WHATWG parser leaves as written.
_NOT_IN_TARGET = re.compile(r'["<>\[\\\]^`{|}]')
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")

# The fast path's grammar: what the parser leaves as written, and RFC 3986 allows (unreserved,
# sub-delimiters, ":", "@", "/", and "?" in a query; "'" is escaped in a query by the parser).
_PATH_CHARS = r"A-Za-z0-9\-._~!$&'()*+,;=:@/"
_QUERY_CHARS = r"A-Za-z0-9\-._~!$&()*+,;=:@/?"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_PLAIN_URL = re.compile(
    # the origin: http or https in any case, and a host, in any case: a dotted quad as the parser
    # spells it, or a DNS name whose last label does not start with a digit (the parser reads
    # "a.1" or "a.0x1" as an IPv4 address)
    rf"(?P<origin>[Hh][Tt][Tt][Pp](?P<secure>[Ss])?://(?:{_OCTET}(?:\.{_OCTET}){{3}}"
    r"|(?:[A-Za-z0-9_-]{1,63}\.)*[A-Za-z_-][A-Za-z0-9_-]{0,62}\.?))"
    r"(?::(?P<port>[1-9][0-9]{0,4}))?"
    rf"(?P<path>/[{_PATH_CHARS}%]*)?(?P<query>\?[{_QUERY_CHARS}%]*)?"  # a "%" is checked below
    r"(?:#.*)?"  # a fragment, whatever it holds, is dropped
)
_DOT_SEGMENT = re.compile(r"/(?:\.|%2[eE]){1,2}(?:/|$)")  # the parser resolves these
_STRAY_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")  # a "%" that starts no escape


class InvalidURL(ValueError):
    """A URL that cannot be a request; str(error) is the reason, e.g. "unsupported scheme 'ftp'"."""


def parse_url(raw: str, *, sort_query: bool = False) -> tuple[str, str]:
    """(url, normalized): the URL to send for a row's URL and its normalized form, or InvalidURL
    with the reason. A pair, not a NamedTuple: made once per input row, where building a
    NamedTuple costs as much as a tenth of the fast path (callgrind).

    Both are idempotent: parsing `url` again gives `url`, and normalizing `normalized` again gives
    `normalized`. With sort_query, query parameters of the normalized form are ordered by their
    (normalized) key, stably, and empty ones ("a=1&&b") are dropped; the sent form keeps them.
    """
    # The fast path needs no stripping first: it declines a URL with a space or control character
    # at its start, and one at its end can only be in a fragment, which is dropped.
    if raw.isascii() and (sent := _parse_plain(raw)) is not None:
        if "%" not in sent and not (sort_query and "?" in sent):
            return sent, sent
        return sent, _normalized(sent, sort_query)
    sent = _parse_with_ada(raw.strip(_C0_AND_SPACE))
    return sent, _normalized(sent, sort_query)


def request_url(raw: str) -> str:
    """The URL sent for a row's URL (see parse_url)."""
    return parse_url(raw)[0]


def normalize_url(raw: str, *, sort_query: bool = False) -> str:
    """The normalized form of a row's URL (see parse_url)."""
    return parse_url(raw, sort_query=sort_query)[1]


def _parse_with_ada(text: str) -> str:
    """The slow path, for every URL the fast path declines: the WHATWG parser parses and
    re-serializes, this module validates."""
    if not text:
        raise InvalidURL("empty URL")
    _check_length(text)
    try:
        href = ada_url.normalize_url(text)
    except ValueError:
        raise InvalidURL(_why_refused(text)) from None
    href = href.partition("#")[0]  # the fragment is never sent; a "#" elsewhere is escaped by the parser
    if href[-1] == "?" and href.index("?") == len(href) - 1:
        href = href[:-1]  # an empty query: yarl drops it, so it cannot be sent
    scheme, _, rest = href.partition("://")
    if scheme not in _DEFAULT_PORTS:
        raise InvalidURL(_why_refused(text))
    slash = rest.find("/")  # the path always starts with "/" for http(s); nothing before it holds one
    authority, target = rest[:slash], rest[slash:]
    host_port = authority.rpartition("@")[2]
    if host_port.startswith("["):
        host, port = host_port[: host_port.index("]") + 1], host_port[host_port.index("]") + 2 :]
    else:
        host, _, port = host_port.partition(":")
    if not host:
        raise InvalidURL("URL has no host")
    if not host.startswith("["):
        _check_host(host)
    if port == "0":
        raise InvalidURL("invalid port")
    if _NOT_IN_TARGET.search(target):
        target = _NOT_IN_TARGET.sub(lambda m: f"%{ord(m.group()):02X}", target)
        href = f"{scheme}://{authority}{target}"
    _check_length(href)  # escaping can grow a URL past the limit; refusing keeps idempotence
    return href


def _why_refused(text: str) -> str:
    """The reason for a URL the parser refused (it says only that it did), or that is not http(s)."""
    scheme = _SCHEME.match(text)
    if scheme is None or "/" in scheme.group(1):
        return "URL has no scheme; expected http:// or https://"
    name = scheme.group(1).lower()
    if name not in _DEFAULT_PORTS:
        return f"unsupported scheme {name!r}"
    authority = _AUTHORITY.match(text)
    host_port = authority.group(1) if authority else ""
    if not host_port:
        return "URL has no host"
    if host_port.startswith("["):
        end = host_port.find("]")
        if end < 0 or (host_port[end + 1 :] and not host_port[end + 1 :].startswith(":")):
            return f"invalid IPv6 address {host_port!r}"
        port = host_port[end + 2 :]
        if port and not _is_port(port):
            return "invalid port"
        return f"invalid IPv6 address {host_port[: end + 1]!r}"
    host, colon, port = host_port.partition(":")
    if colon and port and not _is_port(port):
        return "invalid port"
    return f"invalid host {host!r}"


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and int(text) <= 65535


def _parse_plain(text: str) -> str | None:
    """What _parse_with_ada gives, without the parser, for a URL whose every part is already as
    the parser spells it but for the case of scheme and host, a default port, an empty path and a
    fragment; None for any other URL (then the slow path decides, and gives every reason for
    refusing one)."""
    # Shorter than the limit, so that the result, at most one character longer ("/"), is not over it.
    if len(text) >= MAX_URL_LENGTH or (match := _PLAIN_URL.fullmatch(text)) is None:
        return None
    origin, secure, port, path, query = match.groups()
    if len(origin) > len("http://") + 253 and len(origin.partition("://")[2].rstrip(".")) > 253:
        return None  # a host name too long for DNS
    if port is not None:
        if port == _DEFAULT_PORTS["https" if secure else "http"]:  # read only when a port is given
            port = None
        elif len(port) == 5 and int(port) > 65535:
            return None
    if path is None:
        path = "/"
    elif ("." in path or "%" in path) and _DOT_SEGMENT.search(path):
        return None
    if "%" in text and _STRAY_PERCENT.search(text, len(origin)):
        return None
    if query == "?":
        query = None  # an empty query: yarl drops it, so it cannot be sent
    return f"{origin.lower()}{'' if port is None else ':' + port}{path}{query or ''}"


def _normalized(sent: str, sort_query: bool) -> str:
    """The normalized form of a sent URL: escapes' hex in upper case, unreserved ones decoded
    (RFC 3986 6.2.2.1-2; only userinfo, path and query can hold an escape), the query sorted on
    request. The parser has done the rest of 6.2.2 and 6.2.3 (case, dot segments, default port)."""
    if "%" in sent:
        sent = _ESCAPE.sub(_normal_escape, sent)
    if sort_query:
        base, mark, query = sent.partition("?")
        if query:
            sent = f"{base}?{_sorted_query(query)}"
    return sent


def _normal_escape(match: re.Match) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else match.group().upper()


def fingerprint(method: str, url: str, body: bytes | None = None) -> bytes:
    """Return the 16-byte identity of a request: blake2b of method, normalized URL and body.

    Each part is length-prefixed, so no choice of parts can shift a boundary and collide with
    another. No body and an empty body are the same request. `url` must already be normalized.
    """
    method_part = _GET_PART if method == "GET" else _part(method.upper().encode("utf-8"))
    url_bytes = url.encode("utf-8")
    # One update of a copy of a hasher made once: cheaper than parsing blake2b's keyword
    # arguments per request (about half the cost of a fingerprint) or updating part by part.
    hasher = _FINGERPRINT_HASHER.copy()
    hasher.update(b"".join((method_part, _length(len(url_bytes)), url_bytes, _part(body) if body else _NO_BODY_PART)))
    return hasher.digest()


def _part(data: bytes) -> bytes:
    return _length(len(data)) + data


def _check_length(text: str) -> None:
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate, e.g. an undecodable byte kept by surrogateescape
        raise InvalidURL("URL is not valid UTF-8") from None
    if size > MAX_URL_LENGTH:
        raise InvalidURL(f"URL longer than 8 KiB ({size} bytes)")


def _check_host(host: str) -> None:
    if _DOTTED_QUAD.fullmatch(host):
        return  # the parser has read it as an IPv4 address and checked it
    if len(host.rstrip(".")) > 253 or _HOST_NAME.fullmatch(host) is None:
        raise InvalidURL(f"invalid host {host!r}")


def _sorted_query(query: str) -> str:
    pairs = [pair for pair in query.split("&") if pair]
    pairs.sort(key=lambda pair: pair.partition("=")[0])  # list.sort is stable
    return "&".join(pairs)


# user:password@ at the start of a URL's authority; the password runs to the last "@" before the
# path, as the WHATWG parser and urllib read it, so a password with a raw "@" is masked whole.
_PASSWORD = re.compile(r"(?i)([a-z][a-z0-9+.\-]*:[/\\]*[^:/\\?#@\s]*:)([^/\\?#\s]+)@")


def mask_password(text: str | None) -> str | None:
    """`text` (a URL, or a row's text) with a URL's password replaced by ***; None stays None."""
    if text is None or "@" not in text:
        return text
    return _PASSWORD.sub(r"\1***@", text)
