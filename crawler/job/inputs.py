"""Reads an input (CSV with a header, or one URL per line; plain or gzip; a file or stdin) as a
stream of request rows, one bounded batch at a time.

It must never hold the whole input in memory, and never fetch or store anything. Reading blocks, so
an event loop calls it through a thread (e.g. asyncio.to_thread(next, batches)).
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import os
import re
import stat
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, TypeVar, cast

from crawler.errors import InputError
from crawler.urls import InvalidURL, fingerprint, parse_url

DEFAULT_URL_COLUMN = "url"
MAX_ROW_CHARS = 1 << 20  # a longer line is an invalid row, read past without holding it whole
MAX_RAW_CHARS = 8192  # InvalidRow.raw is cut to this, so a batch of bad rows stays small
_READ_SIZE = 1 << 16
_GZIP_MAGIC = b"\x1f\x8b"
_DELIMITERS = (",", "\t", ";")  # tried in this order when looking for the URL column
_OVERLONG = "\x00crawler: overlong row\x00"  # stands in for a line longer than MAX_ROW_CHARS
_TOO_LONG = f"row longer than {MAX_ROW_CHARS} characters"
_Stream = TypeVar("_Stream", bound=io.IOBase)
_HAS_SCHEME = re.compile(r'\s*"?\s*[a-z][a-z0-9+.-]*://', re.IGNORECASE)


@dataclass(slots=True)
class RequestRow:
    row: int  # 1-based data row; a CSV header is not a row, blank lines are not rows
    method: str
    url: str  # what is sent (crawler.urls.parse_url)
    fingerprint: bytes  # of the method, the normalized URL and the body
    headers: str | None = None  # a JSON object of header names to values, as text
    body: bytes | None = None
    # None when the same as `url`, as for most rows: nothing more to store
    normalized: str | None = None  # the normalized URL, which duplicates share
    given: str | None = None  # the row's URL as written (surrounding whitespace stripped)


@dataclass(slots=True)
class InvalidRow:
    row: int
    raw: str  # printable (undecodable bytes as \xNN), cut to MAX_RAW_CHARS
    reason: str


Row = RequestRow | InvalidRow


@dataclass(frozen=True, slots=True)
class Layout:
    """How an input's rows are laid out: "csv" (header, delimiter, URL column) or "text"."""

    format: str
    delimiter: str = ","
    url_index: int = 0
    url_column: str = DEFAULT_URL_COLUMN
    # Optional request columns of a CSV, by position: method, headers (a JSON object), body.
    method_index: int | None = None
    headers_index: int | None = None
    body_index: int | None = None


# --- pure row logic --------------------------------------------------------------------------


def detect_layout(first_line: str | None, url_column: str | None, source: str) -> Layout:
    """Decide from the first non-blank line whether the input is a CSV with a header or a URL list.

    Raises InputError when a header is required (url_column given) or likely (several columns)
    but has no URL column. A first line that starts with "scheme://" is a URL, never a header, so
    a URL list whose URLs contain commas is not mistaken for a CSV.
    """
    if first_line is None:
        return Layout("text")
    if first_line == _OVERLONG:
        if url_column is None:
            return Layout("text")
        raise InputError(f"the first line of {source} is too long to be a header")
    if url_column is None and _HAS_SCHEME.match(first_line):
        return Layout("text")
    wanted = _column_name(url_column or DEFAULT_URL_COLUMN).lower()
    widest: list[str] = []
    for delimiter in _DELIMITERS:
        columns = [_column_name(name) for name in _split_line(first_line, delimiter)]
        lowered = [name.lower() for name in columns]
        for index, name in enumerate(columns):
            if name.lower() == wanted:
                optional = {
                    col: lowered.index(col) if col in lowered else None for col in ("method", "headers", "body")
                }
                return Layout("csv", delimiter, index, name, optional["method"], optional["headers"], optional["body"])
        if len(columns) > len(widest):
            widest = columns
    if url_column is None and len(widest) < 2:
        return Layout("text")
    names = ", ".join(_printable(name, 80) for name in widest[:30])
    if len(widest) > 30:
        names += f" and {len(widest) - 30} more"
    message = f"no column named {url_column or DEFAULT_URL_COLUMN!r} in the header of {source}"
    message += f"; the columns are: {names}"
    if url_column is None:
        message += "; name the URL column with --url-column"
    raise InputError(message)


_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP method is a token (RFC 9110)


def parse_headers(text: str) -> str | None:
    """A headers cell, a JSON object of names to string values, as canonical JSON text (None when
    empty); raises ValueError with the reason."""
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"headers are not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("headers must be a JSON object of names to values")
    for name, item in value.items():
        if not _TOKEN.match(name) or not isinstance(item, str) or any(c in item for c in "\r\n\0"):
            raise ValueError(f"header {name!r} must be a token name with a one-line string value")
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def parse_request(
    row: int, cell: str, *, sort_query: bool = False, method: str = "GET", headers: str = "", body: str = ""
) -> Row:
    """Turn one row's cells into a request, or into an invalid row with the reason."""
    try:
        # isascii is O(1), and only other text can hold a lone surrogate
        if not (cell.isascii() and method.isascii() and headers.isascii() and body.isascii()):
            for text in (cell, method, headers, body):
                text.encode("utf-8")  # fails on the lone surrogates that surrogateescape made of bad bytes
        url, normalized = parse_url(cell, sort_query=sort_query)
        if method != "GET":
            method = method.strip().upper() or "GET"
            if not _TOKEN.match(method):
                return InvalidRow(row, _printable(cell), f"invalid method {method!r}")
        canonical_headers = parse_headers(headers) if headers else None
    except UnicodeEncodeError:
        return InvalidRow(row, _printable(cell), "row is not valid UTF-8")
    except InvalidURL as exc:
        return InvalidRow(row, _printable(cell), str(exc))
    except ValueError as exc:
        return InvalidRow(row, _printable(cell), str(exc))
    payload = body.encode("utf-8") if body else None
    given = None if cell == url else cell.strip()  # most rows are written as they are sent
    return RequestRow(
        row,
        method,
        url,
        fingerprint(method, normalized, payload),
        canonical_headers,
        payload,
        None if normalized == url else normalized,
        None if given == url else given,
    )


def _cell(fields: list[str], index: int | None) -> str:
    return fields[index] if index is not None and index < len(fields) else ""


def unquote_line(line: str) -> str:
    """Return a URL-list line as its URL: a line that is one double-quoted CSV field is unquoted."""
    if len(line) >= 2 and line[0] == '"' and line[-1] == '"':
        fields = next(csv.reader([line]), [])
        if len(fields) == 1:
            return fields[0]
    return line


def _split_line(line: str, delimiter: str) -> list[str]:
    try:
        return next(csv.reader([line], delimiter=delimiter), [])
    except csv.Error:
        return [line]


def _column_name(name: str) -> str:
    return name.strip().lstrip("\ufeff").strip()


def _printable(text: str, limit: int = MAX_RAW_CHARS) -> str:
    try:  # undecodable input bytes, kept by surrogateescape, shown as \xNN
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # any other lone surrogate (text given to parse_request), as \udNNN
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "…"


# --- I/O -------------------------------------------------------------------------------------


class _CountingSource(io.RawIOBase):
    """The raw bytes of the input: counts what was consumed; can sniff a prefix and give it back."""

    def __init__(self, stream: BinaryIO, *, owned: bool) -> None:
        self._stream = stream
        self._read = getattr(stream, "read1", stream.read)  # read1: don't wait for a full pipe read
        self._owned = owned
        self._pending = b""
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def sniff(self, size: int) -> bytes:
        while len(self._pending) < size and (chunk := self._read(size - len(self._pending))):
            self._pending += chunk
        return self._pending

    def readinto(self, buffer) -> int:
        if self._pending:
            data, self._pending = self._pending[: len(buffer)], self._pending[len(buffer) :]
        else:
            data = self._read(len(buffer)) or b""
        buffer[: len(data)] = data
        self.consumed += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed and self._owned:
            self._stream.close()
        super().close()


class _Lines:
    """The input's lines, each at most MAX_ROW_CHARS; a longer one is read past, as _OVERLONG."""

    def __init__(self, text: io.TextIOWrapper) -> None:
        self._text = text
        self.last = ""  # the line most recently handed out (its start, if overlong), for messages

    def __iter__(self) -> Iterator[str]:
        readline = self._text.readline
        while line := readline(MAX_ROW_CHARS):
            if len(line) == MAX_ROW_CHARS and line[-1] not in "\r\n":
                while (rest := readline(MAX_ROW_CHARS)) and rest[-1] not in "\r\n":
                    pass
                self.last = line[:MAX_RAW_CHARS]
                yield _OVERLONG
            else:
                self.last = line
                yield line


class RowReader:
    """An open input: iterate it, or take batches(); a context manager that closes the input.

    Built by open_input, which has already read the first line: format, compressed and
    bytes_total are known from the start, bytes_read and rows_read grow as rows are taken.
    """

    def __init__(
        self, raw: _CountingSource, source: str, *, url_column: str | None, sort_query: bool, bytes_total: int | None
    ) -> None:
        self._raw, self._source, self._sort_query = raw, source, sort_query
        self.bytes_total = bytes_total
        self.rows_read = 0
        self._closers: list[io.IOBase] = [raw]
        try:
            self.compressed = raw.sniff(len(_GZIP_MAGIC)) == _GZIP_MAGIC
            binary: BinaryIO = self._closing(io.BufferedReader(raw, _READ_SIZE))
            if self.compressed:
                # A GzipFile is a binary file; typeshed does not declare it a BinaryIO.
                binary = cast(BinaryIO, self._closing(gzip.GzipFile(fileobj=binary, mode="rb")))
            text = io.TextIOWrapper(binary, "utf-8-sig", "surrogateescape", newline="")
            self._lines = _Lines(self._closing(text))
            first = next((line for line in self._lines if line.strip()), None)
            self._layout = detect_layout(first, url_column, source)
        except (OSError, EOFError, zlib.error) as exc:
            self.close()
            raise InputError(f"{source} could not be read: {exc}") from None
        except BaseException:
            self.close()
            raise
        self.format = self._layout.format
        if self.format == "csv":
            rows = self._csv_rows()
        else:
            rows = self._text_rows(itertools.chain([first] if first else [], self._lines))
        self._rows = self._counted(rows)

    @property
    def bytes_read(self) -> int:
        """Bytes of the input (compressed, if it is) consumed so far, read-ahead included."""
        return self._raw.consumed

    def __enter__(self) -> RowReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for closer in reversed(self._closers):  # outermost first; GzipFile leaves its file open
            closer.close()

    def __iter__(self) -> Iterator[Row]:
        return self._rows

    def batches(self, size: int) -> Iterator[list[Row]]:
        """Yield the remaining rows in lists of at most `size` (only the last one is shorter)."""
        if size < 1:
            raise ValueError("batch size must be at least 1")
        while batch := list(itertools.islice(self._rows, size)):
            yield batch

    def _closing(self, stream: _Stream) -> _Stream:
        self._closers.append(stream)
        return stream

    def _counted(self, rows: Iterator[Row]) -> Iterator[Row]:
        try:
            for item in rows:
                self.rows_read += 1
                yield item
        except (OSError, EOFError, zlib.error) as exc:  # a truncated or corrupt gzip, a bad disk
            message = f"{self._source} could not be read after row {self.rows_read}: {exc}"
            raise InputError(message) from None

    def _text_rows(self, lines: Iterator[str]) -> Iterator[Row]:
        row = 0
        for line in lines:
            if line == _OVERLONG:
                row += 1
                yield InvalidRow(row, _printable(self._lines.last), _TOO_LONG)
            elif stripped := line.strip():
                row += 1
                yield parse_request(row, unquote_line(stripped), sort_query=self._sort_query)

    def _csv_rows(self) -> Iterator[Row]:
        layout, lines, sort_query = self._layout, self._lines, self._sort_query
        reader = csv.reader(lines, delimiter=layout.delimiter)
        url_index = layout.url_index
        url_only = layout.method_index is None and layout.headers_index is None and layout.body_index is None
        row = 0
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                # csv starts afresh on the next line: this record is invalid, the rest go on.
                row += 1
                raw = _printable(lines.last.rstrip("\r\n"))
                yield InvalidRow(row, raw, f"CSV syntax error: {exc}")
                continue
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # a blank line is not a row
            row += 1
            if fields[0] == _OVERLONG and len(fields) == 1:
                yield InvalidRow(row, _printable(lines.last), _TOO_LONG)
            elif url_index >= len(fields):
                raw = _printable(layout.delimiter.join(fields))
                yield InvalidRow(row, raw, f"row has no {layout.url_column!r} column value")
            elif url_only:  # most inputs: a call without the request columns' cells
                yield parse_request(row, fields[url_index], sort_query=sort_query)
            else:
                yield parse_request(
                    row,
                    fields[url_index],
                    sort_query=sort_query,
                    method=_cell(fields, layout.method_index) or "GET",
                    headers=_cell(fields, layout.headers_index),
                    body=_cell(fields, layout.body_index),
                )


def open_input(
    path: str, *, url_column: str | None = None, sort_query: bool = False, stdin: BinaryIO | None = None
) -> RowReader:
    """Open an input ("-" is stdin, by default sys.stdin.buffer) and read its first line.

    Raises InputError, with one sentence for the user, when the file cannot be opened or read or
    its header lacks the URL column; no row has been read then. gzip is recognized by its magic
    bytes. Closing the reader closes the file, never stdin.
    """
    csv.field_size_limit(max(csv.field_size_limit(), MAX_ROW_CHARS))  # process-wide, only raised
    if path == "-":
        raw = _CountingSource(stdin if stdin is not None else sys.stdin.buffer, owned=False)
        source, bytes_total = "standard input", None
    else:
        raw, bytes_total = _open_file(path)
        source = f"input file {path!r}"
    return RowReader(raw, source, url_column=url_column, sort_query=sort_query, bytes_total=bytes_total)


def _open_file(path: str) -> tuple[_CountingSource, int | None]:
    try:
        stream = open(path, "rb", buffering=0)  # noqa: SIM115 - the RowReader closes it
    except FileNotFoundError:
        raise InputError(f"input file {path!r} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"input file {path!r} is a directory, not a file") from None
    except PermissionError:
        raise InputError(f"input file {path!r} cannot be read: permission denied") from None
    except OSError as exc:
        raise InputError(f"input file {path!r} cannot be opened: {exc.strerror or exc}") from None
    info = os.fstat(stream.fileno())  # a FIFO or device has no size to estimate progress from
    return _CountingSource(stream, owned=True), info.st_size if stat.S_ISREG(info.st_mode) else None
