"""Name lookups alone, through the worker's resolver (crawler/fetch/resolver.py) against the bench's DNS
responder on loopback (a separate process): names per second, questions per name, and how much
the process grows over N names, with c-ares channels replaced every 1 000 lookups (as the crawler
runs) and with one channel kept (c-ares's own query cache then holds every answer):

    python benchmarks/dns.py [--names 40000] [--concurrency 64] [--cache-size 10000]

Every question goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import socket
import sys
import time

import psutil

import harness

sys.path.insert(0, str(harness.ROOT))
from crawler.fetch import resolver as resolver_module  # noqa: E402
from crawler.fetch.resolver import CachingResolver  # noqa: E402
from crawler.mock.bench import DNSResponderProcess  # noqa: E402


async def run(names: int, concurrency: int, cache_size: int, rotate: bool) -> dict:
    resolver_module.LOOKUPS_PER_CHANNEL = 1000 if rotate else 10**12
    with DNSResponderProcess() as responder:
        r = CachingResolver(servers=[responder.url], timeout=5.0, concurrency=concurrency, cache_size=cache_size)
        me = psutil.Process()
        await asyncio.gather(*(r.resolve(f"warm{i}.bench.test", 443, socket.AF_UNSPEC) for i in range(500)))
        gc.collect()
        before = me.memory_info().rss
        started = time.perf_counter()
        for start in range(0, names, 1000):  # 1 000 names asked at once, as a burst of new hosts would
            await asyncio.gather(
                *(r.resolve(f"h{i}.bench.test", 443, socket.AF_UNSPEC) for i in range(start, min(names, start + 1000)))
            )
        elapsed = time.perf_counter() - started
        for i in range(0, names, max(1, names // 1000)):  # asked again: answered from the cache
            await r.resolve(f"h{i}.bench.test", 443, socket.AF_UNSPEC)
        gc.collect()
        grown = me.memory_info().rss - before
        await r.close()
    questions = responder.reports[0]["queries"] - 1000  # the warm-up's 500 names, A and AAAA
    return {
        "rotate": rotate,
        "names": names,
        "names_per_s": round(names / elapsed),
        "questions": questions,
        "questions_per_name": round(questions / names, 2),
        "rss_growth_mib": round(grown / 2**20, 1),
        "channels": r.channels,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", type=int, default=40_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--cache-size", type=int, default=10_000)
    args = parser.parse_args()
    harness.print_machine(harness.machine())
    print("| c-ares channels | names | names/s | questions per name (A + AAAA) | process growth | channels opened |")
    print("|---|---|---|---|---|---|")
    import uvloop

    for rotate in (True, False):
        row = uvloop.run(run(args.names, args.concurrency, args.cache_size, rotate))
        print(
            f"| {'a fresh one every 1 000 lookups' if rotate else 'one, kept'} | {row['names']:,} |"
            f" {row['names_per_s']:,} | {row['questions_per_name']} | {row['rss_growth_mib']} MiB |"
            f" {row['channels']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
