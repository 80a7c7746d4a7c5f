"""The mock HTTP server that tests and load tests crawl: every answer is decided by the path alone.

It listens on loopback by default and must never make an outbound request of its own. What each
path answers is in crawler/mock/behaviours.py; this module counts and limits the load, and serves the app.

Path                 Answer
GET /__hits          {"total": n, "paths": {path: hits}}: requests per path, counted on arrival
                     (with --no-path-hits, "paths" holds only the flaky paths; "total" all)
POST /__hits/reset   clears the hits (flaky paths then fail again)
GET /__stats         {"in_flight", "max_in_flight", "rejected", "capacity", "hits": <as /__hits>}
POST /__stats/reset  clears the hits and `rejected`; `max_in_flight` restarts from `in_flight`
GET /__arrivals      {"arrivals": [[unix time, path], ...]}: when each routed request arrived (the
                     last ARRIVALS_KEPT; the plain /ok and /delay targets are not routed), for
                     tests that check a pace on the server's side; cleared with the hits

With a capacity N, a request that arrives while N others are in flight in this process gets 503
at once ("over capacity"); it still counts as a hit. The four paths above are never counted,
limited or seen as in flight. All counts are per process. Counting every path costs memory in
proportion to the distinct paths (about 110 bytes each, over 300 MiB at 3 M): a load test of
millions of URLs turns it off (--no-path-hits) and keeps the total. A served process answers
the load test's /ok and /delay paths without routing them, the same answer for less CPU.

With --tls every process serves HTTPS with one certificate made at start (crawler/mock/tls.py),
its CA written for the crawler's --ca-file. With --report each process prints one JSON line
when it stops: the connections it accepted (with TLS, the handshakes completed).
"""

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_ready
from pathlib import Path
from typing import Any

import orjson
import uvloop
from aiohttp import hdrs, web

from crawler.mock import behaviours
from crawler.mock.behaviours import (
    COUNTED_PREFIXES,
    HITS,
    MAX_DELAY_MS,
    METHODS,
    PLAIN_LOAD_TARGET,
    ROBOTS,
    SEED,
    Handler,
    add_routes,
    answer_after,
    robots_knob,
)
from crawler.mock.options import add_server_flags
from crawler.mock.tls import ServerCertificate, generate_certificate

_STATS_PATHS = frozenset({"/__hits", "/__hits/reset", "/__stats", "/__stats/reset", "/__arrivals"})
ARRIVALS_KEPT = 10_000
# What the low-level server calls for each request (its request_handler).
ServerHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
ARRIVALS = web.AppKey("arrivals", deque)  # (time.time(), path) of each routed request, the latest kept
_STARTUP_TIMEOUT_S = 30.0
_CHILD_EXIT_TIMEOUT_S = 5.0


@dataclass(slots=True)
class ServerLoad:
    """Requests in flight in this process, how many the capacity limit turned away, and, unless
    every path is counted, the hits counted only in the total."""

    capacity: int | None = None
    in_flight: int = 0
    max_in_flight: int = 0
    rejected: int = 0
    count_paths: bool = True
    unlisted_hits: int = 0
    connections: int = 0  # accepted (with TLS: handshakes completed), printed when the process stops


LOAD = web.AppKey("load", ServerLoad)


@dataclass(frozen=True, slots=True)
class Listening:
    """How every process listens: over TLS with this certificate (None: plain HTTP), and whether
    it prints what it counted when it stops (picklable, for the child processes)."""

    tls: ServerCertificate | None = None
    report: bool = False


PLAIN = Listening()


async def _accounted(
    app: web.Application, path: str, answer: Callable[[], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """`answer()`, counted and limited: every request but the stats endpoint's goes through here."""
    # Counted on arrival, before the answer, so a request the client gives up on still counts.
    load = app[LOAD]
    if load.count_paths or path.startswith(COUNTED_PREFIXES):
        app[HITS][path] += 1
    else:
        load.unlisted_hits += 1
    if load.capacity is not None and load.in_flight >= load.capacity:
        load.rejected += 1
        return web.Response(status=503, text="over capacity\n")
    load.in_flight += 1
    load.max_in_flight = max(load.max_in_flight, load.in_flight)
    try:
        return await answer()
    finally:
        load.in_flight -= 1


@web.middleware
async def _account(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in _STATS_PATHS:
        return await handler(request)
    request.app[ARRIVALS].append((time.time(), request.path))
    return await _accounted(request.app, request.path, partial(handler, request))


def _hits_json(app: web.Application) -> dict[str, object]:
    hits = app[HITS]
    return {"total": hits.total() + app[LOAD].unlisted_hits, "paths": dict(hits)}


def _clear_hits(app: web.Application) -> None:
    app[HITS].clear()
    app[ARRIVALS].clear()
    app[LOAD].unlisted_hits = 0


async def _hits(request: web.Request) -> web.Response:
    return web.json_response(_hits_json(request.app))


async def _reset_hits(request: web.Request) -> web.Response:
    _clear_hits(request.app)
    return await _hits(request)


async def _stats(request: web.Request) -> web.Response:
    load = request.app[LOAD]
    return web.json_response({
        "in_flight": load.in_flight,
        "max_in_flight": load.max_in_flight,
        "rejected": load.rejected,
        "capacity": load.capacity,
        "hits": _hits_json(request.app),
    })  # fmt: skip


async def _arrivals(request: web.Request) -> web.Response:
    arrivals: deque = request.app[ARRIVALS]
    return web.json_response({"arrivals": list(arrivals)})


async def _reset_stats(request: web.Request) -> web.Response:
    load = request.app[LOAD]
    load.max_in_flight = load.in_flight
    load.rejected = 0
    _clear_hits(request.app)
    return await _stats(request)


def create_app(
    seed: int = 0, capacity: int | None = None, count_paths: bool = True, robots: str = "none"
) -> web.Application:
    """The mock application; counts live in app[HITS] and app[LOAD], per process.

    `seed` decides the seeded answers (/random, /garbage-bytes); `capacity` (None: no limit) is
    how many requests may be in flight at once before the next one gets 503. Without
    `count_paths`, hits are counted by path only for the flaky paths, which need it; the total
    still counts every hit. `robots` says what /robots.txt answers (mock_behaviours' table).
    """
    robots_knob(robots)  # a bad knob fails here, not at the first request
    if capacity is not None and capacity < 0:
        raise ValueError(f"capacity must be at least 0, got {capacity}")
    app = web.Application(middlewares=[_account])
    app[HITS] = Counter()
    app[SEED] = seed
    app[ROBOTS] = robots
    app[ARRIVALS] = deque(maxlen=ARRIVALS_KEPT)
    app[LOAD] = ServerLoad(capacity=capacity, count_paths=count_paths)
    app.router.add_route("GET", "/__hits", _hits)
    app.router.add_route("POST", "/__hits/reset", _reset_hits)
    app.router.add_route("GET", "/__stats", _stats)
    app.router.add_route("POST", "/__stats/reset", _reset_stats)
    app.router.add_route("GET", "/__arrivals", _arrivals)
    add_routes(app)
    return app


def _answering_plain_load_paths(app: web.Application, routed: ServerHandler) -> ServerHandler:
    """The serving process's request handler: a plain /ok/.. or /delay/{ms}/.. target (see
    PLAIN_LOAD_TARGET) is answered without aiohttp's router and middleware, which are a fifth
    of the server's instructions per request, and counted and limited the same; every other
    request is routed. A load test then measures the crawler more than its mock server."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        plain = PLAIN_LOAD_TARGET.fullmatch(request.raw_path)
        if plain is None or request.method not in METHODS or hdrs.EXPECT in request.headers:
            return await routed(request)
        ms = int(plain["ms"] or 0)
        if ms > MAX_DELAY_MS:
            return await routed(request)  # for its 400
        return await _accounted(app, request.path, partial(answer_after, ms))

    return handle


async def serving_runner(app: web.Application) -> web.AppRunner:
    """The app's runner, set up as the mock server serves it; add a site, then runner.cleanup()."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    server = runner.server
    assert server is not None
    server.request_handler = _answering_plain_load_paths(app, server.request_handler)
    load, made = app[LOAD], server.connection_made

    def connection_made(handler: Any, transport: Any) -> None:
        # Called once the connection is ready for HTTP: with TLS, after the handshake.
        load.connections += 1
        made(handler, transport)

    server.connection_made = connection_made  # type: ignore[method-assign]
    return runner


def _base_url(host: str, port: int, tls: bool = False) -> str:
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


async def start_mock_server(
    host: str = "127.0.0.1",
    port: int = 0,
    seed: int = 0,
    capacity: int | None = None,
    count_paths: bool = True,
    robots: str = "none",
    tls: ServerCertificate | None = None,
) -> tuple[web.AppRunner, str]:
    """Start the app on the running loop; returns (runner, base URL). Call runner.cleanup().
    With `tls` (mock_tls.generate_certificate()), it serves HTTPS with that certificate."""
    runner = await serving_runner(create_app(seed, capacity, count_paths, robots))
    try:
        await web.TCPSite(runner, host, port, ssl_context=tls.server_context() if tls else None).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, _base_url(host, runner.addresses[0][1], tls is not None)


@asynccontextmanager
async def running_mock_server(
    host: str = "127.0.0.1",
    port: int = 0,
    seed: int = 0,
    capacity: int | None = None,
    robots: str = "none",
) -> AsyncIterator[str]:
    """start_mock_server as a context manager: yields the base URL, stops the server on exit."""
    runner, url = await start_mock_server(host, port, seed, capacity, robots=robots)
    try:
        yield url
    finally:
        await runner.cleanup()


AppFactory = Callable[[], web.Application]  # picklable (a partial of create_app) for children


async def _serve_until_signalled(
    host: str,
    port: int,
    make_app: AppFactory,
    reuse_port: bool,
    on_listening: Callable[[int], None],
    listening: Listening = PLAIN,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tls = listening.tls
    runner = await serving_runner(make_app())
    try:
        context = tls.server_context() if tls else None
        await web.TCPSite(runner, host, port, reuse_port=reuse_port, ssl_context=context).start()
        on_listening(runner.addresses[0][1])
        await stop.wait()
    finally:
        await runner.cleanup()
        if listening.report:  # one line per process, read by `crawler bench` once it stopped the server
            # One write of the whole line: print() writes the text and its newline apart, and on
            # an unbuffered stdout (PYTHONUNBUFFERED) two processes' lines then interleave.
            line = orjson.dumps({"connections": runner.app[LOAD].connections, "tls": tls is not None}) + b"\n"
            sys.stdout.flush()  # whatever the text layer holds goes first
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()


def _run_in_process(
    host: str,
    port: int,
    make_app: AppFactory,
    reuse_port: bool,
    on_listening: Callable[[int], None],
    listening: Listening = PLAIN,
) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve_until_signalled(host, port, make_app, reuse_port, on_listening, listening))


def _run_child(host: str, port: int, make_app: AppFactory, ready: Connection, listening: Listening = PLAIN) -> None:
    # `ready` is the write end of a multiprocessing Pipe: one message tells the parent we listen.
    _run_in_process(host, port, make_app, True, lambda _port: ready.send(os.getpid()), listening)


def _announce(
    host: str, port: int, processes: int, ready: Callable[[str], None] | None, ca_file: Path | None = None
) -> None:
    url = _base_url(host, port, ca_file is not None)
    noun = "process" if processes == 1 else "processes"
    trust = f"; trust the CA in {ca_file}" if ca_file is not None else ""
    print(f"mock server listening on {url} ({processes} {noun}{trust})", flush=True)
    if ready is not None:
        ready(url)


def _reserve_port(host: str, port: int) -> socket.socket:
    # Bound but never listening, so it takes no connections; with SO_REUSEPORT the children can
    # bind the same port, and holding it stops anyone else taking a port-0 pick meanwhile.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _serve_processes(
    host: str,
    port: int,
    processes: int,
    make_app: AppFactory,
    ready: Callable[[str], None] | None,
    listening: Listening = PLAIN,
    ca_file: Path | None = None,
) -> None:
    # The parent only supervises: a signal or any child's exit stops all children.
    stopping = False
    wakeup_read, wakeup_write = os.pipe()
    os.set_blocking(wakeup_write, False)

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous_wakeup = signal.set_wakeup_fd(wakeup_write)  # so wait() below returns on a signal
    context = multiprocessing.get_context("spawn")
    children: list[multiprocessing.process.BaseProcess] = []
    reserved = _reserve_port(host, port)
    try:
        port = reserved.getsockname()[1]
        ready_ends: list[Connection] = []
        for _ in range(processes):
            receive, send = context.Pipe(duplex=False)
            spawned = context.Process(target=_run_child, args=(host, port, make_app, send, listening), daemon=True)
            spawned.start()
            send.close()
            children.append(spawned)
            ready_ends.append(receive)
        sentinels = [wakeup_read, *(child.sentinel for child in children)]
        pending = set(ready_ends)
        while pending and not stopping:
            woke = wait_for_ready([*pending, *sentinels], _STARTUP_TIMEOUT_S)
            if not woke or any(not child.is_alive() for child in children):
                raise RuntimeError("a mock server process failed to start; see its error above")
            for end in pending.intersection(woke):
                end.recv()
                pending.discard(end)
        reserved.close()
        if not stopping:
            _announce(host, port, processes, ready, ca_file)
        while not stopping and all(child.is_alive() for child in children):
            if wakeup_read in wait_for_ready(sentinels):
                os.read(wakeup_read, 4096)  # the signal byte; `stopping` says what happened
        if not stopping:
            raise RuntimeError("a mock server process exited on its own; stopping the others")
    finally:
        reserved.close()
        for child in children:
            if child.is_alive():
                child.terminate()
        for child in children:
            child.join(_CHILD_EXIT_TIMEOUT_S)
            if child.is_alive():
                child.kill()
                child.join()
        signal.set_wakeup_fd(previous_wakeup)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(wakeup_read)
        os.close(wakeup_write)


def serve(
    host: str = "127.0.0.1",
    port: int = 8080,
    processes: int = 1,
    seed: int = 0,
    ready: Callable[[str], None] | None = None,
    capacity: int | None = None,
    count_paths: bool = True,
    robots: str = "none",
    tls: bool = False,
    ca_file: str | Path | None = None,
    report: bool = False,
) -> None:
    """Serve until SIGINT or SIGTERM; `ready(base_url)` is called once every process listens.

    With `tls`, a certificate made now (mock_tls) serves HTTPS in every process; its CA is
    written to `ca_file` (a temporary file, removed at the end, if none is given) for the
    crawler's --ca-file.

    With processes > 1 each child binds the port with SO_REUSEPORT and the kernel spreads the
    connections; hit counts, flaky paths and the capacity are then per process. Must run in the
    main thread (signals).
    """
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    make_app = partial(create_app, seed, capacity, count_paths, robots)
    make_app()  # a bad capacity fails here, in the caller, rather than in every child
    with contextlib.ExitStack() as cleanup:
        certificate = written = None
        if tls:
            certificate = generate_certificate()
            if ca_file is None:
                fd, ca_file = tempfile.mkstemp(prefix="crawler-mock-ca-", suffix=".pem")
                os.close(fd)
                cleanup.callback(os.unlink, ca_file)
            written = certificate.write_ca(ca_file)
        listening = Listening(certificate, report)
        if processes == 1:
            _run_in_process(
                host, port, make_app, False, lambda bound: _announce(host, bound, 1, ready, written), listening
            )
        else:
            _serve_processes(host, port, processes, make_app, ready, listening, written)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crawler.mock.server",
        description=f"{__doc__}\n{behaviours.__doc__}",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the path tables as written
    )
    add_server_flags(parser)
    args = parser.parse_args(argv)
    try:
        robots_knob(args.robots)
    except ValueError as exc:
        parser.error(str(exc))
    serve(
        args.host,
        args.port,
        args.processes,
        args.seed,
        capacity=args.capacity,
        count_paths=args.count_paths,
        robots=args.robots,
        tls=args.tls,
        ca_file=args.ca_out,
        report=args.report,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
