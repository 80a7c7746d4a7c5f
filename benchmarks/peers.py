"""Our crawler end to end (CSV -> PostgreSQL) against its peers, on one local server at a time:

    python benchmarks/peers.py [--urls 100000] [--runs 3] [--servers mock,nginx] [--tools ...]

Tools: `ours` (`crawler crawl` as a subprocess, into a scratch database), `aiohttp-1` and
`aiohttp-2` (a minimal aiohttp + uvloop loop in one and two processes that persists nothing: the
floor of Python's overhead; the project's own aiohttp and uvloop), `scrapy` (tuned) and `httpx`
(AsyncClient). The peers are installed by this script into their own virtual environment
(benchmarks/.venv-peers) with pip, never into the project's. Servers: the project's mock server,
and nginx serving a static file if `nginx` is on PATH (it is never installed by this script).

Runs are interleaved (each round runs every tool once, the order rotating) and each figure is the
median of the rounds; ratios are of medians measured in this same run. Wall time is from starting
the tool's process to its exit, start-up included for every tool. CPU is of the tool's processes
(from wait4: the process and the children it reaped); PostgreSQL's CPU is shown apart for ours.
Every request goes to 127.0.0.1.

A shared virtual machine's speed changes from minute to minute (the same loop can take 1.5 times
as long). Each run therefore also records the server's CPU per request and a speed probe (the CPU
time of a fixed loop, sampled through the run: harness.SpeedProbe), and ours is also compared with
each peer round by round, and over the rounds in which both ran at the same speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import harness

PEERS = harness.BENCHMARKS / "peers"
VENV = harness.BENCHMARKS / ".venv-peers"
PEER_PACKAGES = ["scrapy>=2.13", "httpx>=0.27", "uvloop>=0.19"]
TOOLS = ("ours", "aiohttp-1", "aiohttp-2", "scrapy", "httpx")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_peers(venv: Path) -> dict[str, str]:
    """Create the peers' virtual environment and install them there (once); their versions."""
    python = venv_python(venv)
    probe = [
        str(python),
        "-c",
        "import scrapy, httpx, uvloop, twisted, json;"
        " print(json.dumps({'scrapy': scrapy.__version__, 'httpx': httpx.__version__,"
        " 'twisted': twisted.__version__, 'uvloop (peers)': uvloop.__version__}))",
    ]
    if python.exists():
        done = subprocess.run(probe, capture_output=True, text=True)
        if done.returncode == 0:
            return json.loads(done.stdout)
    print(f"installing {', '.join(PEER_PACKAGES)} into {venv} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return json.loads(subprocess.run(probe, capture_output=True, text=True, check=True).stdout)


def command(tool: str, urls: Path, args, dsn: str, summary: Path) -> list[str]:
    peers_python = str(venv_python(args.venv))
    c = str(args.concurrency)
    if tool == "ours":
        cmd = [
            sys.executable,
            "-m",
            "crawler",
            "crawl",
            str(urls),
            "--dsn",
            dsn,
            "--workers",
            str(args.workers),
            "--concurrency",
            c,
            "--allow-net",
            "127.0.0.1/32",
            "--quiet",
            "--summary-json",
            str(summary),
        ]
        return cmd + (["--chunk-size", str(args.chunk_size)] if args.chunk_size else [])
    if tool == "aiohttp-1":
        return [sys.executable, str(PEERS / "aiohttp_floor.py"), str(urls), "--concurrency", c, "--processes", "1"]
    if tool == "aiohttp-2":
        return [sys.executable, str(PEERS / "aiohttp_floor.py"), str(urls), "--concurrency", c, "--processes", "2"]
    if tool == "scrapy":
        return [peers_python, str(PEERS / "scrapy_spider.py"), str(urls), "--concurrency", c]
    if tool == "httpx":
        return [peers_python, str(PEERS / "httpx_client.py"), str(urls), "--concurrency", c]
    raise SystemExit(f"unknown tool {tool}")


def run_tool(
    tool: str, urls: Path, count: int, args, db: harness.ScratchDatabase, pg: harness.PostgresCPU, server
) -> dict:
    with tempfile.TemporaryDirectory(prefix="crawler-peers-") as tmp:
        summary_path = Path(tmp) / "summary.json"
        pg_before, server_before = pg.seconds(), server.cpu_seconds()
        with harness.SpeedProbe() as probe:
            timed = harness.run_timed(command(tool, urls, args, db.dsn, summary_path), timeout=args.timeout)
        pg_after, server_after = pg.seconds(), server.cpu_seconds()
        row = {
            "tool": tool,
            "returncode": timed.returncode,
            "wall_s": round(timed.wall_s, 3),
            "cpu_s": round(timed.cpu_s, 3),
            "maxrss_bytes": timed.maxrss_bytes,
            "load_1m": timed.load_1m,
            "probe_ms": round(probe.median_ms or 0, 3),
        }
        if server_before is not None and server_after is not None:
            row["server_cpu_s"] = round(server_after - server_before, 3)
        if tool == "ours":
            if summary_path.exists():
                summary = json.loads(summary_path.read_text())
                row.update(
                    ok=summary["ok"],
                    requests=summary["fetched"],
                    crawl_elapsed_s=summary["elapsed_s"],
                    time_to_first_fetch_s=summary["time_to_first_fetch_s"],
                )
            if pg_before is not None and pg_after is not None:
                row["postgres_cpu_s"] = round(pg_after - pg_before, 3)
        else:
            try:
                row.update(json.loads(timed.stdout.strip().splitlines()[-1]))
            except (IndexError, ValueError):
                pass
    row["urls"] = count
    if timed.returncode != 0 or row.get("ok") != count:
        row["problem"] = (timed.stderr.strip().splitlines() or ["?"])[-1][:300]
    row["requests_per_s"] = round(count / timed.wall_s, 1)
    if tool == "ours" and not args.keep_jobs:
        db.empty()
    return row


def report(server_name: str, rows: list[dict], tools: list[str], urls: int) -> dict:
    print(f"\n### {server_name}: {urls} URLs, medians of {max(1, len(rows) // max(1, len(tools)))} interleaved runs\n")
    print(
        "| tool | wall s | requests/s | CPU s per 1 000 requests | server's CPU s per 1 000 | speed probe ms"
        " | each run's requests/s | all ok |"
    )
    print("|---|---|---|---|---|---|---|---|")
    medians = {}
    for tool in tools:
        mine = [r for r in rows if r["tool"] == tool]
        wall = harness.median([r["wall_s"] for r in mine])
        cpu = harness.median([r["cpu_s"] for r in mine])
        pg = harness.median([r.get("postgres_cpu_s") for r in mine])
        rate = harness.median([r["requests_per_s"] for r in mine])
        server_cpu = harness.median([r.get("server_cpu_s") for r in mine])
        probe = harness.median([r["probe_ms"] for r in mine])
        medians[tool] = {
            "wall_s": wall,
            "requests_per_s": rate,
            "cpu_s": cpu,
            "postgres_cpu_s": pg,
            "server_cpu_s": server_cpu,
            "probe_ms": probe,
        }
        count = mine[0]["urls"]
        medians[tool]["urls"] = count
        cpu_k = f"{1000 * cpu / count:.3f}" if cpu is not None else "?"
        if pg is not None:
            cpu_k += f" (+ PostgreSQL {1000 * pg / count:.3f})"
        ok = all(r.get("ok") == count and r["returncode"] == 0 for r in mine)
        server_k = f"{1000 * server_cpu / count:.4f}" if server_cpu is not None else "?"
        shown_urls = "" if count == urls else f" ({count:,} URLs)"
        print(
            f"| {tool}{shown_urls} | {wall:.2f} | {rate:,.0f} | {cpu_k} | {server_k}"
            f" | {probe:.2f} | {', '.join(format(r['requests_per_s'], ',.0f') for r in mine)}"
            f" | {'yes' if ok else 'NO: ' + next((r.get('problem', '') for r in mine if 'problem' in r), '')} |"
        )
    ours = medians.get("ours", {}).get("requests_per_s")
    if ours:
        print()
        for peer, target in (("scrapy", 15.0), ("aiohttp-2", 0.85), ("aiohttp-1", None), ("httpx", None)):
            theirs = medians.get(peer, {}).get("requests_per_s")
            if theirs:
                goal = f" (target ≥ {target:g}{'x' if target >= 1 else ''})" if target else ""
                print(f"ours / {peer}: {ours / theirs:.2f}{goal}{paired(rows, peer)}")
    return medians


def paired(rows: list[dict], peer: str) -> str:
    """The ratio of ours to `peer` within each round (the two ran minutes apart, not tens of
    minutes): their median and range, and the rounds in which both ran at the same machine speed
    (speed probes within 10 %), whose ratios compare the programs rather than the machine."""
    rounds = {}
    for r in rows:
        rounds.setdefault(r["run"], {})[r["tool"]] = r
    pairs = [(t["ours"], t[peer]) for t in rounds.values() if "ours" in t and peer in t]
    ratios = sorted(o["requests_per_s"] / p["requests_per_s"] for o, p in pairs)
    if len(ratios) < 2:
        return ""
    alike = [
        o["requests_per_s"] / p["requests_per_s"]
        for o, p in pairs
        if o["probe_ms"] and p["probe_ms"] and abs(o["probe_ms"] / p["probe_ms"] - 1) <= 0.10
    ]
    text = f"; per round: median {harness.median(ratios):.2f} ({ratios[0]:.2f}–{ratios[-1]:.2f}, {len(ratios)} rounds)"
    if alike:
        text += f"; rounds at the same speed: median {harness.median(alike):.2f} ({len(alike)} rounds)"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--httpx-urls", type=int, help="httpx fetches only the first N URLs (it is slow; its rate is of its own count)"
    )
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, of {', '.join(TOOLS)}")
    parser.add_argument("--servers", default="mock,nginx", help="mock and/or nginx (nginx only if on PATH)")
    parser.add_argument("--server-processes", type=int, default=1, help="processes of each server (default 1)")
    parser.add_argument("--concurrency", type=int, default=200, help="in-flight requests per process (default 200)")
    parser.add_argument("--workers", type=int, default=2, help="our worker processes (default 2)")
    parser.add_argument("--chunk-size", type=int)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before one tool's run is killed")
    parser.add_argument("--dsn", help="a PostgreSQL server to create a scratch database on (default: the crawler's)")
    parser.add_argument("--keep-db", action="store_true")
    parser.add_argument(
        "--keep-jobs",
        action="store_true",
        help="keep each run's job in the scratch database (by default it is emptied after each of our runs)",
    )
    parser.add_argument("--venv", type=Path, default=VENV)
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    args = parser.parse_args()
    tools = [t for t in args.tools.split(",") if t]
    unknown = set(tools) - set(TOOLS)
    if unknown:
        parser.error(f"unknown tools: {', '.join(sorted(unknown))}")

    versions = ensure_peers(args.venv) if {"scrapy", "httpx"} & set(tools) else {}
    server_dsn = harness.resolve_dsn(args.dsn)
    info = harness.machine(server_dsn)
    info.update(versions)
    harness.print_machine(info)
    if versions:
        print("peers: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(
        f"settings: {args.urls} URLs, {args.runs} runs, concurrency {args.concurrency} per process,"
        f" ours with {args.workers} workers",
        flush=True,
    )

    servers = []
    for name in args.servers.split(","):
        if name == "mock":
            servers.append(harness.MockServer(args.server_processes))
        elif name == "nginx":
            nginx = harness.Nginx(args.server_processes)
            if nginx.available:
                servers.append(nginx)
            else:
                print("nginx is not on PATH: skipped", flush=True)
    results = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "servers": {}}
    with harness.ScratchDatabase(server_dsn, keep=args.keep_db) as db:
        pg = harness.PostgresCPU(db.dsn)
        for server in servers:
            with server, tempfile.TemporaryDirectory(prefix="crawler-peers-") as tmp:
                urls = Path(tmp) / "urls.csv"
                harness.write_urls(urls, server.url, args.urls)
                files = {tool: (urls, args.urls) for tool in tools}
                if args.httpx_urls and args.httpx_urls < args.urls:
                    fewer = Path(tmp) / "urls-httpx.csv"
                    harness.write_urls(fewer, server.url, args.httpx_urls)
                    files["httpx"] = (fewer, args.httpx_urls)
                print(f"\nserver: {server.describe()} at {server.url}", flush=True)
                rows = []
                for run in range(args.runs):
                    order = tools[run % len(tools) :] + tools[: run % len(tools)]
                    for tool in order:
                        row = run_tool(tool, *files[tool], args, db, pg, server)
                        row["run"] = run
                        rows.append(row)
                        print(
                            f"  run {run + 1} {tool}: {row['wall_s']:.2f} s, {row['requests_per_s']:,.0f}/s,"
                            f" CPU {row['cpu_s']:.1f} s"
                            + (f", PostgreSQL CPU {row['postgres_cpu_s']:.1f} s" if "postgres_cpu_s" in row else "")
                            + f", load {row['load_1m']:.1f}, probe {row['probe_ms']:.2f} ms"
                            + (f"  PROBLEM: {row['problem']}" if "problem" in row else ""),
                            flush=True,
                        )
                medians = report(server.describe(), rows, tools, args.urls)
                results["servers"][server.name] = {"describe": server.describe(), "runs": rows, "medians": medians}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
