"""The database's secrets and doors: a DSN's password is masked in every form libpq takes (a URL,
`?password=`, keyword/value pairs, one that cannot be read at all), and the embedded server's
socket never sits in a directory other local users may enter."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from urllib.parse import quote

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import run_cli
from crawler.ledger.database import MASKED_DSN, mask_dsn, socket_dir_for

SECRET = "hunter2-Zq"


@pytest.mark.parametrize(
    "dsn, shown",
    [
        ("postgresql://me:hunter2-Zq@db.internal:5432/crawl", "postgresql://me:***@db.internal:5432/crawl"),
        ("postgres://me:hunter2-Zq@h1:5432,h2:5433/crawl", "postgres://me:***@h1:5432,h2:5433/crawl"),
        ("postgresql://me:p@ss:hunter2-Zq@db/crawl", "postgresql://me:***@db/crawl"),  # a raw @ in the password
        (
            "postgresql://me@db/crawl?password=hunter2-Zq&sslmode=require",
            "postgresql://me@db/crawl?password=***&sslmode=require",
        ),
        ("postgresql:///crawl?host=/run/pg&sslpassword=hunter2-Zq", "postgresql:///crawl?host=/run/pg&sslpassword=***"),
        ("host=db password=hunter2-Zq dbname=crawl", "host=db password=*** dbname=crawl"),
        ("host=db PASSWORD = 'hunter2-Zq with spaces' dbname=crawl", "host=db PASSWORD = *** dbname=crawl"),
        (r"host=db password='it\'s hunter2-Zq' dbname=crawl", "host=db password=*** dbname=crawl"),
        ("host=db password='hunter2-Zq dbname=crawl", MASKED_DSN),  # an unclosed quote: not readable
        ("postgresql://me:hunter2-Zq@[::1/crawl", MASKED_DSN),  # an unclosed IPv6 bracket
        ("hunter2-Zq", MASKED_DSN),  # neither form
        ("postgresql://me@db/crawl", "postgresql://me@db/crawl"),  # nothing to mask
    ],
)
def test_every_form_of_dsn_has_its_password_masked(dsn, shown):
    assert mask_dsn(dsn) == shown
    assert SECRET not in mask_dsn(dsn)


passwords = st.text(min_size=1, max_size=40).filter(lambda p: p.strip())


@given(passwords, passwords)
def test_a_masked_url_dsn_does_not_depend_on_the_password(first, second):
    def dsn(password: str) -> str:
        return f"postgresql://crawler:{quote(password, safe='')}@db.internal:5432/crawl?sslmode=require"

    assert (
        mask_dsn(dsn(first))
        == mask_dsn(dsn(second))
        == "postgresql://crawler:***@db.internal:5432/crawl?sslmode=require"
    )


@given(passwords, passwords)
def test_a_masked_keyword_dsn_does_not_depend_on_the_password(first, second):
    def dsn(password: str) -> str:
        quoted = password.replace("\\", "\\\\").replace("'", "\\'")
        return f"host=db.internal password='{quoted}' dbname=crawl"

    assert mask_dsn(dsn(first)) == mask_dsn(dsn(second)) == "host=db.internal password=*** dbname=crawl"


@given(passwords, passwords)
def test_a_masked_query_password_does_not_depend_on_the_password(first, second):
    def dsn(password: str) -> str:
        return f"postgresql://crawler@db.internal/crawl?password={quote(password, safe='')}&application_name=x"

    assert mask_dsn(dsn(first)) == mask_dsn(dsn(second))


@pytest.mark.parametrize(
    "dsn",
    [
        "host=127.0.0.1 port=1 user=me password=hunter2-Zq dbname=crawl",
        "postgresql://me@127.0.0.1:1/crawl?password=hunter2-Zq",
        "postgresql://me:hunter2-Zq@[::1/crawl",
    ],
)
def test_an_unreachable_database_never_shows_the_password(dsn, tmp_path):
    proc = run_cli("status", "--dsn", dsn)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert SECRET not in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    shown = run_cli("db", "url", "--dsn", dsn)
    assert shown.returncode == 0 and SECRET not in shown.stdout.decode()


# --- the embedded server's socket -----------------------------------------------------------------


def _long_home(tmp_path: Path) -> Path:
    """A home whose data directory is too long a path for a Unix socket (107 bytes)."""
    home = tmp_path / ("h" * max(1, 110 - len(str(tmp_path))))
    assert len(os.fsencode(home / "pgdata" / ".s.PGSQL.5432")) > 107
    return home


def _private(path: Path) -> bool:
    found = path.lstat()
    return stat.S_ISDIR(found.st_mode) and not found.st_mode & 0o077


async def test_with_a_long_home_the_socket_is_in_a_private_directory(tmp_path):
    home = _long_home(tmp_path)
    env = {"CRAWLER_HOME": str(home), "CRAWLER_DSN": "", "DATABASE_URL": ""}
    try:
        proc = run_cli("db", "url", "--show-password", env=env)
        assert proc.returncode == 0, proc.stderr.decode()
        dsn = proc.stdout.decode().strip()
        socket_dir = Path(dsn.split("host=", 1)[1])
        assert socket_dir == socket_dir_for(home.resolve() / "pgdata")
        assert (socket_dir / ".s.PGSQL.5432").is_socket()
        assert _private(socket_dir)  # no one else may enter, so no one else reaches the socket
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
    finally:
        stopped = run_cli("db", "stop", env=env)
    assert stopped.returncode == 0, stopped.stderr.decode()


def test_a_socket_directory_others_may_enter_is_refused(tmp_path):
    home = _long_home(tmp_path)
    env = {"CRAWLER_HOME": str(home), "CRAWLER_DSN": "", "DATABASE_URL": ""}
    planted = socket_dir_for(home.resolve() / "pgdata")
    planted.mkdir(mode=0o700)
    os.chmod(planted, 0o777)  # as a local user preparing it under /tmp would
    try:
        proc = run_cli("db", "url", env=env)
        err = proc.stderr.decode()
        assert proc.returncode == 2, err
        assert "is not private" in err and str(planted) in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not (planted / ".s.PGSQL.5432").exists()
        assert not (home / "pgdata" / "postmaster.pid").exists()  # nothing was started
    finally:
        run_cli("db", "stop", env=env)
        planted.rmdir()


def test_a_short_home_keeps_the_socket_in_the_data_directory(tmp_path):
    pgdata = tmp_path / "home" / "pgdata"
    assert socket_dir_for(pgdata) == pgdata
