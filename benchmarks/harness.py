"""What the benchmark scripts share: the machine's description, a scratch database, the servers
under test (the project's mock server, nginx when it is on PATH), a timed subprocess with its
resource usage, a sampler of a process tree's memory, and medians.

Importing it compiles the crawler's modules to bytecode (see compile_package): every process of
the crawler is then measured as a regular install runs it.

Every server here listens on 127.0.0.1 only; nothing here sends a request anywhere else.
"""

from __future__ import annotations

import asyncio
import compileall
import datetime as dt
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil

from crawler.mock.bench import MockServerProcess

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = Path(__file__).resolve().parent


def compile_package(root: Path = ROOT) -> None:
    """The crawler's modules compiled to bytecode under `root`, as `pip install` leaves them: an
    editable install under PYTHONDONTWRITEBYTECODE=1 (set on some machines) has none, and every
    process of the crawler, supervisor and workers alike, would compile its modules on start
    (measured: +85 ms to import the supervisor's)."""
    compileall.compile_dir(root / "crawler", quiet=1)


compile_package()


# --- the machine ----------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


async def postgres_version(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()


def machine(dsn: str | None = None) -> dict:
    import aiohttp
    import uvloop

    info = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "uvloop": uvloop.__version__,
        # Other work on the machine skews every figure: the load average says how much there was.
        "load_average_1m": os.getloadavg()[0],
    }
    if dsn:
        info["postgresql"] = asyncio.run(postgres_version(dsn))
    return info


def print_machine(info: dict) -> None:
    print(
        f"machine: {info['cores']} cores ({info['cpu']}), {info['memory_gib']} GiB, {info['os']};"
        f" Python {info['python']}, aiohttp {info['aiohttp']}, uvloop {info['uvloop']}"
        + (f"; PostgreSQL {info['postgresql']}" if "postgresql" in info else "")
        + f"; {info['date']}; load average {info['load_average_1m']:.1f}",
        flush=True,
    )


# --- the database ---------------------------------------------------------------------------


def resolve_dsn(dsn: str | None) -> str:
    """--dsn, else what the crawler itself would use (CRAWLER_DSN, DATABASE_URL, the embedded server)."""
    if dsn:
        return dsn
    done = subprocess.run(
        [sys.executable, "-m", "crawler", "db", "url", "--show-password"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    if done.returncode != 0:
        raise SystemExit(f"benchmarks: cannot find a PostgreSQL: {done.stderr.strip()}")
    return done.stdout.strip()


def _with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


class ScratchDatabase:
    """A database of its own on the given server, migrated, dropped at the end (unless kept), so
    that benchmark jobs neither read nor leave millions of rows in the user's database."""

    def __init__(self, server_dsn: str, *, keep: bool = False) -> None:
        self.server_dsn = server_dsn
        self.keep = keep
        self.name = f"crawler_bench_{uuid.uuid4().hex[:8]}"
        self.dsn = _with_database(server_dsn, self.name)

    async def _create(self) -> None:
        from crawler.ledger.migrate import apply_migrations

        conn = await asyncpg.connect(self.server_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{self.name}"')
        finally:
            await conn.close()
        conn = await asyncpg.connect(self.dsn)
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()

    async def _drop(self) -> None:
        conn = await asyncpg.connect(self.server_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        finally:
            await conn.close()

    def __enter__(self) -> ScratchDatabase:
        asyncio.run(self._create())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.keep:
            print(f"kept the scratch database {self.name}", flush=True)
        else:
            asyncio.run(self._drop())

    def empty(self) -> None:
        """Drop every job (between runs, so each starts from empty tables)."""

        async def run() -> None:
            conn = await asyncpg.connect(self.dsn)
            try:
                # Every ledger table (the response cache included), whatever the migrations made.
                tables = [
                    r["t"]
                    for r in await conn.fetch(
                        "SELECT quote_ident(tablename) AS t FROM pg_tables"
                        " WHERE schemaname = current_schema() AND tablename <> 'schema_migrations'"
                    )
                ]
                if tables:
                    await conn.execute(f"TRUNCATE {', '.join(tables)}")
                await conn.execute("CHECKPOINT")
            finally:
                await conn.close()

        asyncio.run(run())

    def execute(self, sql: str) -> None:
        """Run one or more statements (no parameters)."""

        async def run() -> None:
            conn = await asyncpg.connect(self.dsn)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        asyncio.run(run())

    def query(self, sql: str, *args):
        async def run():
            conn = await asyncpg.connect(self.dsn)
            try:
                return await conn.fetch(sql, *args)
            finally:
                await conn.close()

        return asyncio.run(run())


class PostgresCPU:
    """CPU seconds used by a local PostgreSQL server (postmaster, its live children and the
    backends it has reaped), when its data directory is readable here; else None."""

    def __init__(self, dsn: str) -> None:
        self.pid: int | None = None
        try:
            rows = asyncio.run(self._data_directory(dsn))
            self.pid = int((Path(rows) / "postmaster.pid").read_text().split()[0])
            psutil.Process(self.pid)
        except Exception:
            self.pid = None

    @staticmethod
    async def _data_directory(dsn: str) -> str:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchval("SHOW data_directory")
        finally:
            await conn.close()

    def seconds(self) -> float | None:
        if self.pid is None:
            return None
        try:
            root = psutil.Process(self.pid)
            times = root.cpu_times()
            total = times.user + times.system + times.children_user + times.children_system
            for child in root.children():
                try:
                    t = child.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass
            return total
        except psutil.Error:
            return None


# --- servers under test ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"benchmarks: nothing listens on 127.0.0.1:{port} after {timeout:g}s")


class MockServer(MockServerProcess):
    """`crawler mock-server --processes N` on a free loopback port; answers /ok/<n> with "ok\\n"."""

    name = "mock"

    def __init__(self, processes: int = 1) -> None:
        super().__init__(processes)

    def describe(self) -> str:
        return f"crawler mock-server --processes {self.processes}"


NGINX_CONF = """\
worker_processes {processes};
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 65;
    default_type text/plain;
    server {{
        listen 127.0.0.1:{port} reuseport;
        root {tmp}/www;
        location / {{ try_files /ok.txt =404; }}
    }}
}}
"""


class Nginx:
    """nginx from PATH (never installed here), serving one small static file for every path, on a
    loopback port, with a generated configuration in a temporary directory."""

    name = "nginx"

    def __init__(self, processes: int = 1) -> None:
        self.processes = processes
        self.binary = shutil.which("nginx") or (shutil.which("nginx", path="/usr/sbin:/usr/local/sbin"))
        self.proc: subprocess.Popen | None = None
        self.tmp: tempfile.TemporaryDirectory | None = None
        self.url = ""

    @property
    def available(self) -> bool:
        return self.binary is not None

    def __enter__(self) -> Nginx:
        self.tmp = tempfile.TemporaryDirectory(prefix="crawler-bench-nginx-")
        tmp = Path(self.tmp.name)
        (tmp / "www").mkdir()
        (tmp / "www" / "ok.txt").write_text("ok\n")
        # nginx's workers may run as an unprivileged user: they must be able to read the file.
        for path in (tmp, tmp / "www"):
            path.chmod(0o755)
        (tmp / "www" / "ok.txt").chmod(0o644)
        port = free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(processes=self.processes, tmp=tmp, port=port))
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(conf), "-p", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            wait_listening(port)
        except SystemExit:
            self.__exit__()
            raise
        self.url = f"http://127.0.0.1:{port}"
        return self

    cpu_seconds = MockServerProcess.cpu_seconds  # the CPU of self.proc and its children: nginx's workers

    def describe(self) -> str:
        version = subprocess.run([self.binary, "-v"], capture_output=True, text=True).stderr.strip()
        return f"{version.split(':', 1)[-1].strip()} (worker_processes {self.processes}, static file)"

    def __exit__(self, *exc: object) -> None:
        stop(self.proc)
        if self.tmp is not None:
            self.tmp.cleanup()


def http_server(kind: str) -> Nginx | MockServer:
    """The server under test: nginx (one worker, a static file) where installed, else, or when
    `kind` is "mock", the crawler's own mock server (one process)."""
    if kind == "nginx":
        server = Nginx(1)
        if server.available:
            return server
    return MockServer(1)


def export_revision(revision: str, dest: str, paths: tuple[str, ...] = ("crawler", "migrations", "config")) -> None:
    """The project's `paths` as of a git revision, unpacked under `dest` (which must exist), to put
    first on a child's PYTHONPATH."""
    archive = subprocess.run(["git", "archive", revision, *paths], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    compile_package(Path(dest))


def callgrind_instructions(stderr: str) -> int | None:
    """The instruction count in `valgrind --tool=callgrind`'s closing lines, if any."""
    found = re.search(r"Collected : (\d+)", stderr)
    return int(found.group(1)) if found else None


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# --- running and measuring --------------------------------------------------------------------


class Watcher:
    """A daemon thread that runs `_run` from entering the block until leaving it, when `_stop` is
    set and the thread joined. Subclasses poll every `interval` seconds until `_stop`."""

    def __init__(self, *, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        raise NotImplementedError


class SpeedProbe(Watcher):
    """How fast this machine runs code right now: every `interval` seconds, the CPU time (not the
    wall time) of one fixed loop in this thread (1.3-2 ms here). On a shared virtual machine the
    same instructions take up to 1.5 times as long from one minute to the next; runs compared in
    different states compare the machine, not the programs. `median_ms` is the run's state."""

    LOOPS = 20_000

    def __init__(self, *, interval: float = 0.25) -> None:
        super().__init__(interval=interval)
        self.samples: list[float] = []

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            started = time.thread_time()
            x = 0
            for i in range(self.LOOPS):
                x += i * i % 7
            self.samples.append((time.thread_time() - started) * 1000)

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


class TreeSampler(Watcher):
    """Samples the resident memory of a process and its descendants every `interval` seconds in a
    thread: the peak of each process, and the peak of their sum (what the tree held at once).
    Processes whose command line contains one of `exclude` (and their children) are left out."""

    def __init__(self, pid: int, *, interval: float = 0.1, exclude: tuple[str, ...] = ()) -> None:
        super().__init__(interval=interval)
        self.pid = pid
        self.exclude = exclude
        self.peaks: dict[int, tuple[str, int]] = {}
        self.peak_total = 0

    def _tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return []
        keep, skip = [root], set()
        try:
            children = root.children(recursive=True)
        except psutil.Error:  # the root ended between the two calls
            return []
        for child in children:
            try:
                cmd = " ".join(child.cmdline())
                parent = child.ppid()
            except psutil.Error:
                continue
            if parent in skip or any(word in cmd for word in self.exclude):
                skip.add(child.pid)
            else:
                keep.append(child)
        return keep

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for proc in self._tree():
                try:
                    rss = proc.memory_info().rss
                    name = self.peaks.get(proc.pid, (None,))[0] or _role(proc)
                except psutil.Error:
                    continue
                total += rss
                if rss > self.peaks.get(proc.pid, ("", 0))[1]:
                    self.peaks[proc.pid] = (name, rss)
            self.peak_total = max(self.peak_total, total)
            self._stop.wait(self.interval)


def _role(proc: psutil.Process) -> str:
    cmd = " ".join(proc.cmdline())
    if "multiprocessing.spawn" in cmd or "spawn_main" in cmd:
        return "worker"
    if "resource_tracker" in cmd:
        return "resource_tracker"
    return "main"


@dataclass
class Timed:
    returncode: int
    wall_s: float
    cpu_s: float  # of the process and the children it waited for
    maxrss_bytes: int  # the largest of those processes
    stdout: str
    stderr: str
    peaks: dict = field(default_factory=dict)
    peak_total_rss: int = 0
    load_1m: float = 0.0  # the machine's load average when the run ended


def run_timed(
    cmd: list[str],
    *,
    timeout: float,
    env: dict | None = None,
    sample_exclude: tuple[str, ...] | None = None,
    cwd: Path = ROOT,
) -> Timed:
    """Run a command to its end (killed after `timeout`), with its wall time and resource usage;
    with `sample_exclude` set, also the sampled peak RSS of its process tree."""
    out = tempfile.TemporaryFile(mode="w+")
    err = tempfile.TemporaryFile(mode="w+")
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
    sampler = TreeSampler(proc.pid, exclude=sample_exclude) if sample_exclude is not None else None
    if sampler:
        sampler.__enter__()
    deadline = started + timeout
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                kill_tree(proc.pid)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
    finally:
        if sampler:
            sampler.__exit__()
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    return Timed(
        proc.returncode,
        wall,
        usage.ru_utime + usage.ru_stime,
        usage.ru_maxrss * 1024,
        out.read(),
        err.read(),
        dict(sampler.peaks) if sampler else {},
        sampler.peak_total if sampler else 0,
        os.getloadavg()[0],
    )


def kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.Error:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def mib(n: float | None) -> str:
    return "?" if n is None else f"{n / 2**20:.0f}"


def write_urls(path: Path, base: str, count: int, *, latency_ms: int = 0) -> None:
    """The same file `crawler bench` makes (CSV with a `url` header), no duplicates."""
    from crawler.mock.bench import write_urls as bench_urls

    bench_urls(path, base, count, 0.0, latency_ms)
