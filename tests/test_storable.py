"""Text a server sent, made storable (PostgreSQL UTF-8 text) and printable (no terminal control)."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from crawler.fetch.storable import MARKER, marked, printable, storable, storable_bytes

pytestmark = pytest.mark.one_server

UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def safe(text: str) -> bool:
    text.encode("utf-8")  # strict: a lone surrogate raises
    return UNSAFE.search(text) is None


def test_a_nul_in_a_reason_phrase_becomes_visible_text():
    assert storable("Bad\x00Thing", 256) == ("Bad\\x00Thing", True)


def test_escape_sequences_lose_their_introducer():
    text, changed = storable("a\x1b[31mred\x1b]0;title\x07\x9b2J", 256)
    assert changed and text == "a\\x1b[31mred\\x1b]0;title\\x07\\x9b2J"


def test_bytes_that_are_not_utf8_arrive_as_surrogates_and_are_replaced():
    on_the_wire = b"Caf\xe9 \xff"
    as_aiohttp_hands_it = on_the_wire.decode("utf-8", "surrogateescape")  # reason and header values
    assert storable(as_aiohttp_hands_it, 256) == ("Caf\ufffd \ufffd", True)
    assert storable_bytes(on_the_wire, 256) == ("Caf\ufffd \ufffd", True)


def test_line_breaks_and_tabs_become_spaces():
    assert storable("one\r\ntwo\tthree", 256) == ("one  two three", True)


def test_a_long_value_is_cut_to_its_cap():
    text, changed = storable("x" * 1000, 100)
    assert changed and len(text) == 100 and text.endswith("…")


def test_clean_text_is_returned_as_is():
    value = 'W/"5f3c-1a"'
    text, changed = storable(value, 512)
    assert text is value and not changed
    assert storable("Café ☕", 256) == ("Café ☕", False)  # printable UTF-8 is kept
    assert storable_bytes(b"text/html; charset=utf-8", 256) == ("text/html; charset=utf-8", False)
    assert storable("zero\u200bwidth\ue000", 256) == ("zero\u200bwidth\ue000", False)  # not printable, harmless


def test_bidirectional_overrides_are_escaped():
    assert storable("abc\u202edcba", 256) == ("abc\\u202edcba", True)


def test_printable_escapes_without_a_cap():
    assert printable("x" * 10_000) == "x" * 10_000
    assert printable("[bold red]x\x1b[2J") == "[bold red]x\\x1b[2J"


def test_the_marker_names_the_fields():
    assert marked(None, ["etag"]) == f"{MARKER}: etag"
    assert marked("HTTP 500 Bad", ["reason", "final_url"]) == f"HTTP 500 Bad; {MARKER}: reason, final_url"


# Any code point, surrogates included, with the hostile ones drawn often.
HOSTILE = st.text(
    alphabet=st.one_of(
        st.characters(codec=None, categories=None),
        st.sampled_from("\x00\x07\t\n\r\x1b[]\x7f\x85\x9b\ud800\udcff\u202e\u2028\ufffd…"),
    )
)


@given(st.one_of(HOSTILE, st.binary()), st.integers(min_value=1, max_value=300))
@example("\ud800\udfff\x00", 2)
@example(b"\xff\xfe\x00\x1b[0m", 3)
def test_any_input_comes_out_storable_printable_and_within_its_cap(value, cap):
    text, changed = storable_bytes(value, cap) if isinstance(value, bytes) else storable(value, cap)
    assert safe(text)
    assert len(text) <= cap
    # once made storable, it stays as it is
    assert storable(text, cap) == (text, False)
    if not changed:
        assert text == (value.decode() if isinstance(value, bytes) else value)


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E)), st.integers(1, 300))
def test_printable_ascii_within_its_cap_is_unchanged(value, cap):
    if len(value) <= cap:
        assert storable(value, cap) == (value, False)


@given(HOSTILE)
def test_printable_output_is_safe(value):
    assert safe(printable(value))
