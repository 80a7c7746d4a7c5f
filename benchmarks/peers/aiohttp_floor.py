"""The floor of Python overhead: a minimal aiohttp + uvloop fetch loop that persists nothing.

    python aiohttp_floor.py URLS.csv --concurrency 200 --processes 2 [--dns-server IP:PORT] [--ca-file PEM]

Reads the URL file (a `url` header line is skipped), gives process k every P-th URL from the k-th,
and in each process runs a fixed pool of `concurrency` tasks over one ClientSession, reading every
body. Prints one JSON line: {"requests", "ok", "elapsed_s"}. Only for local benchmark servers.
With --dns-server, names are resolved by aiohttp's own AsyncResolver asking that server (and
aiohttp's default DNS cache); with --ca-file, that CA is trusted besides the system's. Everything
else is aiohttp's default (keep-alive 15 s).
"""

import argparse
import asyncio
import json
import multiprocessing
import ssl
import time

import aiohttp
import uvloop


def read_urls(path: str, index: int, processes: int) -> list[str]:
    with open(path) as fh:
        lines = [line.strip() for line in fh]
    urls = [u for u in lines if u and u != "url"]
    return urls[index::processes]


async def fetch_all(
    urls: list[str], concurrency: int, dns_server: str | None = None, ca_file: str | None = None
) -> int:
    ok = 0
    pending = iter(urls)
    options = {}
    if dns_server:
        options["resolver"] = aiohttp.AsyncResolver(nameservers=[dns_server])
    if ca_file:
        context = ssl.create_default_context()
        context.load_verify_locations(cafile=ca_file)
        options["ssl"] = context
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0, **options)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def fetcher() -> None:
            nonlocal ok
            for url in pending:  # the tasks share one iterator: a fixed pool, no task per URL
                try:
                    async with session.get(url) as resp:
                        await resp.read()
                        ok += resp.status == 200
                except (TimeoutError, aiohttp.ClientError):
                    pass

        await asyncio.gather(*(fetcher() for _ in range(concurrency)))
    return ok


def run_process(
    path: str, index: int, processes: int, concurrency: int, results, dns_server=None, ca_file=None
) -> None:
    urls = read_urls(path, index, processes)
    ok = uvloop.run(fetch_all(urls, concurrency, dns_server, ca_file))
    results.put((len(urls), ok))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("urls")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--dns-server", help="resolve names with this server, IP:PORT")
    parser.add_argument("--ca-file", help="trust this CA (PEM) besides the system's")
    args = parser.parse_args()
    extra = (args.dns_server, args.ca_file)
    started = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    if args.processes == 1:
        run_process(args.urls, 0, 1, args.concurrency, results, *extra)
    else:
        procs = [
            ctx.Process(target=run_process, args=(args.urls, i, args.processes, args.concurrency, results, *extra))
            for i in range(args.processes)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    totals = [results.get() for _ in range(args.processes)]
    print(
        json.dumps(
            {
                "requests": sum(t[0] for t in totals),
                "ok": sum(t[1] for t in totals),
                "elapsed_s": round(time.perf_counter() - started, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
