"""URL validation, normalization and request fingerprints: pure functions, no I/O.

A URL is parsed and re-serialized by yarl (never by hand), except for a URL that yarl would leave
as written, which a fast path only checks; this module decides what is accepted and which
spellings of one request share a fingerprint. It must never touch the network.

What `normalize_url` does, and who does it:

* yarl (`URL(raw)`, i.e. requoting): lower-cases the scheme and a registered host, encodes an IDN
  host to punycode (IDNA 2008 / UTS 46, so "faß.de" -> "xn--fa-hia.de"), compresses IPv6 literals,
  normalizes percent-encoding in userinfo, path and query (unreserved characters decoded, e.g.
  "%7e" -> "~" and "%41" -> "A"; other escapes upper-cased, "%2f" -> "%2F"; characters that must be
  escaped are escaped, "a b" -> "a%20b"; a stray "%" becomes "%25"), removes dot segments
  ("/a/../b" -> "/b", also "%2e%2e"), drops tab/CR/LF inside the URL and drops an empty query ("?").
  It keeps "+" and "%20" in a query apart (they differ outside form encoding) and keeps "%2F" in a
  path encoded (it is not a separator).
* a fast path here skips yarl for the common case, a plain ASCII http(s) URL that yarl would leave
  as it is but for the case of scheme and host, a default port, an empty path and a fragment (see
  `_normalize_plain`); its result is the slow path's, byte for byte (tests/test_urls.py checks).
* this module adds: stripping surrounding whitespace; rejecting what cannot be fetched (empty,
  longer than 8 KiB in UTF-8 before *and* after normalization, not http/https, no host, a host that
  is not a DNS name or IP literal, port outside 1-65535, lone surrogates); dropping the default port
  and the fragment; "/" for an empty path; dropping an empty userinfo or password
  ("http://u:@h/" is "http://u@h/"); and, on request, sorting the query by key.

Userinfo ("user:password@") is kept, because it changes the request (it becomes an Authorization
header); it is therefore part of the fingerprint, and a normalized URL may contain a secret, so
callers must mask it before logging. A trailing dot in a host ("example.com.") is kept too: it is a
different name for TLS and for the Host header.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import string
import struct

from yarl import URL

__all__ = ["MAX_URL_LENGTH", "InvalidURL", "fingerprint", "normalize_url"]

MAX_URL_LENGTH = 8192  # bytes of UTF-8; longer URLs are refused by most servers anyway

FINGERPRINT_SIZE = 16
_FINGERPRINT_PERSON = b"crawler.req.v1"  # blake2b personalization: a new version never collides
_length = struct.Struct(">Q").pack  # a part's length prefix: 8 bytes, big-endian
_FINGERPRINT_HASHER = hashlib.blake2b(digest_size=FINGERPRINT_SIZE, person=_FINGERPRINT_PERSON)  # only copied
_GET_PART = _length(3) + b"GET"
_NO_BODY_PART = _length(0)

_DEFAULT_PORTS = {"http": 80, "https": 443}
# A registered name as DNS can resolve it: labels of letters, digits, "-" and "_" (underscores
# occur in real hostnames), an optional trailing dot. yarl has already lower-cased and punycoded it.
_HOST_NAME = re.compile(r"[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*\.?")
# A last label that is a number makes the host an IPv4 address to many resolvers ("0x7f.1" is
# 127.0.0.1 to inet_aton); such a host must be a plain dotted quad or it is refused.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")

# The fast path's grammar: what yarl's requoting leaves as written (yarl's _quoting: "ALLOWED" is
# unreserved and the sub-delimiters other than + & = ;). Anything else takes the slow path.
_YARL_ALLOWED = string.ascii_letters + string.digits + "-._~!$'()*,"
_PATH_KEPT = _YARL_ALLOWED + "+&=;@:/"  # path characters left as they are
_QUERY_KEPT = _YARL_ALLOWED + "?/:@=+&;"
_PATH_DECODED = _YARL_ALLOWED + "&=;@:"  # "%XX" of these becomes the character; other escapes stay
_QUERY_DECODED = _YARL_ALLOWED + "?/:@"


def _kept_escapes(decoded: str) -> str:
    """A pattern for the escapes yarl keeps as written: "%" and two upper-case hex digits of a byte
    it does not decode (a lower-case digit is upper-cased, so it is not kept)."""
    hexdigits = "0123456789ABCDEF"
    groups = []
    for high in hexdigits:
        lows = "".join(low for low in hexdigits if chr(int(high + low, 16)) not in decoded)
        if lows:
            groups.append(f"{high}[{lows}]")
    return "(?:" + "|".join(groups) + ")"


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_PLAIN_URL = re.compile(
    # the origin: http or https in any case, and a host, in any case: a dotted quad as ipaddress
    # spells it, or a name as _HOST_NAME has it whose last label does not start with a digit (such
    # a name may be an IPv4 address in another spelling, see _check_host)
    rf"(?P<origin>[Hh][Tt][Tt][Pp](?P<secure>[Ss])?://(?:{_OCTET}(?:\.{_OCTET}){{3}}"
    r"|(?:[A-Za-z0-9_-]{1,63}\.)*[A-Za-z_-][A-Za-z0-9_-]{0,62}\.?))"
    r"(?::(?P<port>[1-9][0-9]{0,4}))?"
    rf"(?P<path>/[{re.escape(_PATH_KEPT)}%]*)?(?:\?(?P<query>[{re.escape(_QUERY_KEPT)}%]*))?"
    r"(?:#.*)?"  # a fragment, whatever it holds, is dropped
)
_PATH_ESCAPE_CHANGES = re.compile(f"%(?!{_kept_escapes(_PATH_DECODED)})")
_QUERY_ESCAPE_CHANGES = re.compile(f"%(?!{_kept_escapes(_QUERY_DECODED)})")
_DOT_SEGMENT = re.compile(r"/\.\.?(?:/|$)")  # yarl removes these


class InvalidURL(ValueError):
    """A URL that cannot be a request; str(error) is the reason, e.g. "unsupported scheme 'ftp'"."""


def normalize_url(raw: str, *, sort_query: bool = False) -> str:
    """Return the canonical spelling of an http(s) URL, or raise InvalidURL with the reason.

    Idempotent: normalize_url(normalize_url(x)) == normalize_url(x). With sort_query, query
    parameters are ordered by their (normalized, encoded) key, stably, and empty ones ("a=1&&b")
    are dropped; without it the query is kept as written.
    """
    text = raw.strip()
    if text.isascii() and (plain := _normalize_plain(text, sort_query)) is not None:
        return plain
    return _normalize_with_yarl(text, sort_query)


def _normalize_with_yarl(text: str, sort_query: bool) -> str:
    """The slow path, for every URL the fast path declines: yarl parses and re-serializes, this
    module validates."""
    if not text:
        raise InvalidURL("empty URL")
    _check_length(text)
    try:
        url = URL(text)
        scheme, host, port = url.scheme, url.raw_host, url.explicit_port
    except Exception as exc:  # noqa: BLE001 - hostile input must not crash the job on a yarl bug
        if str(exc).startswith(("Port out of range", "Invalid URL: port")):  # yarl's wording
            raise InvalidURL("invalid port") from None
        raise InvalidURL(f"unparsable URL: {exc}") from None
    if not scheme:
        raise InvalidURL("URL has no scheme; expected http:// or https://")
    if scheme not in _DEFAULT_PORTS:
        raise InvalidURL(f"unsupported scheme {scheme!r}")
    if not host:
        raise InvalidURL("URL has no host")
    _check_host(host)
    if port is not None and not 1 <= port <= 65535:
        raise InvalidURL("invalid port")
    try:
        result = str(_rebuild(url, scheme, port, sort_query))
    except Exception as exc:  # noqa: BLE001 - as above
        raise InvalidURL(f"unparsable URL: {exc}") from None
    _check_length(result)  # escaping can grow a URL past the limit; refusing keeps idempotence
    return result


def _normalize_plain(text: str, sort_query: bool) -> str | None:
    """normalize_url without yarl for a URL whose every part is already as yarl would spell it,
    but for the case of scheme and host, a default port, an empty path and a fragment; None for
    any other URL (then the slow path decides, and gives every reason for refusing one)."""
    # Shorter than the limit, so that the result, at most one character longer ("/"), is not over it.
    if len(text) >= MAX_URL_LENGTH or (match := _PLAIN_URL.fullmatch(text)) is None:
        return None
    origin, secure, port, path, query = match.groups()
    if len(origin) > len("http://") + 253 and len(origin.partition("://")[2].rstrip(".")) > 253:
        return None  # a host name too long for DNS
    if port is not None:
        if port == str(_DEFAULT_PORTS["https" if secure else "http"]):  # read only when a port is given
            port = None
        elif len(port) == 5 and int(port) > 65535:
            return None
    if path is None:
        path = "/"
    elif ("." in path and _DOT_SEGMENT.search(path)) or ("%" in path and _PATH_ESCAPE_CHANGES.search(path)):
        return None
    if query and "%" in query and _QUERY_ESCAPE_CHANGES.search(query):
        return None
    if sort_query and query:
        query = _sorted_query(query)
    return f"{origin.lower()}{'' if port is None else ':' + port}{path}{'?' + query if query else ''}"


def _rebuild(url: URL, scheme: str, port: int | None, sort_query: bool) -> URL:
    query = url.raw_query_string
    if sort_query and query:
        query = _sorted_query(query)
    user, password = url.raw_user or None, url.raw_password or None
    return URL.build(
        scheme=scheme,
        user=user if user or password else None,
        password=password,
        host=url.host_subcomponent or "",  # host_subcomponent brackets an IPv6 literal
        port=None if port == _DEFAULT_PORTS[scheme] else port,
        path=url.raw_path or "/",
        query_string=query,
        encoded=True,
    )


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
    if ":" in host:  # an IPv6 literal; yarl has validated and compressed it
        return
    name = host.rstrip(".")
    valid = len(name) <= 253 and _HOST_NAME.fullmatch(host) is not None
    if valid and _NUMERIC_LABEL.fullmatch(name.rsplit(".", 1)[-1]):
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            valid = False
    if not valid:
        raise InvalidURL(f"invalid host {host!r}")


def _sorted_query(query: str) -> str:
    pairs = [pair for pair in query.split("&") if pair]
    pairs.sort(key=lambda pair: pair.partition("=")[0])  # list.sort is stable
    return "&".join(pairs)
