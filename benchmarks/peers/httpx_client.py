"""httpx.AsyncClient over the same URL file: one process, a fixed pool of tasks, on uvloop.

    python httpx_client.py URLS.csv --concurrency 200

Prints one JSON line: {"requests", "ok", "elapsed_s"}. Only for local benchmark servers.
"""

import argparse
import asyncio
import json
import time

import httpx
import uvloop


async def fetch_all(urls: list[str], concurrency: int) -> int:
    ok = 0
    pending = iter(urls)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60.0) as client:

        async def fetcher() -> None:
            nonlocal ok
            for url in pending:
                try:
                    resp = await client.get(url)
                    ok += resp.status_code == 200
                except httpx.HTTPError:
                    pass

        await asyncio.gather(*(fetcher() for _ in range(concurrency)))
    return ok


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("urls")
    parser.add_argument("--concurrency", type=int, default=200)
    args = parser.parse_args()
    started = time.perf_counter()
    with open(args.urls) as fh:
        urls = [u for u in (line.strip() for line in fh) if u and u != "url"]
    ok = uvloop.run(fetch_all(urls, args.concurrency))
    print(json.dumps({"requests": len(urls), "ok": ok, "elapsed_s": round(time.perf_counter() - started, 3)}))


if __name__ == "__main__":
    main()
