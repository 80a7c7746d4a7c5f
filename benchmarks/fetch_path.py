"""What each part of our fetch path costs in CPU, one process, no database: from the bare aiohttp
floor, adding one of our Fetcher's choices at a time, up to our Fetcher itself.

    python benchmarks/fetch_path.py [--urls 50000] [--runs 3] [--server nginx|mock]

Variants (each a fixed pool of `--concurrency` tasks over one session, on uvloop):
  floor        session.get(url) and resp.read(); default session
  timeouts     + ClientTimeout(total, sock_connect, sock_read) as our settings have them
  hashing      + the body read with iter_chunked(64 KiB) into SHA-256, as our Fetcher does
  session      + our session options (User-Agent, DummyCookieJar, max_field_size, redirects)
  fetcher      crawler.fetch.fetcher.Fetcher.attempt itself (address policy, resolver, all of the above)
and, to split `hashing`: read-hash (floor + SHA-256 of resp.read()), chunks (floor with
iter_chunked instead of read(), no hash); and fetcher-base: the Fetcher of git revision
`--baseline` (default HEAD), to set a change to crawler/fetch/fetcher.py against the committed one,
interleaved in the same run (e.g. `--variants fetcher-base,fetcher --runs 5`).
Each variant runs in its own process; the figure is that process's CPU seconds per 1 000 requests
while fetching (start-up excluded) and its rate; medians of interleaved runs. 127.0.0.1 only.

With --callgrind each variant instead runs under `valgrind --tool=callgrind` twice, with --urls and
with 3 x --urls URLs (e.g. --urls 1000): the difference in instructions executed, over the
difference in requests, is the instructions per request with start-up cancelled out. Other load on
the machine barely moves it, unlike CPU seconds (valgrind slows the client 30-50x, so responses
queue up more than at full speed: compare variants with each other, not with CPU figures).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("floor", "timeouts", "hashing", "session", "fetcher")
EXTRA = ("read-hash", "chunks")  # the hashing step split in two, for comparison
BASELINE = "fetcher-base"  # crawler/fetch/fetcher.py as of --baseline, loaded from git


def _baseline_fetcher(revision: str) -> type:
    """The Fetcher class of crawler/fetch/fetcher.py at a git revision, as a module of its own."""
    import types

    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{revision}:crawler/fetch/fetcher.py"], cwd=root, check=True, capture_output=True, text=True
    ).stdout
    module = types.ModuleType("crawler_fetcher_baseline")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{revision}:crawler/fetch/fetcher.py", "exec"), module.__dict__)
    return module.Fetcher


def _cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


async def _run(variant: str, urls: list[str], concurrency: int, baseline: str = "HEAD") -> dict:
    import aiohttp

    from crawler.settings import Settings

    s = Settings(allow_net=["127.0.0.1/32"], concurrency=concurrency, home="/nonexistent")
    pending = iter(urls)
    ok = 0
    level = VARIANTS.index(variant) if variant in VARIANTS else 0

    if variant in ("fetcher", BASELINE):
        if variant == BASELINE:
            Fetcher = _baseline_fetcher(baseline)
        else:
            from crawler.fetch.fetcher import Fetcher

        async with Fetcher(s) as fetcher:

            async def one() -> None:
                nonlocal ok
                for url in pending:
                    attempt = await fetcher.attempt("GET", url)
                    ok += attempt.status == 200

            cpu0, t0 = _cpu(), time.perf_counter()
            await asyncio.gather(*(one() for _ in range(concurrency)))
            return {"cpu_s": _cpu() - cpu0, "wall_s": time.perf_counter() - t0, "ok": ok}

    kwargs: dict = {"connector": aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)}
    if level >= 1:
        kwargs["timeout"] = aiohttp.ClientTimeout(
            total=s.total_timeout, sock_connect=s.connect_timeout, sock_read=s.read_timeout
        )
    if level >= 3:
        kwargs.update(
            headers={"User-Agent": s.user_agent},
            cookie_jar=aiohttp.DummyCookieJar(),
            max_field_size=16384,
            raise_for_status=False,
        )
    async with aiohttp.ClientSession(**kwargs) as session:

        async def one() -> None:
            nonlocal ok
            for url in pending:
                options = {"allow_redirects": True, "max_redirects": s.max_redirects} if level >= 3 else {}
                async with session.get(url, **options) as resp:
                    if variant == "read-hash":
                        hashlib.sha256(await resp.read()).digest()
                    elif variant == "chunks":
                        async for _block in resp.content.iter_chunked(64 * 1024):
                            pass
                    elif level >= 2:
                        digest = hashlib.sha256()
                        async for block in resp.content.iter_chunked(64 * 1024):
                            digest.update(block)
                        digest.digest()
                        str(resp.url)
                    else:
                        await resp.read()
                    ok += resp.status == 200

        cpu0, t0 = _cpu(), time.perf_counter()
        await asyncio.gather(*(one() for _ in range(concurrency)))
        return {"cpu_s": _cpu() - cpu0, "wall_s": time.perf_counter() - t0, "ok": ok}


def child(variant: str, path: str, concurrency: int, baseline: str) -> None:
    import uvloop

    with open(path) as fh:
        urls = [u for u in (line.strip() for line in fh) if u and u != "url"]
    print(json.dumps(uvloop.run(_run(variant, urls, concurrency, baseline)) | {"requests": len(urls)}))


def callgrind(variant: str, path: Path, args: argparse.Namespace, tmp: str) -> int:
    """Instructions the child executed (all of it: start-up, fetching, exit) under callgrind."""
    out = Path(tmp) / "callgrind.out"
    done = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            __file__,
            "--concurrency",
            str(args.concurrency),
            "--baseline",
            args.baseline,
            "--child",
            variant,
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    import harness  # the parent's side only: children import no harness

    collected = harness.callgrind_instructions(done.stderr)
    if done.returncode != 0 or collected is None:
        raise SystemExit(f"fetch_path: {variant} under callgrind failed: {done.stderr[-2000:]}")
    out.unlink(missing_ok=True)
    return collected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--server", choices=["nginx", "mock"], default="nginx")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--baseline", default="HEAD", help=f"git revision of the {BASELINE} variant")
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="instructions per request under callgrind, from --urls and 3 x --urls URLs",
    )
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.concurrency, args.baseline)
        return

    import harness

    harness.print_machine(harness.machine())
    server = harness.http_server(args.server)
    variants = args.variants.split(",")
    rows: dict[str, list[dict]] = {v: [] for v in variants}
    if args.callgrind:
        with server, tempfile.TemporaryDirectory() as tmp:
            small, large = Path(tmp) / "small.csv", Path(tmp) / "large.csv"
            harness.write_urls(small, server.url, args.urls)
            harness.write_urls(large, server.url, 3 * args.urls)
            print(
                f"server: {server.describe()}; callgrind, {args.urls} and {3 * args.urls} URLs,"
                f" concurrency {args.concurrency}, {args.runs} runs",
                flush=True,
            )
            per_request: dict[str, list[float]] = {v: [] for v in variants}
            for run in range(args.runs):
                for variant in variants[run % len(variants) :] + variants[: run % len(variants)]:
                    ir = callgrind(variant, large, args, tmp) - callgrind(variant, small, args, tmp)
                    per_request[variant].append(ir / (2 * args.urls))
                    print(f"  {variant}: {per_request[variant][-1]:,.0f} instructions per request", flush=True)
        print("\n| variant | instructions per request (median) | vs first | runs |\n|---|---|---|---|")
        first = None
        for variant in variants:
            ir = harness.median(per_request[variant])
            first = first or ir
            runs = ", ".join(f"{x / 1000:,.0f} k" for x in per_request[variant])
            print(f"| {variant} | {ir:,.0f} | {ir / first:.3f}x | {runs} |")
        return
    with server, tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "urls.csv"
        harness.write_urls(path, server.url, args.urls)
        print(
            f"server: {server.describe()}; {args.urls} URLs, concurrency {args.concurrency}, {args.runs} runs",
            flush=True,
        )
        for run in range(args.runs):
            for variant in variants[run % len(variants) :] + variants[: run % len(variants)]:
                done = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--concurrency",
                        str(args.concurrency),
                        "--baseline",
                        args.baseline,
                        "--child",
                        variant,
                        str(path),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=900,
                    cwd=harness.ROOT,
                )
                if done.returncode != 0:
                    raise SystemExit(f"fetch_path: {variant} failed: {done.stderr[-2000:]}")
                rows[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("\n| variant | CPU s per 1 000 requests | vs floor | requests/s | all ok |\n|---|---|---|---|---|")
    floor = None
    for variant in variants:
        cpu_k = harness.median([1000 * r["cpu_s"] / r["requests"] for r in rows[variant]])
        rate = harness.median([r["requests"] / r["wall_s"] for r in rows[variant]])
        floor = floor or cpu_k
        ok = all(r["ok"] == r["requests"] for r in rows[variant])
        print(f"| {variant} | {cpu_k:.3f} | {cpu_k / floor:.2f}x | {rate:,.0f} | {'yes' if ok else 'NO'} |")


if __name__ == "__main__":
    main()
