"""URLs: what is sent (a browser's changes only), the normalized form that duplicates share,
request fingerprints and password masking; unit tests, data-driven tests against other
projects' test data (tests/data/), and properties."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import yarl
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from crawler.urls import MAX_URL_LENGTH, InvalidURL, fingerprint, mask_password, normalize_url, parse_url, request_url

pytestmark = pytest.mark.one_server

DATA = Path(__file__).parent / "data"

# --- what is sent, case by case ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "sent", "normalized"),
    [
        ("HTTP://ExAmple.COM/Path", "http://example.com/Path", "http://example.com/Path"),  # the path keeps its case
        ("  http://example.com/a \n", "http://example.com/a", "http://example.com/a"),
        ("http://example.com", "http://example.com/", "http://example.com/"),
        ("http://example.com?q=1", "http://example.com/?q=1", "http://example.com/?q=1"),
        ("http://example.com:80/", "http://example.com/", "http://example.com/"),
        ("https://example.com:443/", "https://example.com/", "https://example.com/"),
        ("http://example.com:443/", "http://example.com:443/", "http://example.com:443/"),
        ("http://example.com:8080/", "http://example.com:8080/", "http://example.com:8080/"),
        ("http://example.com/a#frag", "http://example.com/a", "http://example.com/a"),
        # reserved escapes are sent as written and never decoded, in the path or the query
        ("http://e.com/x?sig=a%2Fb%3D%3D", "http://e.com/x?sig=a%2Fb%3D%3D", "http://e.com/x?sig=a%2Fb%3D%3D"),
        ("http://e.com/path;v=1/%3Bx", "http://e.com/path;v=1/%3Bx", "http://e.com/path;v=1/%3Bx"),
        (
            "http://e.com/?next=http%3A%2F%2Fexample.com%2F",
            "http://e.com/?next=http%3A%2F%2Fexample.com%2F",
            "http://e.com/?next=http%3A%2F%2Fexample.com%2F",
        ),
        ("http://e.com/a%2fb", "http://e.com/a%2fb", "http://e.com/a%2Fb"),  # hex case: normalized only
        # unreserved escapes: sent as written, decoded in the normalized form
        ("http://e.com/%7euser/%7Eme", "http://e.com/%7euser/%7Eme", "http://e.com/~user/~me"),
        ("http://e.com/%41%62%2d%5f%2e", "http://e.com/%41%62%2d%5f%2e", "http://e.com/Ab-_."),
        # what cannot be sent as written: a space as %20 (never +), non-ASCII as UTF-8
        ("http://e.com/a b?x=a b", "http://e.com/a%20b?x=a%20b", "http://e.com/a%20b?x=a%20b"),
        ("http://e.com/?r=a+b&s=a%20b", "http://e.com/?r=a+b&s=a%20b", "http://e.com/?r=a+b&s=a%20b"),
        ("http://e.com/€?q=é", "http://e.com/%E2%82%AC?q=%C3%A9", "http://e.com/%E2%82%AC?q=%C3%A9"),
        ("http://e.com/a|b?c|d{}", "http://e.com/a%7Cb?c%7Cd%7B%7D", "http://e.com/a%7Cb?c%7Cd%7B%7D"),
        ("http://e.com/50%", "http://e.com/50%", "http://e.com/50%"),  # a stray % is sent as written
        ("http://e.com/a/./b/../c", "http://e.com/a/c", "http://e.com/a/c"),
        ("http://e.com/a/%2e%2E/c", "http://e.com/c", "http://e.com/c"),
        ("http://e.com/?", "http://e.com/", "http://e.com/"),  # yarl cannot send an empty query
        ("http://e.com/?#f", "http://e.com/", "http://e.com/"),
        ("http://e.com/?a?", "http://e.com/?a?", "http://e.com/?a?"),
        ("http://münchen.de/", "http://xn--mnchen-3ya.de/", "http://xn--mnchen-3ya.de/"),
        ("http://MÜNCHEN.de/", "http://xn--mnchen-3ya.de/", "http://xn--mnchen-3ya.de/"),
        ("http://XN--MNCHEN-3YA.DE/", "http://xn--mnchen-3ya.de/", "http://xn--mnchen-3ya.de/"),
        ("http://例え.テスト/", "http://xn--r8jz45g.xn--zckzah/", "http://xn--r8jz45g.xn--zckzah/"),
        ("http://[::FFFF:1.2.3.4]:8080/", "http://[::ffff:102:304]:8080/", "http://[::ffff:102:304]:8080/"),
        ("http://[::1]:80/", "http://[::1]/", "http://[::1]/"),
        ("http://0x7f.1/", "http://127.0.0.1/", "http://127.0.0.1/"),  # as a browser reads it
        ("http://user:pa%73s@Example.com/", "http://user:pa%73s@example.com/", "http://user:pass@example.com/"),
        ("http://:@example.com/", "http://example.com/", "http://example.com/"),
        ("http://u:@example.com/", "http://u@example.com/", "http://u@example.com/"),
        ("http://host_name.example.com/", "http://host_name.example.com/", "http://host_name.example.com/"),
        ("http://example.com./", "http://example.com./", "http://example.com./"),
        ("http://e.com/a\tb\nc", "http://e.com/abc", "http://e.com/abc"),  # tab and newline removed
    ],
)
def test_parse_url_gives_what_is_sent_and_the_normalized_form(raw: str, sent: str, normalized: str) -> None:
    assert parse_url(raw) == (sent, normalized)
    assert request_url(raw) == sent and normalize_url(raw) == normalized
    assert parse_url(sent) == (sent, normalized)  # idempotent


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("http://e.com/a%2Fb", "http://e.com/a/b"),
        ("http://e.com/?x=a+b", "http://e.com/?x=a%20b"),
        ("http://e.com/?sig=a%2Fb%3D%3D", "http://e.com/?sig=a/b=="),
        ("http://e.com/path;v=1/%3Bx", "http://e.com/path;v=1/;x"),
        ("http://e.com/?next=http%3A%2F%2Fexample.com%2F", "http://e.com/?next=http://example.com/"),
        ("http://e.com/%u011f", "http://e.com/%C4%9F"),
        ("http://u:p@e.com/", "http://U:P@e.com/"),
    ],
)
def test_spellings_rfc_3986_does_not_call_equivalent_are_two_requests(first: str, second: str) -> None:
    assert normalize_url(first) != normalize_url(second)
    assert request_url(first) != request_url(second)


def test_sort_query_orders_parameters_by_key_and_keeps_equal_keys_in_order() -> None:
    raw = "http://example.com/?b=2&a=1&c&b=1&&a=0"
    assert normalize_url(raw) == "http://example.com/?b=2&a=1&c&b=1&&a=0"
    assert normalize_url(raw, sort_query=True) == "http://example.com/?a=1&a=0&b=2&b=1&c"
    assert request_url(raw) == raw  # what is sent is never sorted


def test_sort_query_compares_keys_after_percent_normalization() -> None:
    spelled = normalize_url("http://e.com/?%62=1&a=2", sort_query=True)
    assert spelled == normalize_url("http://e.com/?a=2&b=1", sort_query=True)


def test_a_url_of_exactly_the_limit_is_accepted() -> None:
    base = "http://example.com/"
    url = base + "a" * (MAX_URL_LENGTH - len(base))
    assert parse_url(url) == (url, url)


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
        ("http://", "URL has no host"),
        ("http://example.com:0/", "invalid port"),
        ("http://example.com:65536/", "invalid port"),
        ("http://example.com:http/", "invalid port"),
        ("http://f: 21/", "invalid port"),
        ("http://f:+21/", "invalid port"),
        ("http://f:2_1/", "invalid port"),
        ("http://f:\u0662\u0661/", "invalid port"),  # Arabic-Indic digits
        ("http://[v1.x]/", "invalid IPv6 address '[v1.x]'"),
        ("http://[1:2]/", "invalid IPv6 address '[1:2]'"),
        ("http://[0:1:2:3:4:5:6:7:8]/", "invalid IPv6 address '[0:1:2:3:4:5:6:7:8]'"),
        ("http://[::%31]", "invalid IPv6 address '[::%31]'"),
        ("http://[::1/", "invalid IPv6 address '[::1'"),
        ("http://exa mple.com/", "invalid host 'exa mple.com'"),
        ("http://a b:65535/", "invalid host 'a b'"),  # the highest port is a port: the host is wrong
        ("http://a b:65536/", "invalid port"),
        ("http://[1:2]:65535/", "invalid IPv6 address '[1:2]'"),
        ("http://a..b.com/", "invalid host 'a..b.com'"),
        ("http://ex!ample.com/", "invalid host 'ex!ample.com'"),
        ("http://256.0.0.1/", "invalid host '256.0.0.1'"),
        ("http://a\u200b\u0000.com/", r"invalid host 'a\u200b\x00.com'"),
        ("http://example.com/\udcff", "URL is not valid UTF-8"),
        ("http://example.com/\ud800", "URL is not valid UTF-8"),
    ],
)
def test_parse_url_refuses_what_cannot_be_fetched(raw: str, reason: str) -> None:
    with pytest.raises(InvalidURL) as caught:
        parse_url(raw)
    assert str(caught.value) == reason


def test_invalid_url_is_a_value_error() -> None:
    assert issubclass(InvalidURL, ValueError)


# --- other projects' test data -------------------------------------------------------------

_WHATWG = json.loads((DATA / "whatwg_urltestdata_http.json").read_text())
# Where this crawler parts from the WHATWG reference, and why (every other case is as it says).
WHATWG_CHOICES = {
    "http://f:0/c": "invalid: port 0 cannot be connected to",
    "http://f:00000000000000/c": "invalid: port 0 cannot be connected to",
    "http://./": "invalid: '.' is not a DNS name",
    "http://../": "invalid: '..' is not a DNS name",
    "http://foo.09..": "invalid: 'foo.09..' is not a DNS name (an empty label)",
    "http://!\"$&'()*+,-.;=_`{}~/": "invalid: a host of punctuation is not a DNS name",
    "http://`{}:`{}@h/`{}?`{}": (
        "accepted, and '`', '{', '}' in the query escaped: RFC 3986 does not allow them in a request target"
    ),
}


@pytest.mark.parametrize("case", _WHATWG["cases"], ids=lambda case: repr(case["input"])[:60])
def test_whatwg_url_test_data(case: dict) -> None:
    choice = WHATWG_CHOICES.get(case["input"])
    try:
        sent = request_url(case["input"])
    except InvalidURL:
        sent = None
    if choice is not None:
        if choice.startswith("invalid"):
            assert sent is None
        else:
            assert sent == "http://%60%7B%7D:%60%7B%7D@h/%60%7B%7D?%60%7B%7D"
    elif case.get("failure"):
        assert sent is None
    else:
        expected = case["href"].partition("#")[0]  # the fragment is never sent
        if expected.endswith("?") and expected.index("?") == len(expected) - 1:
            expected = expected[:-1]  # nor an empty query: yarl cannot send one (see crawler/urls.py)
        assert sent == expected
        assert request_url(sent) == sent
        # the input and the reference's spelling are one request: one fingerprint
        assert fingerprint("GET", normalize_url(case["input"])) == fingerprint("GET", normalize_url(case["href"]))


def test_whatwg_choices_are_cases_of_the_data() -> None:
    assert set(WHATWG_CHOICES) <= {case["input"] for case in _WHATWG["cases"]}
    assert len(_WHATWG["cases"]) > 300


_NORMALIZER = json.loads((DATA / "url_normalizer_cases.json").read_text())


@pytest.mark.parametrize("case", _NORMALIZER["cases"], ids=lambda c: f"{c['source']}:{c['input'][:50]!r}")
def test_other_normalizers_cases_merge_only_equivalent_spellings(case: dict) -> None:
    sort_query = case["sort_query"]
    if case["verdict"] == "invalid":
        with pytest.raises(InvalidURL):
            parse_url(case["input"], sort_query=sort_query)
        return
    first = normalize_url(case["input"], sort_query=sort_query)
    second = normalize_url(case["reference"], sort_query=sort_query)
    if case["verdict"] == "same":
        assert first == second, case["reason"]
        assert fingerprint("GET", first) == fingerprint("GET", second)
    else:
        assert first != second, case["reason"]
        assert fingerprint("GET", first) != fingerprint("GET", second)


def test_normalizer_cases_cover_every_source_and_verdict() -> None:
    seen = {(case["source"], case["verdict"]) for case in _NORMALIZER["cases"]}
    assert {source for source, _ in seen} == {"w3lib", "stormcrawler", "rfc3986"} == set(_NORMALIZER["sources"])
    assert {verdict for _, verdict in seen} == {"same", "different", "invalid"}


# --- passwords ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("http://alice:pw@host/", "http://alice:***@host/"),
        ("http://alice:p@ss@host/a@b", "http://alice:***@host/a@b"),
        ("https://alice:pw@host:8443/?u=a:b@c", "https://alice:***@host:8443/?u=a:b@c"),
        ("http://alice@host/", "http://alice@host/"),  # no password
        ("http://host/?a@b", "http://host/?a@b"),
        ("  not a url: alice:pw@host", "  not a url: alice:pw@host"),
        ("invalid http://alice:pw@[::1/", "invalid http://alice:***@[::1/"),
        (None, None),
    ],
)
def test_mask_password_hides_a_urls_password_only(text: str | None, masked: str | None) -> None:
    assert mask_password(text) == masked


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
@example("@", "http://[::1]", False)
def test_parsing_any_text_twice_changes_nothing(tail: str, head: str, sort_query: bool) -> None:
    try:
        sent, normalized = parse_url(head + tail, sort_query=sort_query)
    except InvalidURL:
        return
    assert parse_url(sent, sort_query=sort_query) == (sent, normalized)
    assert normalize_url(normalized, sort_query=sort_query) == normalized
    # What the Fetcher gives aiohttp: yarl must keep it as written (see tests/test_request_target.py).
    assert str(yarl.URL(sent, encoded=True)) == sent


@given(http_urls(), st.booleans())
def test_aiohttp_sends_the_sent_form_as_written(parts: dict, sort_query: bool) -> None:
    # The Fetcher reports the URL as the final one when there was no redirect, without asking
    # aiohttp's yarl.URL for its text: the two must be the same.
    sent = request_url(spell(parts, fragment="x", escape=True))
    url = yarl.URL(sent, encoded=True)
    assert str(url) == sent
    assert sent.endswith(url.raw_path_qs)


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


# --- the fast path: byte for byte what the parser gives, for a good share of URLs ----------

from crawler.urls import _parse_plain, _parse_with_ada  # noqa: E402 - private, on purpose


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("http://127.0.0.1:8080/ok/1", "http://127.0.0.1:8080/ok/1"),
        ("HTTPS://Example.COM:443", "https://example.com/"),
        ("http://example.com?b=2&a=1", "http://example.com/?b=2&a=1"),
        ("https://a.example/%E2%82%AC/%2F?q=%3D&r=a+b", "https://a.example/%E2%82%AC/%2F?q=%3D&r=a+b"),
        ("http://h.com/a%2fb?x=%7e#frag", "http://h.com/a%2fb?x=%7e"),
    ],
)
def test_plain_urls_take_the_fast_path(raw: str, expected: str) -> None:
    assert _parse_plain(raw) == expected == _parse_with_ada(raw)


def _assert_fast_path_agrees(text: str) -> bool:
    """The fast path either declines (None) or gives exactly the slow path's result; True if it decided."""
    fast = _parse_plain(text)
    if fast is None:
        return False
    assert fast == _parse_with_ada(text), text
    return True


_PROBES = [chr(c) for c in range(128)] + [f"%{b:02X}" for b in range(256)] + [f"%{b:02x}" for b in range(256)]
_PROBE_PLACES = [
    "http://h.com/a{}b",
    "http://h.com/{}",
    "http://h.com/?a{}b",
    "http://h.com/a?{}",
    "http://h.com/?{}=1&{}",
    "http://h{}.com/",
    "http://{}h.com/",
    "http://h.com{}",
    "http://h.com:8{}/",
    "http://1.2.3.{}/",
    "h{}tp://h.com/",
    "http://h.com/a#{}",
    "http://h.com#{}",
    "http://h.com/?a#{}b",
]


@pytest.mark.parametrize("place", _PROBE_PLACES)
def test_fast_path_agrees_for_every_ascii_character_and_escape(place: str) -> None:
    taken = sum(_assert_fast_path_agrees(place.replace("{}", probe).strip()) for probe in _PROBES)
    assert taken >= 2  # each place has characters the fast path decides ("t" and "T" in "h{}tp://")


_FAST_HEAD_TEXTS = [
    "http://",
    "https://",
    "HTTP://",
    "ftp://",
    "http://example.com",
    "http://Ex_a-1.COM.",
    "http://h:80",
    "https://h:443",
    "http://h:0",
    "http://h:65536",
    "http://h:080",
    "http://127.0.0.1:8080",
    "http://01.2.3.4",
    "http://256.1.1.1",
    "http://a.123",
    "http://a.0x1f",
    "http://" + "a" * 63 + ".b",
    "http://" + "a" * 64 + ".b",
    "http://" + ".".join(["a" * 63] * 4),
    "http://" + ".".join(["a" * 63] * 4) + ".",
    "http://" + "a" * 62 + ".a" * 96,
    "https://" + "a" * 62 + ".a" * 96,
    "http://" + "a" * 61 + ".a" * 96 + ".",
    "HtTpS://h",
    "https://h:80",
    "http://h:443",
    "http://h:65535",
    "http://h:99999",
    "http://h:1",
    "http://a.1b",
    "http://a._b",
    "http://-",
    "http://a.b.c.d",
    "http://1.2.3.4.5",
    "http://1.2.3.4.",
    "http://1.2.3",
    "http://u:p@h.com",
    "http://u@h.com",
    "http://:@h.com",
    "http://[::1]",
    "http://[::1]:80",
    "http://bücher.de",
    "http://xn--bcher-kva.de",
    "HTTP://XN--BCHER-KVA.DE",
    "http://xn--a.com",
    "http://h.com:",
]
_FAST_HEADS = st.sampled_from(_FAST_HEAD_TEXTS)
_FAST_PIECES = st.sampled_from(
    list("abcXYZ019-._~!$'()*,+&=;@:/?#%[]\\ \"<>^`{|}")
    + ["%20", "%2F", "%2f", "%41", "%7E", "%3D", "%E2", "%zz"]
    + ["/./", "/../", "/.", "/..", "%2e", "%2E", ".%2e", "\t", "\n"]
)


def test_fast_path_agrees_for_every_head() -> None:
    taken = 0
    for head in _FAST_HEAD_TEXTS:
        for tail in ("", "/", "/a/b?c=1&a", "?", "?b=1&a=2#x", "#x"):
            taken += _assert_fast_path_agrees(head + tail)
    assert taken >= 100


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
    of them not as the parser spells them, so that it declines many."""

    def often(common: str, *rare: str) -> str:
        return draw(st.sampled_from([common] * 3 * len(rare) + list(rare)))

    scheme = often("http", "https", "HTTP", "Https", "ftp", "h")
    userinfo = often("", "u@", "u:p@", ":@", "U:%41@")
    host = draw(_TRICKY_HOSTS)
    host = host.upper() if draw(st.integers(0, 3)) == 0 else host
    port = often("", ":80", ":443", ":8080", ":0", ":65535", ":65536", ":080", ":")
    plain_segments = st.text(_UNRESERVED + "!$&'()*+,;=:@", max_size=8)
    segments = st.one_of(
        plain_segments,
        plain_segments,
        plain_segments,
        st.sampled_from(
            [".", "..", "%2e", "%2E", "%7e", "%7E", "%2F", "%2f", "%E2%82%AC", "a b", "%", "é", "", "a|b", "\\"]
        ),
    )
    path = "".join("/" + segment for segment in draw(st.lists(segments, max_size=4)))
    query = often("", "?", "?a=1&b", "?b=%7e&a=%2F", "?q=a+b%20c", "?&&x", "?a=/b?c", "?q='x'", "?a=`{}`")
    fragment = often("", "#", "#f", "#a b", "#%zz", "#?q=1", "#/../a", "#\tb", "#é", "#[x]")
    return f"{scheme}://{userinfo}{host}{port}{path}{query}{fragment}"


@settings(max_examples=500)
@given(tricky_urls(), st.booleans())
@example("HTTP://127.0.0.1:80", False)
@example("https://Ex.COM:443/a/%7E?b=1&a=2", True)
def test_fast_path_gives_what_the_slow_path_gives_for_any_url(text: str, sort_query: bool) -> None:
    _assert_fast_path_agrees(text)
    try:
        result = parse_url(text, sort_query=sort_query)
    except InvalidURL as exc:
        with pytest.raises(InvalidURL, match=re.escape(str(exc))):
            _parse_with_ada(text.strip("".join(map(chr, range(0x21)))))
    else:
        assert result[0] == _parse_with_ada(text.strip("".join(map(chr, range(0x21)))))


def test_fast_path_decides_a_good_share_of_the_urls_it_is_tested_on() -> None:
    """The equality tests pass trivially if the fast path declines everything: it must not."""
    decided = []

    @settings(max_examples=400, database=None, derandomize=True)  # the same draws every run
    @given(tricky_urls())
    def draw(text: str) -> None:
        decided.append(_assert_fast_path_agrees(text))

    draw()
    assert sum(decided) / len(decided) > 0.15  # about a quarter: these URLs are mostly odd on purpose


@given(_FAST_HEADS, st.lists(_FAST_PIECES, max_size=14).map("".join))
@example("http://h.com", "/a/..")
@example("http://h.com", "?b=1&&a=2")
def test_fast_path_gives_what_the_slow_path_gives(head: str, tail: str) -> None:
    _assert_fast_path_agrees(head + tail)


@given(http_urls(), st.booleans(), st.booleans(), st.booleans(), st.booleans())
def test_parse_url_is_the_slow_path_for_any_spelling(
    parts: dict, upper: bool, default_port: bool, escape: bool, sort_query: bool
) -> None:
    text = spell(parts, upper=upper, default_port=default_port, escape=escape)
    assert parse_url(text, sort_query=sort_query)[0] == _parse_with_ada(text)


def test_plain_ascii_urls_take_the_fast_path_often() -> None:
    decided = []

    @settings(max_examples=200, database=None, derandomize=True)
    @given(http_urls(), st.booleans())
    def draw(parts: dict, upper: bool) -> None:
        decided.append(_parse_plain(spell(parts, upper=upper)) is not None)

    draw()
    assert sum(decided) / len(decided) > 0.3  # the others hold a space or non-ASCII
