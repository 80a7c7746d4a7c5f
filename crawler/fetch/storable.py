"""Makes text a server sent storable and printable: valid UTF-8 without NUL (what a PostgreSQL
text column takes), no control character or escape sequence a terminal would act on, and no
longer than its field's cap. Pure; says whether it changed the value, so the result can say so.

It never drops a value silently: what it cannot keep as sent it keeps in a visible form.
"""

from __future__ import annotations

import re

# Caps per field, in characters. A header line is at most 16 KiB (the Fetcher's max_field_size);
# these keep a hostile answer from costing the ledger more than a normal one would.
REASON_CAP = 256
ETAG_CAP = 512  # real ETags are a hash or a version: tens of characters
LAST_MODIFIED_CAP = 64  # an HTTP-date is 29
CONTENT_TYPE_CAP = 256
URL_CAP = 8192  # as input URLs (crawler.urls.MAX_URL_LENGTH)
ERROR_CAP = 2048

# What `error` says when a value was changed, followed by the names of the fields.
MARKER = "server text made storable"

# aiohttp decodes the status line and header values as UTF-8 with surrogateescape: each byte
# that is not valid UTF-8 arrives as a lone surrogate, which asyncpg cannot encode.
_SURROGATES = re.compile("[\ud800-\udfff]")
# C0 and C1 controls and DEL (ESC starts ANSI and OSC sequences, 0x9b is CSI on its own), the
# Unicode line and paragraph separators, and the bidirectional overrides that reorder what a
# terminal shows. Escaping the introducer leaves an escape sequence inert, printable text.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_SPACES = frozenset("\t\n\r")


def _escape(match: re.Match) -> str:
    char = match.group()
    if char in _SPACES:  # keeps a message on one line, as a table or a CSV reader expects
        return " "
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def storable(value: str, cap: int) -> tuple[str, bool]:
    """(the value made storable and printable, whether that changed it).

    Lone surrogates (bytes that were not UTF-8) become U+FFFD; controls are written as visible
    escapes (NUL as the four characters \\x00), tab and line breaks as spaces; a value over
    `cap` characters is cut to it, ending in '…'."""
    # The common case costs one scan in C: str.isprintable() is false for every control, lone
    # surrogate, line or paragraph separator and bidirectional override (and for some harmless
    # characters, which the slow way then keeps).
    if value.isprintable() and len(value) <= cap:
        return value, False
    text = _CONTROLS.sub(_escape, _SURROGATES.sub("\ufffd", value))
    if len(text) > cap:
        text = text[: cap - 1] + "…"
    return text, text != value


def storable_bytes(value: bytes, cap: int) -> tuple[str, bool]:
    """As storable(), for bytes: decoded as UTF-8, invalid sequences replaced by U+FFFD."""
    text = value.decode("utf-8", "replace")
    made, changed = storable(text, cap)
    return made, changed or text.encode() != value


def printable(value: str) -> str:
    """The value safe to show on a terminal, whatever its length (for display, not storage)."""
    if value.isprintable():
        return value
    return _CONTROLS.sub(_escape, _SURROGATES.sub("\ufffd", value))


def marked(error: str | None, fields: list[str]) -> str:
    """`error` with the note that these fields were made storable."""
    note = f"{MARKER}: {', '.join(fields)}"
    return f"{error}; {note}" if error else note
