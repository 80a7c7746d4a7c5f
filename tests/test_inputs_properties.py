"""open_input on arbitrary bytes, plain and gzipped: it yields rows numbered 1, 2, 3 ... or stops
with one clear sentence (an InputError), never another exception."""

from __future__ import annotations

import gzip
import os
import tempfile

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from crawler.errors import InputError
from crawler.job.inputs import InvalidRow, RequestRow, open_input

pytestmark = pytest.mark.one_server

# Bytes that look like what inputs hold, mixed with anything at all.
PIECES = st.sampled_from(
    [
        b"url\n",
        b"id,url\n",
        b"http://a.test/x",
        b"https://b.test/?q=1",
        b",",
        b";",
        b"\t",
        b'"',
        b'""',
        b"\n",
        b"\r\n",
        b"\r",
        b"\xef\xbb\xbf",
        b"\xff\xfe",
        b"\x00",
        b"\xe9",
        b"mailto:x@y",
        b" ",
        b"#",
        b"method,url,headers,body\n",
        b"POST",
        b'{"a": "b"}',
    ]
)
INPUTS = st.one_of(
    st.binary(max_size=400), st.lists(st.one_of(PIECES, st.binary(max_size=8)), max_size=40).map(b"".join)
)


def read(data: bytes, *, url_column: str | None = None) -> tuple[list[RequestRow | InvalidRow], InputError | None]:
    fd, path = tempfile.mkstemp(suffix=".csv")
    try:
        os.write(fd, data)
        os.close(fd)
        rows: list[RequestRow | InvalidRow] = []
        try:
            with open_input(path, url_column=url_column) as reader:
                for row in reader:
                    rows.append(row)
                assert reader.rows_read == len(rows)
        except InputError as exc:
            return rows, exc
        return rows, None
    finally:
        os.unlink(path)


def check(rows: list[RequestRow | InvalidRow], error: InputError | None) -> None:
    assert [r.row for r in rows] == list(range(1, len(rows) + 1))
    for r in rows:
        assert isinstance(r, (RequestRow, InvalidRow))
        if isinstance(r, InvalidRow):
            assert r.reason and "\n" not in r.reason
    if error is not None:
        message = str(error)
        assert message and "\n" not in message and "Traceback" not in message


@settings(max_examples=300)
@given(INPUTS)
@example(b'url\n"http://a.test/\nhttp://b.test/\n')  # an unterminated quote
@example(b"\xef\xbb\xbfurl\r\nhttp://a.test/\r\n\r\n\r\nhttp://b.test/")
@example(b"id,link\n1,http://a.test/\n")  # a header without a URL column
def test_any_bytes_give_numbered_rows_or_one_sentence(data: bytes) -> None:
    check(*read(data))


@settings(max_examples=150)
@given(INPUTS, st.sampled_from(["url", "link", None]))
def test_any_bytes_with_a_named_url_column(data: bytes, column: str | None) -> None:
    check(*read(data, url_column=column))


@settings(max_examples=150)
@given(INPUTS, st.floats(0.0, 1.0))
def test_any_gzip_whole_or_cut_gives_numbered_rows_or_one_sentence(data: bytes, keep: float) -> None:
    packed = gzip.compress(data)
    rows, error = read(packed[: int(len(packed) * keep)] if keep < 1.0 else packed)
    check(rows, error)
    if keep == 1.0:
        assert (rows, error is None) == (read(data)[0], read(data)[1] is None)  # gzip changes nothing
