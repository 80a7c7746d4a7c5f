"""The mock HTTP server that tests and load tests crawl: every answer is decided by the path alone.

It listens on loopback by default and must never make an outbound request of its own.
"""

import argparse
import asyncio
import multiprocessing
import os
import signal
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_ready

import uvloop
from aiohttp import web

HITS = web.AppKey("hits", Counter)  # request path -> how many requests it got
SEED = web.AppKey("seed", int)  # for seeded random knobs; nothing uses it yet

MAX_DELAY_MS = 60_000
MAX_BYTES = 1 << 30
MAX_REDIRECTS = 1_000
CHUNK_SIZE = 64 * 1024
# Byte i of every /bytes body is i % 256; the chunk is a whole number of 256-byte cycles so that
# slicing it keeps the pattern aligned.
_PATTERN = bytes(range(256)) * (CHUNK_SIZE // 256)
_STATS_PATHS = frozenset({"/__hits", "/__hits/reset"})
_STARTUP_TIMEOUT_S = 30.0
_CHILD_EXIT_TIMEOUT_S = 5.0


def _int_param(request: web.Request, name: str, low: int, high: int) -> int:
    raw = request.match_info[name]
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer, got {raw!r}\n") from None
    if not low <= value <= high:
        raise web.HTTPBadRequest(text=f"{name} must be between {low} and {high}, got {value}\n")
    return value


@web.middleware
async def _count_hits(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    # Counted on arrival, before the handler, so a request the client gives up on still counts.
    if request.path not in _STATS_PATHS:
        request.app[HITS][request.path] += 1
    return await handler(request)


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _status(request: web.Request) -> web.Response:
    # 1xx codes are sent as if final; most clients then wait for a final response that never comes.
    code = _int_param(request, "code", 100, 599)
    return web.Response(status=code, text=f"{code}\n")


async def _delay(request: web.Request) -> web.Response:
    ms = _int_param(request, "ms", 0, MAX_DELAY_MS)
    await asyncio.sleep(ms / 1000)
    return web.Response(text="ok\n")


async def _bytes(request: web.Request) -> web.StreamResponse:
    n = _int_param(request, "n", 0, MAX_BYTES)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = n  # a known length, not chunked, so clients can check truncation
    await response.prepare(request)
    if request.method != "HEAD":
        for start in range(0, n, CHUNK_SIZE):
            await response.write(_PATTERN[: min(CHUNK_SIZE, n - start)])
    await response.write_eof()
    return response


async def _redirect(request: web.Request) -> web.Response:
    n = _int_param(request, "n", 0, MAX_REDIRECTS)
    if n == 0:
        return web.Response(text="ok\n")
    return web.Response(status=302, headers={"Location": f"/redirect/{n - 1}"})


async def _hits(request: web.Request) -> web.Response:
    hits = request.app[HITS]
    return web.json_response({"total": hits.total(), "paths": dict(hits)})


async def _reset_hits(request: web.Request) -> web.Response:
    request.app[HITS].clear()
    return web.json_response({"total": 0, "paths": {}})


def create_app(seed: int = 0) -> web.Application:
    """The mock application; hit counts live in app[HITS], one counter per process."""
    app = web.Application(middlewares=[_count_hits])
    app[HITS] = Counter()
    app[SEED] = seed
    # "{rest:(/.*)?}" accepts both "/ok" and "/ok/anything", but not "/okay".
    app.router.add_route("GET", "/__hits", _hits)
    app.router.add_route("POST", "/__hits/reset", _reset_hits)
    for method in ("GET", "HEAD", "POST"):
        app.router.add_route(method, r"/ok{rest:(/.*)?}", _ok)
        app.router.add_route(method, "/status/{code}", _status)
        app.router.add_route(method, r"/delay/{ms}{rest:(/.*)?}", _delay)
        app.router.add_route(method, "/bytes/{n}", _bytes)
        app.router.add_route(method, "/redirect/{n}", _redirect)
    return app


def _base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def start_mock_server(
    host: str = "127.0.0.1", port: int = 0, seed: int = 0
) -> tuple[web.AppRunner, str]:
    """Start the app on the running loop; returns (runner, base URL). Call runner.cleanup()."""
    runner = web.AppRunner(create_app(seed), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, _base_url(host, runner.addresses[0][1])


@asynccontextmanager
async def running_mock_server(
    host: str = "127.0.0.1", port: int = 0, seed: int = 0
) -> AsyncIterator[str]:
    """start_mock_server as a context manager: yields the base URL, stops the server on exit."""
    runner, url = await start_mock_server(host, port, seed)
    try:
        yield url
    finally:
        await runner.cleanup()


async def _serve_until_signalled(
    host: str, port: int, seed: int, reuse_port: bool, on_listening: Callable[[int], None]
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(create_app(seed), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_port=reuse_port).start()
        on_listening(runner.addresses[0][1])
        await stop.wait()
    finally:
        await runner.cleanup()


def _run_in_process(
    host: str, port: int, seed: int, reuse_port: bool, on_listening: Callable[[int], None]
) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve_until_signalled(host, port, seed, reuse_port, on_listening))


def _run_child(host: str, port: int, seed: int, ready: Connection) -> None:
    # `ready` is the write end of a multiprocessing Pipe: one message tells the parent we listen.
    _run_in_process(host, port, seed, True, lambda _port: ready.send(os.getpid()))


def _announce(host: str, port: int, processes: int, ready: Callable[[str], None] | None) -> None:
    url = _base_url(host, port)
    noun = "process" if processes == 1 else "processes"
    print(f"mock server listening on {url} ({processes} {noun})", flush=True)
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
    host: str, port: int, processes: int, seed: int, ready: Callable[[str], None] | None
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
            child = context.Process(target=_run_child, args=(host, port, seed, send), daemon=True)
            child.start()
            send.close()
            children.append(child)
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
            _announce(host, port, processes, ready)
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
) -> None:
    """Serve until SIGINT or SIGTERM; `ready(base_url)` is called once every process listens.

    With processes > 1 each child binds the port with SO_REUSEPORT and the kernel spreads the
    connections; the hit counts are then per process. Must run in the main thread (signals).
    """
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    if processes == 1:
        _run_in_process(host, port, seed, False, lambda bound: _announce(host, bound, 1, ready))
    else:
        _serve_processes(host, port, processes, seed, ready)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crawler.mock_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.processes, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
