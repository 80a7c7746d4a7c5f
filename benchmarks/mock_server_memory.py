"""What the mock server's per-path hit counts cost it: memory and CPU for N distinct paths, with
per-path counting on (the default) and off (--no-path-hits, which `crawler bench` uses).

    python benchmarks/mock_server_memory.py [--paths 200000] [--runs 2]

Each run starts `python -m crawler.mock.server --processes 1` on a loopback port, sends one GET to
each of /ok/0 .. /ok/<paths-1> (one client process, 100 at a time), and reads the server's RSS
and CPU seconds (psutil) before and after. The two modes alternate; 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

MODES = {"per-path counts": [], "--no-path-hits": ["--no-path-hits"]}


async def send(url: str, paths: int, concurrency: int = 100) -> int:
    import aiohttp

    pending = iter(range(paths))
    ok = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def one() -> None:
            nonlocal ok
            for i in pending:
                async with session.get(f"{url}/ok/{i}") as resp:
                    await resp.read()
                    ok += resp.status == 200

        await asyncio.gather(*(one() for _ in range(concurrency)))
    return ok


def run(flags: list[str], paths: int) -> dict:
    proc = subprocess.Popen(
        [sys.executable, "-m", "crawler.mock.server", "--port", "0", *flags],
        stdout=subprocess.PIPE,
        text=True,
        cwd=harness.ROOT,
    )
    try:
        url = proc.stdout.readline().split("listening on ", 1)[1].split()[0]
        server = psutil.Process(proc.pid)
        rss0, cpu0 = server.memory_info().rss, sum(server.cpu_times()[:2])
        ok = asyncio.run(send(url, paths))
        rss1, cpu1 = server.memory_info().rss, sum(server.cpu_times()[:2])
    finally:
        harness.stop(proc)
    return {"ok": ok, "rss_growth": rss1 - rss0, "rss_after": rss1, "cpu_per_1000": 1000 * (cpu1 - cpu0) / paths}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--json", help="keep every run's figures here")
    args = parser.parse_args()
    harness.print_machine(harness.machine())
    print(f"{args.paths} distinct paths, {args.runs} runs", flush=True)
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for index in range(args.runs):
        for mode in list(MODES) if index % 2 == 0 else list(MODES)[::-1]:
            results[mode].append(run(MODES[mode], args.paths))
            r = results[mode][-1]
            print(
                f"  {mode}: RSS +{r['rss_growth'] / 2**20:.1f} MiB, {r['cpu_per_1000']:.3f} CPU s / 1 000", flush=True
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(
        "\n| mode | server RSS growth (MiB) | bytes per path | server RSS after (MiB)"
        " | server CPU s / 1 000 requests |"
        "\n|---|---|---|---|---|"
    )
    for mode, rows in results.items():
        growth = harness.median([r["rss_growth"] for r in rows])
        print(
            f"| {mode} | {growth / 2**20:.1f} | {growth / args.paths:.0f} |"
            f" {harness.median([r['rss_after'] for r in rows]) / 2**20:.0f} |"
            f" {harness.median([r['cpu_per_1000'] for r in rows]):.3f} |"
        )
        if any(r["ok"] != args.paths for r in rows):
            print(f"WARNING: {mode}: not every request got 200")


if __name__ == "__main__":
    main()
