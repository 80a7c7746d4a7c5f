"""A DSN's password never shows: mask_dsn on URL DSNs with any password (percent-encoded, as a
URL must carry it, or raw where a URL allows it), and the error of a failed connection."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from crawler.errors import DatabaseError
from crawler.ledger.database import connect, mask_dsn

PASSWORDS = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
USERS = st.text(st.characters(whitelist_categories=("Ll", "Lu", "Nd"), max_codepoint=0x7F), min_size=1, max_size=12)
# What a URL's userinfo may hold as it is: unreserved, sub-delims, ':' and '%'-free.
RAW = st.text(st.sampled_from("abcXYZ019-._~!$&'()*+,;=:"), min_size=1, max_size=30)


@given(USERS, PASSWORDS)
@example("postgres", "postgres")  # the password equals the user name
@example("u", "u@localhost:5432")
@example("u", "***")
def test_any_encoded_password_is_masked(user: str, password: str) -> None:
    encoded = quote(password, safe="")
    dsn = f"postgresql://{user}:{encoded}@db.example:5432/crawler?sslmode=disable"
    assert mask_dsn(dsn) == f"postgresql://{user}:***@db.example:5432/crawler?sslmode=disable"


@given(USERS, RAW)
@example("a", "a")
@example("user", ":")
@example("user", "user:pass")
def test_any_raw_password_is_masked(user: str, password: str) -> None:
    dsn = f"postgres://{user}:{password}@[::1]:5433/db"
    assert mask_dsn(dsn) == f"postgres://{user}:***@[::1]:5433/db"


@given(USERS)
def test_a_dsn_without_a_password_is_left_as_it_is(user: str) -> None:
    for dsn in (f"postgresql://{user}@h/db", f"postgresql://{user}:@h/db", "postgresql:///db?host=/tmp"):
        assert mask_dsn(dsn) == dsn


@settings(max_examples=15, deadline=None)
@given(PASSWORDS.filter(lambda p: len(p) >= 6))
def test_a_failed_connection_never_says_the_password(tmp_path_factory, password: str) -> None:
    # No server listens on this socket directory: the connection fails at once, and its error is
    # the user's to read.
    socket_dir = tmp_path_factory.getbasetemp() / "no-server"
    dsn = f"postgresql://crawler:{quote(password, safe='')}@/db?host={socket_dir}"
    with pytest.raises(DatabaseError) as caught:
        asyncio.run(connect(dsn, timeout=5))
    message = str(caught.value)
    assert password not in message and quote(password, safe="") not in message
    assert "***" in message
