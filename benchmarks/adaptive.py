"""How the per-host limit adapts to a server of unknown capacity.

Starts the mock server with `--capacity N` (it answers 503 above N requests in flight) and a
fixed latency, crawls the same URLs with the adaptive limit on and off, and prints the rate
achieved, the requests the server turned away, and the rows that failed after retries.

    python benchmarks/adaptive.py [--urls 3000] [--capacity 20] [--latency-ms 50]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CASES = {
    "adaptive (start 16)": ["--per-host-concurrency", "16"],
    "fixed 16 per host": ["--per-host-concurrency", "16", "--no-adaptive"],
    "no per-host limit": ["--per-host-concurrency", "0", "--no-adaptive"],
}


def mock_server(capacity: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "crawler.mock.server", "--port", "0", "--capacity", str(capacity)],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    return proc, line.split("listening on ", 1)[1].split()[0]


def stats(base: str, reset: bool = False) -> dict:
    request = urllib.request.Request(f"{base}/__stats{'/reset' if reset else ''}", method="POST" if reset else "GET")
    with urllib.request.urlopen(request, timeout=10) as resp:  # loopback only: our own mock server
        return json.load(resp)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--urls", type=int, default=3000)
    parser.add_argument("--capacity", type=int, default=20)
    parser.add_argument("--latency-ms", type=int, default=50)
    parser.add_argument("--dsn", default=os.environ.get("CRAWLER_DSN"))
    args = parser.parse_args()
    server, base = mock_server(args.capacity)
    bound = args.capacity / (args.latency_ms / 1000)
    print(
        f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()},"
        f" Python {platform.python_version()}"
    )
    print(f"server capacity {args.capacity} in flight x {args.latency_ms} ms -> at most {bound:.0f} requests/s")
    print(f"{'case':24} {'req/s':>8} {'of bound':>9} {'turned away':>12} {'failed rows':>12} {'peak in flight':>15}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, flags in CASES.items():
                path = Path(tmp) / f"{len(name)}.txt"
                path.write_text(
                    "".join(f"{base}/capacity-delay/{args.latency_ms}/{name[:3]}{i}\n" for i in range(args.urls))
                )
                stats(base, reset=True)
                summary = Path(tmp) / "summary.json"
                dsn = ["--dsn", args.dsn] if args.dsn else []
                started = time.monotonic()
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "crawler",
                        "crawl",
                        str(path),
                        *dsn,
                        "--workers",
                        "2",
                        "--concurrency",
                        "100",
                        "--allow-net",
                        "127.0.0.1/32",
                        "--quiet",
                        "--max-attempts",
                        "5",
                        "--summary-json",
                        str(summary),
                        *flags,
                    ],
                    check=True,
                )
                elapsed = time.monotonic() - started
                seen, result = stats(base), json.loads(summary.read_text())
                rate = args.urls / elapsed
                print(
                    f"{name:24} {rate:8.0f} {rate / bound:9.0%} {seen['rejected']:12d} {result['failed']:12d}"
                    f" {seen['max_in_flight']:15d}"
                )
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
