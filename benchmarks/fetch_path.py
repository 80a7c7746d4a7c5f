"""What each part of our fetch path costs in CPU, one process, no database: from the bare aiohttp
floor, adding one of our Fetcher's choices at a time, up to our Fetcher itself.

    python benchmarks/fetch_path.py [--urls 50000] [--runs 3] [--server nginx|mock]

Variants (each a fixed pool of `--concurrency` tasks over one session, on uvloop):
  floor        session.get(url) and resp.read(); default session
  timeouts     + ClientTimeout(total, sock_connect, sock_read) as our settings have them
  hashing      + the body read with iter_chunked(64 KiB) into SHA-256, as our Fetcher does
  session      + our session options (User-Agent, DummyCookieJar, max_field_size, redirects)
  fetcher      crawler.fetcher.Fetcher.attempt itself (address policy, resolver, all of the above)
and, to split `hashing`: read-hash (floor + SHA-256 of resp.read()), chunks (floor with
iter_chunked instead of read(), no hash).
Each variant runs in its own process; the figure is that process's CPU seconds per 1 000 requests
while fetching (start-up excluded) and its rate; medians of interleaved runs. 127.0.0.1 only.
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


def _cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


async def _run(variant: str, urls: list[str], concurrency: int) -> dict:
    import aiohttp

    from crawler.settings import Settings

    s = Settings(allow_net=["127.0.0.1/32"], concurrency=concurrency, home="/nonexistent")
    pending = iter(urls)
    ok = 0
    level = VARIANTS.index(variant) if variant in VARIANTS else 0

    if variant == "fetcher":
        from crawler.fetcher import Fetcher

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
        kwargs["timeout"] = aiohttp.ClientTimeout(total=s.total_timeout, sock_connect=s.connect_timeout,
                                                  sock_read=s.read_timeout)
    if level >= 3:
        kwargs.update(headers={"User-Agent": s.user_agent}, cookie_jar=aiohttp.DummyCookieJar(),
                      max_field_size=16384, raise_for_status=False)
    async with aiohttp.ClientSession(**kwargs) as session:
        async def one() -> None:
            nonlocal ok
            for url in pending:
                options = {"allow_redirects": True, "max_redirects": s.max_redirects} if level >= 3 else {}
                async with session.get(url, **options) as resp:
                    if variant == "read-hash":
                        hashlib.sha256(await resp.read()).digest()
                    elif variant == "chunks":
                        async for block in resp.content.iter_chunked(64 * 1024):
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


def child(variant: str, path: str, concurrency: int) -> None:
    import uvloop

    with open(path) as fh:
        urls = [u for u in (line.strip() for line in fh) if u and u != "url"]
    print(json.dumps(uvloop.run(_run(variant, urls, concurrency)) | {"requests": len(urls)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--server", choices=["nginx", "mock"], default="nginx")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.concurrency)
        return

    import harness

    harness.print_machine(harness.machine())
    server = harness.Nginx(1) if args.server == "nginx" else harness.MockServer(1)
    if args.server == "nginx" and not server.available:
        server = harness.MockServer(1)
    variants = args.variants.split(",")
    rows: dict[str, list[dict]] = {v: [] for v in variants}
    with server, tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "urls.csv"
        harness.write_urls(path, server.url, args.urls)
        print(f"server: {server.describe()}; {args.urls} URLs, concurrency {args.concurrency}, {args.runs} runs",
              flush=True)
        for run in range(args.runs):
            for variant in variants[run % len(variants):] + variants[:run % len(variants)]:
                done = subprocess.run([sys.executable, __file__, "--concurrency", str(args.concurrency),
                                       "--child", variant, str(path)], capture_output=True, text=True,
                                      timeout=900, cwd=harness.ROOT)
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
