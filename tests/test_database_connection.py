"""database.connection: the one way a command opens and closes a connection of its own."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from crawler.errors import DatabaseError
from crawler.ledger.database import close_connection, connection


async def backend_alive(dsn: str, pid: int) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        return bool(await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid))
    finally:
        await conn.close()


async def wait_gone(dsn: str, pid: int) -> None:
    for _ in range(200):  # the server notices a closed socket within milliseconds
        if not await backend_alive(dsn, pid):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"backend {pid} still there")


async def test_the_connection_is_closed_when_the_block_ends_or_fails(session_dsn):
    async with connection(session_dsn) as conn:
        pid = conn.get_server_pid()
        assert await conn.fetchval("SELECT 1") == 1
    assert conn.is_closed()
    await wait_gone(session_dsn, pid)

    with pytest.raises(ZeroDivisionError):
        async with connection(session_dsn) as conn:
            pid = conn.get_server_pid()
            raise ZeroDivisionError("the block fails")
    assert conn.is_closed()
    await wait_gone(session_dsn, pid)


async def test_a_cancelled_close_still_lets_the_connection_go(session_dsn):
    conn = await asyncpg.connect(session_dsn)
    pid = conn.get_server_pid()
    closing = asyncio.ensure_future(close_connection(conn))
    await asyncio.sleep(0)  # the graceful close has started: it waits on the server
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert conn.is_closed()
    await wait_gone(session_dsn, pid)


async def test_a_close_that_hangs_is_cut_short(session_dsn):
    conn = await asyncpg.connect(session_dsn)
    pid = conn.get_server_pid()
    # The connection is busy in a long statement: a graceful close waits for it; ours gives up
    # after its timeout and terminates, and the statement ends with the connection.
    busy = asyncio.ensure_future(conn.execute("SELECT pg_sleep(30)"))
    await asyncio.sleep(0.1)
    await asyncio.wait_for(close_connection(conn, timeout=0.2), 10)
    assert conn.is_closed()
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
        await busy
    await wait_gone(session_dsn, pid)


async def test_an_unreachable_database_is_one_sentence():
    with pytest.raises(DatabaseError, match=r"^cannot connect to PostgreSQL at .*\.$"):
        async with connection("postgresql://nobody@127.0.0.1:1/none", timeout=2):
            pass
