"""Reading inputs: formats, gzip, stdin, invalid rows, errors, batches and bounded memory."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import pytest

import crawler.job.inputs
from crawler.errors import InputError
from crawler.job.inputs import MAX_ROW_CHARS, InvalidRow, RequestRow, open_input
from crawler.urls import fingerprint

pytestmark = pytest.mark.one_server


def write(tmp_path: Path, data: bytes, name: str = "input.csv") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def read_all(path: str, **options) -> list[RequestRow | InvalidRow]:
    with open_input(path, **options) as reader:
        return list(reader)


def summary(rows: list[RequestRow | InvalidRow]) -> list[tuple[int, str]]:
    """Each row as (row number, normalized URL or "invalid: reason")."""
    return [(r.row, r.url if isinstance(r, RequestRow) else f"invalid: {r.reason}") for r in rows]


# --- formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"url,name\nhttp://A.com/1,a\nhttp://a.com/2,b\n",
        b"id,url,name\n1,http://A.com/1,a\n2,http://a.com/2,b\n",
        b"id,name,URL\r\n1,a,http://A.com/1\r\n2,b,http://a.com/2\r\n",
        b'"id","Url"\n"1","http://A.com/1"\n\n"2","http://a.com/2"\n',
        b"\xef\xbb\xbfurl\nhttp://A.com/1\nhttp://a.com/2\n",  # a BOM, a one-column CSV
        b"id\t url \nx\thttp://A.com/1\ny\thttp://a.com/2\n",
        b"id;url\nx;http://A.com/1\ny;http://a.com/2\n",
    ],
)
def test_csv_with_a_header_finds_the_url_column_anywhere(tmp_path: Path, data: bytes) -> None:
    with open_input(write(tmp_path, data)) as reader:
        assert reader.format == "csv"
        rows = list(reader)
    assert summary(rows) == [(1, "http://a.com/1"), (2, "http://a.com/2")]
    # the row's URL as written is kept for the export: it differs from what is sent
    assert rows[0] == RequestRow(
        1, "GET", "http://a.com/1", fingerprint("GET", "http://a.com/1"), given="http://A.com/1"
    )


def test_a_custom_url_column_is_matched_ignoring_case_and_spaces(tmp_path: Path) -> None:
    path = write(tmp_path, b"url,\xef\xbb\xbf Target \nhttp://not-this/,http://this.com/\n")
    assert summary(read_all(path, url_column="TARGET")) == [(1, "http://this.com/")]


def test_a_url_list_is_read_line_by_line(tmp_path: Path) -> None:
    data = b"\n  http://A.com/x,y  \r\n\r\n\thttp://b.com/?q=1,2\nhttps://c.com:443/#f"
    with open_input(write(tmp_path, data, "urls.txt")) as reader:
        assert reader.format == "text"
        assert summary(list(reader)) == [
            (1, "http://a.com/x,y"),
            (2, "http://b.com/?q=1,2"),
            (3, "https://c.com/"),
        ]


def test_a_headerless_one_column_csv_is_unquoted(tmp_path: Path) -> None:
    data = b'"http://a.com/x,y"\n"http://a.com/say ""hi"""\nhttp://b.com/\n'
    assert summary(read_all(write(tmp_path, data))) == [
        (1, "http://a.com/x,y"),
        (2, "http://a.com/say%20%22hi%22"),
        (3, "http://b.com/"),
    ]


def test_sort_query_is_applied_to_every_rows_normalized_url_not_to_what_is_sent(tmp_path: Path) -> None:
    path = write(tmp_path, b"http://a.com/?b=1&a=2\n")
    [row] = read_all(path, sort_query=True)
    assert (row.url, row.normalized) == ("http://a.com/?b=1&a=2", "http://a.com/?a=2&b=1")
    assert row.fingerprint == fingerprint("GET", "http://a.com/?a=2&b=1")


@pytest.mark.parametrize("name", ["input.csv.gz", "input.csv", "no-extension"])
@pytest.mark.parametrize(
    ("data", "format"),
    [
        (b"id,url\n1,http://a.com/\n2,http://b.com/\n", "csv"),
        (b"http://a.com/\nhttp://b.com/\n", "text"),
    ],
)
def test_gzip_is_recognized_by_its_magic_bytes(tmp_path: Path, name: str, data: bytes, format: str) -> None:
    path = write(tmp_path, gzip.compress(data), name)
    with open_input(path) as reader:
        assert (reader.format, reader.compressed) == (format, True)
        assert reader.bytes_total == os.path.getsize(path)
        assert summary(list(reader)) == [(1, "http://a.com/"), (2, "http://b.com/")]
        assert reader.bytes_read == reader.bytes_total
        assert reader.rows_read == 2


def test_a_plain_file_named_gz_is_read_as_plain_text(tmp_path: Path) -> None:
    with open_input(write(tmp_path, b"http://a.com/\n", "input.gz")) as reader:
        assert not reader.compressed
        assert summary(list(reader)) == [(1, "http://a.com/")]


class Trickle(io.RawIOBase):
    """A pipe that delivers one byte per read, as a slow stdin may."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        return self._data.readinto(memoryview(buffer)[:1])


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("stream", [io.BytesIO, Trickle])
def test_stdin_is_read_plain_or_gzip_and_left_open(compress: bool, stream: type) -> None:
    data = b"url\nhttp://a.com/\n"
    stdin = stream(gzip.compress(data) if compress else data)
    with open_input("-", stdin=stdin) as reader:
        assert (reader.format, reader.compressed, reader.bytes_total) == ("csv", compress, None)
        assert summary(list(reader)) == [(1, "http://a.com/")]
        assert reader.bytes_read > 0
    assert not stdin.closed


@pytest.mark.parametrize(  # mtime=0: the same bytes, so the same test ids, in every process collecting them
    "data", [b"", b"\n\n  \r\n", gzip.compress(b"", mtime=0), b"url\n", b"url\n\n", gzip.compress(b"url\n", mtime=0)]
)
def test_an_empty_input_yields_no_rows(tmp_path: Path, data: bytes) -> None:
    assert read_all(write(tmp_path, data)) == []
    assert read_all("-", stdin=io.BytesIO(data)) == []


def test_an_empty_input_needs_no_url_column() -> None:
    assert read_all("-", stdin=io.BytesIO(b""), url_column="link") == []


# --- invalid rows -----------------------------------------------------------------------------


def test_invalid_lines_are_rows_with_a_reason_and_the_rest_go_on(tmp_path: Path) -> None:
    too_long = b"http://a.com/" + b"x" * 8192
    lines = [b"http://ok.com/1", b"", b"ftp://a.com/", too_long, b"http://a.com/\xff\xfe", b"  "]
    data = b"\n".join([*lines, b"not a url", b"http://ok.com/2"])
    rows = read_all(write(tmp_path, data))
    assert summary(rows) == [
        (1, "http://ok.com/1"),
        (2, "invalid: unsupported scheme 'ftp'"),
        (3, "invalid: URL longer than 8 KiB (8205 bytes)"),
        (4, "invalid: row is not valid UTF-8"),
        (5, "invalid: URL has no scheme; expected http:// or https://"),
        (6, "http://ok.com/2"),
    ]
    assert rows[3] == InvalidRow(4, "http://a.com/\\xff\\xfe", "row is not valid UTF-8")
    assert rows[1].raw == "ftp://a.com/"


def test_invalid_csv_rows_are_rows_with_a_reason_and_the_rest_go_on(tmp_path: Path) -> None:
    data = (
        b"id,name,url\n"
        b"1,a,http://ok.com/1\n"
        b"2,b\n"  # too few fields
        b"3,c,\n"  # empty cell
        b"4,d,  \n"
        b"5,\xff,http://ok.com/5\n"  # bad bytes outside the URL column do not matter
        b"6,e,http://ok.com/\xe9\n"
        b",,\n"
        b"8,f,http://ok.com/8\n"
    )
    rows = read_all(write(tmp_path, data))
    assert summary(rows) == [
        (1, "http://ok.com/1"),
        (2, "invalid: row has no 'url' column value"),
        (3, "invalid: empty URL"),
        (4, "invalid: empty URL"),
        (5, "http://ok.com/5"),
        (6, "invalid: row is not valid UTF-8"),
        (7, "invalid: empty URL"),
        (8, "http://ok.com/8"),
    ]
    assert rows[1].raw == "2,b"
    assert rows[5].raw == "http://ok.com/\\xe9"


def test_a_csv_syntax_error_makes_one_row_invalid(tmp_path: Path) -> None:
    # An unterminated quote swallows lines until the field passes the size limit.
    swallowed = b"x" * 1000 + b"\n"
    data = b'url\nhttp://ok.com/1\n"http://a.com/\n' + swallowed * 1100 + b"\nhttp://ok.com/2\n"
    rows = read_all(write(tmp_path, data))
    assert rows[0] == RequestRow(1, "GET", "http://ok.com/1", fingerprint("GET", "http://ok.com/1"))
    assert rows[1].row == 2
    assert rows[1].reason.startswith("CSV syntax error: field larger than field limit")
    assert summary(rows)[-1] == (len(rows), "http://ok.com/2")


@pytest.mark.parametrize(
    ("header", "next_line"),
    [(b"", b"http://ok.com/"), (b"url\n", b"http://ok.com/"), (b"id,url\n", b"2,http://ok.com/")],
)
def test_an_overlong_line_is_one_invalid_row_read_past(tmp_path: Path, header: bytes, next_line: bytes) -> None:
    data = header + b"http://a.com/" + b"x" * (2 * MAX_ROW_CHARS) + b"\n" + next_line + b"\n"
    rows = read_all(write(tmp_path, data))
    assert summary(rows) == [
        (1, f"invalid: row longer than {MAX_ROW_CHARS} characters"),
        (2, "http://ok.com/"),
    ]
    assert rows[0].raw.startswith("http://a.com/xxx")
    assert len(rows[0].raw) <= 8193


# --- errors for the user ----------------------------------------------------------------------


def test_a_header_without_the_url_column_is_refused_before_any_row(tmp_path: Path) -> None:
    path = write(tmp_path, b"id,name,link\n1,a,http://a.com/\n", "x.csv")
    with pytest.raises(InputError) as caught:
        open_input(path)
    assert str(caught.value) == (
        f"no column named 'url' in the header of input file {path!r}; "
        "the columns are: id, name, link; name the URL column with --url-column"
    )


def test_an_explicit_url_column_must_be_in_the_header(tmp_path: Path) -> None:
    with pytest.raises(InputError) as caught:
        open_input("-", stdin=io.BytesIO(b"id,url\n1,http://a.com/\n"), url_column="link")
    message = "no column named 'link' in the header of standard input; the columns are: id, url"
    assert str(caught.value) == message
    with pytest.raises(InputError, match="no column named 'link'"):
        open_input("-", stdin=io.BytesIO(b"http://a.com/\n"), url_column="link")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: str(tmp / "missing.csv"), "input file '{}' does not exist"),
        (lambda tmp: str(tmp), "input file '{}' is a directory, not a file"),
    ],
)
def test_an_input_that_cannot_be_opened_is_one_sentence(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path)
    with pytest.raises(InputError) as caught:
        open_input(path)
    assert str(caught.value) == message.format(path)


def test_an_unreadable_input_is_one_sentence(tmp_path: Path) -> None:
    path = write(tmp_path, b"http://a.com/\n")
    os.chmod(path, 0)
    if os.geteuid() != 0:
        with pytest.raises(InputError, match="cannot be read: permission denied"):
            open_input(path)
        return
    # Root reads any file: the same check runs as `nobody`, on a file in a directory it may enter
    # (pytest's own temporary directories are private to their user).
    shared = Path(tempfile.mkdtemp())
    try:
        shared.chmod(0o755)
        path = write(shared, b"http://a.com/\n")
        os.chmod(path, 0)
        code = (
            "import sys; from crawler.job.inputs import open_input; from crawler.errors import InputError\n"
            "try:\n    open_input(sys.argv[1])\nexcept InputError as e:\n    print(e)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, path],
            user=65534,
            group=65534,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(crawler.job.inputs.__file__).parent.parent,
        )
    finally:
        shutil.rmtree(shared)
    assert done.stdout.strip() == f"input file '{path}' cannot be read: permission denied", done.stderr


def test_a_truncated_gzip_fails_after_the_rows_it_held(tmp_path: Path) -> None:
    lines = [b"http://a.com/%s\n" % os.urandom(8).hex().encode() for _ in range(4000)]
    data = gzip.compress(b"".join(lines))  # random, so that half the file holds half the rows
    path = write(tmp_path, data[: len(data) // 2])
    seen = 0
    failure = pytest.raises(InputError, match=r"could not be read after row \d+: ")
    with open_input(path) as reader, failure:
        for _ in reader:
            seen += 1
    assert 0 < seen < 4000


def test_a_broken_gzip_header_fails_in_open_input(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"^input file .* could not be read: "):
        open_input(write(tmp_path, b"\x1f\x8b\x08garbage"))


def test_leaving_the_reader_closes_the_file(tmp_path: Path) -> None:
    fds = Path("/proc/self/fd")
    if not fds.exists():
        pytest.skip("needs /proc")
    before = len(list(fds.iterdir()))
    with open_input(write(tmp_path, gzip.compress(b"http://a.com/\n"))) as reader:
        assert len(list(fds.iterdir())) == before + 1
        next(iter(reader))
    assert len(list(fds.iterdir())) == before


# --- batches and streaming --------------------------------------------------------------------


def test_batches_hold_at_most_size_rows_and_continue_the_iteration() -> None:
    data = b"".join(b"http://a.com/%d\n" % i for i in range(25))
    with open_input("-", stdin=io.BytesIO(data)) as reader:
        first = next(iter(reader))
        sizes = [len(batch) for batch in reader.batches(10)]
        assert reader.rows_read == 25
    assert first.row == 1
    assert sizes == [10, 10, 4]
    with open_input("-", stdin=io.BytesIO(data)) as reader, pytest.raises(ValueError):
        next(reader.batches(0))


def test_a_large_gzip_input_streams_in_bounded_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = 200_000
    line = "{i},http://host{host}.example.com/item/{i}\n"
    body = "".join(line.format(i=i, host=i % 97) for i in range(lines)).encode()
    path = write(tmp_path, gzip.compress(b"id,url\n" + body, compresslevel=1), "big.gz")
    # Only the reading is measured here; URL normalization is per row and costs ~10 µs a row,
    # which would make this test slow under tracemalloc without telling anything about memory.
    stand_in = lambda row, cell, **_: InvalidRow(row, cell, "")  # noqa: E731
    monkeypatch.setattr(crawler.job.inputs, "parse_request", stand_in)
    tracemalloc.start()
    try:
        rows = last = 0
        with open_input(path) as reader:
            for batch in reader.batches(1000):
                rows += len(batch)
                last = batch[-1].row
                progress = reader.bytes_read
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (rows, last, progress) == (lines, lines, os.path.getsize(path))
    assert peak < len(body) / 8
    assert peak < 2 * 1024 * 1024
