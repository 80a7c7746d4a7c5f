"""URL normalization and request fingerprints: unit tests and properties."""

from __future__ import annotations

import hashlib
import re

import pytest
import yarl
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from crawler.urls import MAX_URL_LENGTH, InvalidURL, fingerprint, normalize_url

# --- normalization, case by case ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("HTTP://ExAmple.COM/Path", "http://example.com/Path"),  # the path keeps its case
        ("  http://example.com/a \n", "http://example.com/a"),
        ("http://example.com", "http://example.com/"),
        ("http://example.com?q=1", "http://example.com/?q=1"),
        ("http://example.com:80/", "http://example.com/"),
        ("https://example.com:443/", "https://example.com/"),
        ("http://example.com:443/", "http://example.com:443/"),
        ("https://example.com:80/", "https://example.com:80/"),
        ("http://example.com:8080/", "http://example.com:8080/"),
        ("http://example.com/a#frag", "http://example.com/a"),
        ("http://example.com/%7euser/%7Eme", "http://example.com/~user/~me"),
        ("http://example.com/%41%62%2d%5f%2e", "http://example.com/Ab-_."),
        ("http://example.com/a%2fb%3a", "http://example.com/a%2Fb:"),
        ("http://example.com/%e2%82%ac", "http://example.com/%E2%82%AC"),
        ("http://example.com/a b", "http://example.com/a%20b"),
        ("http://example.com/50%", "http://example.com/50%25"),
        ("http://example.com/€", "http://example.com/%E2%82%AC"),
        ("http://example.com/a/./b/../c", "http://example.com/a/c"),
        ("http://example.com/?q=%7e&r=a+b&s=a%20b", "http://example.com/?q=~&r=a+b&s=a%20b"),
        ("http://example.com/?", "http://example.com/"),
        ("http://example.com/?b=2&a=1&b=1", "http://example.com/?b=2&a=1&b=1"),
        ("http://münchen.de/", "http://xn--mnchen-3ya.de/"),
        ("http://MÜNCHEN.de/", "http://xn--mnchen-3ya.de/"),
        ("http://XN--MNCHEN-3YA.DE/", "http://xn--mnchen-3ya.de/"),
        ("http://例え.テスト/", "http://xn--r8jz45g.xn--zckzah/"),
        ("http://[::FFFF:1.2.3.4]:8080/", "http://[::ffff:102:304]:8080/"),
        ("http://[::1]:80/", "http://[::1]/"),
        ("http://10.0.0.1/", "http://10.0.0.1/"),
        ("http://user:pa%73s@Example.com/", "http://user:pass@example.com/"),
        ("http://:@example.com/", "http://example.com/"),
        ("http://host_name.example.com/", "http://host_name.example.com/"),
        ("http://example.com./", "http://example.com./"),
    ],
)
def test_normalize_url_gives_the_canonical_spelling(raw: str, expected: str) -> None:
    assert normalize_url(raw) == expected


def test_sort_query_orders_parameters_by_key_and_keeps_equal_keys_in_order() -> None:
    raw = "http://example.com/?b=2&a=1&c&b=1&&a=0"
    assert normalize_url(raw) == "http://example.com/?b=2&a=1&c&b=1&&a=0"
    assert normalize_url(raw, sort_query=True) == "http://example.com/?a=1&a=0&b=2&b=1&c"


def test_sort_query_compares_keys_after_percent_normalization() -> None:
    spelled = normalize_url("http://e.com/?%62=1&a=2", sort_query=True)
    assert spelled == normalize_url("http://e.com/?a=2&b=1", sort_query=True)


def test_a_url_of_exactly_the_limit_is_accepted() -> None:
    base = "http://example.com/"
    url = base + "a" * (MAX_URL_LENGTH - len(base))
    assert normalize_url(url) == url


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty URL"),
        ("   \t\n", "empty URL"),
        ("http://example.com/" + "a" * MAX_URL_LENGTH, "URL longer than 8 KiB (8211 bytes)"),
        ("http://example.com/" + "é" * 4087, "URL longer than 8 KiB (8193 bytes)"),  # UTF-8 bytes
        ("http://example.com/" + "é" * 2800, "URL longer than 8 KiB (16819 bytes)"),  # escaping
        ("ftp://example.com/", "unsupported scheme 'ftp'"),
        ("javascript:alert(1)", "unsupported scheme 'javascript'"),
        ("file:///etc/passwd", "unsupported scheme 'file'"),
        ("example.com/path", "URL has no scheme; expected http:// or https://"),
        ("//example.com/path", "URL has no scheme; expected http:// or https://"),
        ("http:///path", "URL has no host"),
        ("http://", "URL has no host"),
        ("http:example.com", "URL has no host"),
        ("http://example.com:0/", "invalid port"),
        ("http://example.com:65536/", "invalid port"),
        ("http://example.com:http/", "invalid port"),
        ("http://exa mple.com/", "invalid host 'exa mple.com'"),
        ("http://exa%41mple.com/", "invalid host 'exa%41mple.com'"),
        ("http://a..b.com/", "invalid host 'a..b.com'"),
        ("http://0x7f.1/", "invalid host '0x7f.1'"),
        ("http://256.0.0.1/", "invalid host '256.0.0.1'"),
        ("http://example.com/\udcff", "URL is not valid UTF-8"),
    ],
)
def test_normalize_url_refuses_what_cannot_be_fetched(raw: str, reason: str) -> None:
    with pytest.raises(InvalidURL) as caught:
        normalize_url(raw)
    assert str(caught.value) == reason


@pytest.mark.parametrize("raw", ["http://[::1/", "http://[nonsense]/", "http://a\u200b.com/"])
def test_unparsable_urls_say_why(raw: str) -> None:
    with pytest.raises(InvalidURL, match=r"^unparsable URL: "):
        normalize_url(raw)


def test_invalid_url_is_a_value_error() -> None:
    assert issubclass(InvalidURL, ValueError)


# --- fingerprints ---------------------------------------------------------------------------


def test_fingerprint_is_16_bytes_and_stable() -> None:
    digest = fingerprint("GET", "http://example.com/")
    assert len(digest) == 16
    assert digest == fingerprint("get", "http://example.com/", None)
    assert digest == fingerprint("GET", "http://example.com/", b"")  # no body == empty body


def test_fingerprint_parts_cannot_shift_across_boundaries() -> None:
    assert fingerprint("GET", "http://a/", b"x") != fingerprint("GETh", "ttp://a/", b"x")
    assert fingerprint("GET", "http://a/b", b"c") != fingerprint("GET", "http://a/", b"bc")
    assert fingerprint("POST", "http://a/", b"") != fingerprint("POST", "http://a/", b"\x00")


# --- properties -------------------------------------------------------------------------------

_LABEL = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12)
_NAME_HOST = st.builds(
    lambda labels, tld: ".".join([*labels, tld]),
    st.lists(_LABEL, min_size=1, max_size=3),
    st.sampled_from(["com", "org", "example", "test"]),
)
_IDN_HOSTS = [
    ("münchen.de", "xn--mnchen-3ya.de"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
    ("παράδειγμα.δοκιμή", "xn--hxajbheg2az3al.xn--jxalpdlp"),
]
_UNRESERVED = "abcXYZ019-._~"
_PATH_CHARS = _UNRESERVED + "!$&'()*+,;=:@é€ "
# Whitespace at either end of a URL is stripped on input, so a segment neither starts nor ends
# with a space: "http://h/ #f" and "http://h/ " would otherwise rightly differ.
_SEGMENT = st.text(_PATH_CHARS, max_size=8).filter(lambda s: s not in (".", "..") and s == s.strip())
_QUERY_WORD = st.text(_UNRESERVED + "é+", min_size=1, max_size=6)


@st.composite
def http_urls(draw: st.DrawFn) -> dict:
    """The parts of a fetchable URL, so that tests can spell it in several equivalent ways."""
    return {
        "scheme": draw(st.sampled_from(["http", "https"])),
        "host": draw(_NAME_HOST),
        "port": draw(st.none() | st.integers(1, 65535)),
        "path": draw(st.lists(_SEGMENT, max_size=4)),
        "query": draw(st.lists(st.tuples(_QUERY_WORD, _QUERY_WORD), max_size=4)),
    }


def spell(
    parts: dict,
    *,
    upper: bool = False,
    default_port: bool = False,
    fragment: str = "",
    escape: bool = False,
    host: str | None = None,
) -> str:
    """One spelling of a URL; every combination of the flags names the same request."""
    scheme, host = parts["scheme"], host or parts["host"]
    port = parts["port"]
    if port is None and default_port:
        port = {"http": 80, "https": 443}[scheme]
    if upper:
        scheme, host = scheme.upper(), host.upper()
    path = "/" + "/".join(parts["path"])
    query = "&".join(f"{key}={value}" for key, value in parts["query"])
    if escape:  # percent-encode every unreserved character, in lower-case hex
        path = "".join(f"%{ord(c):02x}" if c in _UNRESERVED else c for c in path)
        query = "".join(f"%{ord(c):02x}" if c in _UNRESERVED else c for c in query)
    url = f"{scheme}://{host}{'' if port is None else f':{port}'}{path}"
    return url + (f"?{query}" if query else "") + (f"#{fragment}" if fragment else "")


@given(http_urls(), st.booleans(), st.booleans(), st.text(_PATH_CHARS), st.booleans())
def test_equivalent_spellings_share_a_fingerprint(
    parts: dict, upper: bool, default_port: bool, fragment: str, escape: bool
) -> None:
    plain = normalize_url(spell(parts))
    other = spell(parts, upper=upper, default_port=default_port, fragment=fragment, escape=escape)
    assert normalize_url(other) == plain
    assert fingerprint("GET", normalize_url(other)) == fingerprint("GET", plain)


@given(http_urls(), st.sampled_from(_IDN_HOSTS))
def test_an_idn_host_and_its_punycode_share_a_fingerprint(parts: dict, hosts: tuple) -> None:
    unicode_host, punycode = hosts
    by_unicode = normalize_url(spell(parts, host=unicode_host))
    assert by_unicode == normalize_url(spell(parts, host=punycode, upper=True))
    by_punycode = normalize_url(spell(parts, host=punycode))
    assert fingerprint("GET", by_unicode) == fingerprint("GET", by_punycode)


@given(http_urls(), st.booleans())
def test_normalizing_a_url_twice_changes_nothing(parts: dict, sort_query: bool) -> None:
    once = normalize_url(spell(parts, fragment="x", escape=True), sort_query=sort_query)
    assert normalize_url(once, sort_query=sort_query) == once


_HEADS = st.sampled_from(["http://", "HTTPS://", "http://h.com", "http://[::1]", ""])


@given(st.text(max_size=60), _HEADS, st.booleans())
@example("/%2e%2e/%", "http://h.com", False)
@example("?b&a=%zz#x", "http://h.com", True)
@example("@", "http://[::1]", False)  # yarl raises IndexError here; it must become InvalidURL
def test_normalizing_any_text_twice_changes_nothing(tail: str, head: str, sort_query: bool) -> None:
    try:
        once = normalize_url(head + tail, sort_query=sort_query)
    except InvalidURL:
        return
    assert normalize_url(once, sort_query=sort_query) == once
    assert str(yarl.URL(once)) == once  # what aiohttp would make of it (see the test above)


@given(http_urls(), st.booleans())
def test_aiohttp_asks_for_a_normalized_url_as_written(parts: dict, sort_query: bool) -> None:
    # The Fetcher reports such a URL as the final one when there was no redirect, without asking
    # aiohttp's yarl.URL for its text: the two must be the same.
    once = normalize_url(spell(parts, fragment="x", escape=True), sort_query=sort_query)
    assert str(yarl.URL(once)) == once


@given(http_urls(), http_urls())
def test_different_urls_have_different_fingerprints(first: dict, second: dict) -> None:
    a, b = normalize_url(spell(first)), normalize_url(spell(second))
    assume(a != b)
    assert fingerprint("GET", a) != fingerprint("GET", b)


_METHODS = st.sampled_from(["GET", "POST", "PUT", "HEAD", "DELETE"])
_BODIES = st.none() | st.binary(max_size=16)
_URLS = st.text(st.characters(blacklist_categories=["Cs"]), max_size=20)  # what UTF-8 can encode


@given(_METHODS, _URLS, _BODIES, _METHODS, _URLS, _BODIES)
def test_requests_differing_in_method_url_or_body_have_different_fingerprints(
    method_a: str, url_a: str, body_a: bytes | None, method_b: str, url_b: str, body_b: bytes | None
) -> None:
    assume((method_a, url_a, body_a or b"") != (method_b, url_b, body_b or b""))
    assert fingerprint(method_a, url_a, body_a) != fingerprint(method_b, url_b, body_b)


# --- the fast path: byte for byte what the slow path (yarl) gives ---------------------------

from crawler.urls import _normalize_plain, _normalize_with_yarl  # noqa: E402 - private, on purpose


def test_fingerprints_stay_what_they_were() -> None:
    """Fingerprints are stored: a later version must compute the same bytes for the same request."""
    assert fingerprint("GET", "http://example.com/").hex() == "ee2c15b7c55d9f7f57ae8678a0b69176"
    assert fingerprint("post", "https://example.com/a?b=1", b"x=1").hex() == "01e25dab5d4a619d3b3f2a40ae4fc41f"


@given(_METHODS | st.text(st.characters(blacklist_categories=["Cs"]), max_size=8), _URLS, _BODIES)
@example("GET", "http://example.com/", None)
@example("get", "http://example.com/", b"")
def test_fingerprint_is_blake2b_of_the_length_prefixed_parts(method: str, url: str, body: bytes | None) -> None:
    parts = (method.upper().encode("utf-8"), url.encode("utf-8"), body or b"")
    message = b"".join(len(part).to_bytes(8, "big") + part for part in parts)
    expected = hashlib.blake2b(message, digest_size=16, person=b"crawler.req.v1").digest()
    assert fingerprint(method, url, body) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("http://127.0.0.1:8080/ok/1", "http://127.0.0.1:8080/ok/1"),
        ("HTTPS://Example.COM:443", "https://example.com/"),
        ("http://example.com?b=2&a=1", "http://example.com/?b=2&a=1"),
        ("https://a.example/%E2%82%AC/%2F?q=%3D&r=a+b", "https://a.example/%E2%82%AC/%2F?q=%3D&r=a+b"),
    ],
)
def test_plain_urls_take_the_fast_path(raw: str, expected: str) -> None:
    assert _normalize_plain(raw, False) == expected == _normalize_with_yarl(raw, False)


def _assert_fast_path_agrees(text: str, sort_query: bool) -> bool:
    """The fast path either declines (None) or gives exactly the slow path's result."""
    fast = _normalize_plain(text, sort_query)
    if fast is None:
        return False
    assert fast == _normalize_with_yarl(text, sort_query), text
    return True


_PROBES = [chr(c) for c in range(128)] + [f"%{b:02X}" for b in range(256)] + [f"%{b:02x}" for b in range(256)]
_PROBE_PLACES = [
    "http://h.com/a{}b", "http://h.com/{}", "http://h.com/?a{}b", "http://h.com/a?{}", "http://h.com/?{}=1&{}",
    "http://h{}.com/", "http://{}h.com/", "http://h.com{}", "http://h.com:8{}/", "http://1.2.3.{}/",
    "h{}tp://h.com/", "http://h.com/a#{}", "http://h.com#{}", "http://h.com/?a#{}b",
]


@pytest.mark.parametrize("place", _PROBE_PLACES)
def test_fast_path_agrees_for_every_ascii_character_and_escape(place: str) -> None:
    taken = 0
    for probe in _PROBES:
        text = place.replace("{}", probe).strip()
        for sort_query in (False, True):
            taken += _assert_fast_path_agrees(text, sort_query)
    assert taken  # each place has characters the fast path accepts


_FAST_HEAD_TEXTS = [
    "http://", "https://", "HTTP://", "ftp://", "http://example.com", "http://Ex_a-1.COM.", "http://h:80",
    "https://h:443", "http://h:0", "http://h:65536", "http://h:080", "http://127.0.0.1:8080", "http://01.2.3.4",
    "http://256.1.1.1", "http://a.123", "http://a.0x1f", "http://" + "a" * 63 + ".b", "http://" + "a" * 64 + ".b",
    "http://" + ".".join(["a" * 63] * 4), "http://" + ".".join(["a" * 63] * 4) + ".",
    "http://" + "a" * 62 + ".a" * 96, "https://" + "a" * 62 + ".a" * 96, "http://" + "a" * 61 + ".a" * 96 + ".",
    "HtTpS://h", "https://h:80", "http://h:443", "http://h:65535", "http://h:99999", "http://h:1", "http://a.1b",
    "http://a._b", "http://-", "http://a.b.c.d", "http://1.2.3.4.5", "http://1.2.3.4.", "http://1.2.3",
    "http://u:p@h.com", "http://u@h.com", "http://:@h.com", "http://[::1]", "http://[::1]:80", "http://bücher.de",
    "http://xn--bcher-kva.de", "HTTP://XN--BCHER-KVA.DE", "http://h.com:",
]
_FAST_HEADS = st.sampled_from(_FAST_HEAD_TEXTS)
_FAST_PIECES = st.sampled_from(
    list("abcXYZ019-._~!$'()*,+&=;@:/?#%[]\\ \"<>^`{|}") + ["%20", "%2F", "%2f", "%41", "%7E", "%3D", "%E2", "%zz"]
    + ["/./", "/../", "/.", "/..", "%2e", "%2E"]
)


def test_fast_path_agrees_for_every_head() -> None:
    for head in _FAST_HEAD_TEXTS:
        for tail in ("", "/", "/a/b?c=1&a", "?", "?b=1&a=2#x", "#x"):
            for sort_query in (False, True):
                _assert_fast_path_agrees(head + tail, sort_query)


_TRICKY_HOSTS = st.one_of(
    _NAME_HOST,
    _NAME_HOST,
    st.sampled_from(["127.0.0.1", "10.0.0.255", "192.168.1.10"]),
    st.builds(".".join, st.lists(st.integers(0, 300).map(str), min_size=3, max_size=5)),  # IPv4 and near misses
    st.sampled_from(["[::1]", "[::FFFF:1.2.3.4]", "[2001:DB8::1]", "0x7f.1", "a.0x1f", "a.1b", "h_1.example.", "-a.b"]),
    st.sampled_from([host for pair in _IDN_HOSTS for host in pair]),
)


@st.composite
def tricky_urls(draw: st.DrawFn) -> str:
    """Any spelling of a URL: most of them plain ASCII, so that the fast path takes many, and many
    of them not normal, so that it declines many."""
    def often(common: str, *rare: str) -> str:
        return draw(st.sampled_from([common] * 3 * len(rare) + list(rare)))

    scheme = often("http", "https", "HTTP", "Https", "ftp", "h")
    userinfo = often("", "u@", "u:p@", ":@", "U:%41@")
    host = draw(_TRICKY_HOSTS)
    host = host.upper() if draw(st.integers(0, 3)) == 0 else host
    port = often("", ":80", ":443", ":8080", ":0", ":65535", ":65536", ":080", ":")
    plain_segments = st.text(_UNRESERVED + "!$&'()*+,;=:@", max_size=8)
    segments = st.one_of(plain_segments, plain_segments, plain_segments, st.sampled_from(
        [".", "..", "%2e", "%2E", "%7e", "%7E", "%2F", "%2f", "%E2%82%AC", "a b", "%", "é", ""]))
    path = "".join("/" + segment for segment in draw(st.lists(segments, max_size=4)))
    query = often("", "?", "?a=1&b", "?b=%7e&a=%2F", "?q=a+b%20c", "?&&x", "?a=/b?c")
    fragment = often("", "#", "#f", "#a b", "#%zz", "#?q=1", "#/../a", "#\tb", "#é", "#[x]")
    return f"{scheme}://{userinfo}{host}{port}{path}{query}{fragment}"


@settings(max_examples=500)
@given(tricky_urls(), st.booleans())
@example("HTTP://127.0.0.1:80", False)
@example("https://Ex.COM:443/a/%7E?b=1&a=2", True)
def test_fast_path_gives_what_the_slow_path_gives_for_any_url(text: str, sort_query: bool) -> None:
    _assert_fast_path_agrees(text, sort_query)
    try:
        normalized = normalize_url(text, sort_query=sort_query)
    except InvalidURL as exc:
        with pytest.raises(InvalidURL, match=re.escape(str(exc))):
            _normalize_with_yarl(text, sort_query)
    else:
        assert normalized == _normalize_with_yarl(text, sort_query)


@given(_FAST_HEADS, st.lists(_FAST_PIECES, max_size=14).map("".join), st.booleans())
@example("http://h.com", "/a/..", False)
@example("http://h.com", "?b=1&&a=2", True)
def test_fast_path_gives_what_the_slow_path_gives(head: str, tail: str, sort_query: bool) -> None:
    _assert_fast_path_agrees(head + tail, sort_query)


@given(http_urls(), st.booleans(), st.booleans(), st.booleans(), st.booleans())
def test_normalize_url_is_the_slow_path_for_any_spelling(
    parts: dict, upper: bool, default_port: bool, escape: bool, sort_query: bool
) -> None:
    text = spell(parts, upper=upper, default_port=default_port, escape=escape)
    assert normalize_url(text, sort_query=sort_query) == _normalize_with_yarl(text, sort_query)
