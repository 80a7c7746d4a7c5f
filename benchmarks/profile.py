"""Where the time goes: runs `crawler bench`, samples the supervisor and every worker with py-spy
(on-CPU samples only, without pausing them) and sorts the samples into the parts of the path:

    python benchmarks/profile.py [--urls 300000] [--seconds 20] [--keep DIR]
    python benchmarks/profile.py --summarise worker.txt [supervisor.txt ...]

Worker: the aiohttp request path (inside Fetcher.attempt, and aiohttp's protocol callbacks run by
the loop), the database (the ResultWriter, the ledger and asyncpg), our own per-request code, and
the event loop. Supervisor: reading and parsing the input, URL normalization and fingerprints,
storing chunks (COPY), progress, and its polling loop. Needs py-spy (pip install py-spy) and the
right to trace the processes (root, or ptrace allowed). Every request goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

import harness

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:()]*):?(?P<line>\d*)\)$")


def parse(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    """py-spy's raw format: one stack per line, frames separated by ';', then a count."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = []
        for frame in stack.split(";"):
            m = _FRAME.match(frame)
            frames.append((m["func"], m["file"]) if m else (frame, ""))
        stacks.append((frames, int(count)))
    return stacks


def _loop_root(frames: list[tuple[str, str]]) -> int:
    """Index of the first frame the event loop called (a task step or a callback)."""
    for i, (_func, file) in enumerate(frames):
        if file.startswith(("asyncio/runners.py", "uvloop/__init__.py", "asyncio/base_events.py")):
            root = i + 1
    return locals().get("root", 0)


def worker_part(frames: list[tuple[str, str]]) -> str:
    funcs = [f for f, _ in frames]
    files = [file for _, file in frames]
    leaf_file = files[-1] if files else ""
    if any(f == "Fetcher.attempt" for f in funcs):
        if leaf_file.startswith("crawler/"):
            return "fetch: our code inside Fetcher.attempt (body hashing, address policy)"
        return "fetch: aiohttp request path inside Fetcher.attempt"
    if any(file.startswith(("crawler/fetch/writer.py", "crawler/ledger/", "asyncpg/")) for file in files):
        return "database: ResultWriter, ledger, asyncpg"
    root = _loop_root(frames)
    root_file = files[root] if root < len(files) else leaf_file
    if root_file.startswith(("aiohttp/", "yarl/", "multidict/", "aiohappyeyeballs/", "aiodns/")):
        return "fetch: aiohttp protocol callbacks run by the loop (parsing, connections)"
    if root_file.startswith("crawler/"):
        return f"our code: {root_file.split('/')[-1]} (worker loop, scheduling, retries, bookkeeping)"
    if root_file.startswith(("asyncio/", "uvloop/")) or root >= len(files):
        return "event loop (asyncio/uvloop, between callbacks)"
    return f"other: {root_file.split('/')[0] or '?'}"


def supervisor_part(frames: list[tuple[str, str]]) -> str:
    files = [file for _, file in frames]
    funcs = [f for f, _ in frames]
    if any(file.startswith("crawler/urls.py") for file in files):
        return "input: URL normalization and fingerprints (urls.py)"
    if any(file.startswith("crawler/job/inputs.py") for file in files):
        return "input: reading and parsing rows (inputs.py, csv)"
    if (
        any(f in ("store_chunk",) for f in funcs)
        or any(file.startswith("asyncpg/") for file in files)
        and any(f == "Supervisor._ingest" for f in funcs)
    ):
        return "ingest: storing chunks (COPY, asyncpg)"
    if any(file.startswith(("crawler/job/progress.py", "rich/")) for file in files):
        return "progress display (rich)"
    if any(file.startswith(("asyncpg/", "crawler/ledger/")) for file in files):
        return "polling the ledger (job counts, live workers)"
    if any(file.startswith(("concurrent/futures/", "threading.py")) for file in files) or any(
        f == "_chain_future.<locals>._call_set_state" for f in funcs
    ):
        return "input thread hand-off (thread pool, futures)"
    if _loop_root(frames) >= len(frames):
        return "event loop (uvloop, between callbacks)"
    if any(file.startswith("crawler/") for file in files):
        return "supervisor: other of our code"
    return f"other: {files[_loop_root(frames)].split('/')[0]}"


def summarise(path: Path, role: str, top: int = 12) -> dict:
    stacks = parse(path)
    total = sum(n for _, n in stacks) or 1
    classify = worker_part if role == "worker" else supervisor_part
    parts: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        parts[classify(frames)] += n
        func, file = frames[-1]
        leaves[f"{func} ({file})"] += n
        for f, file in {(f, file) for f, file in frames}:
            inclusive[f"{f} ({file})"] += n
    print(f"\n#### {role}: {path.name}, {total} samples\n")
    print("| part | share |\n|---|---|")
    for part, n in parts.most_common():
        print(f"| {part} | {n / total:.0%} |")
    print(f"\nself time, top {top}: " + "; ".join(f"{k} {n / total:.1%}" for k, n in leaves.most_common(top)))
    skip = (
        "<module>",
        "spawn_main",
        "_main",
        "BaseProcess",
        "run (uvloop",
        "Runner.run",
        "run.<locals>",
        "run_worker",
        "main (crawler/cli",
        "dispatch",
        "_run (crawler",
        "Worker.run ",
        "Handle._run",
    )
    incl = [(k, n) for k, n in inclusive.most_common(60) if not k.startswith(skip)][:top]
    print(f"\ninclusive, top {top}: " + "; ".join(f"{k} {n / total:.0%}" for k, n in incl))
    return {"samples": total, "parts": {k: round(n / total, 4) for k, n in parts.most_common()}}


def record(args) -> None:
    if shutil.which("py-spy") is None:
        raise SystemExit("profile: py-spy is not on PATH (pip install py-spy)")
    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="crawler-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    server_dsn = harness.resolve_dsn(args.dsn)
    harness.print_machine(harness.machine(server_dsn))
    with harness.ScratchDatabase(server_dsn) as db:
        cmd = [
            sys.executable,
            "-m",
            "crawler",
            "bench",
            "--urls",
            str(args.urls),
            "--workers",
            str(args.workers),
            "--concurrency",
            str(args.concurrency),
            "--dsn",
            db.dsn,
            "--summary-json",
            str(out / "summary.json"),
            "--quiet",
        ]
        bench = subprocess.Popen(cmd, cwd=harness.ROOT)
        try:
            workers = []
            deadline = time.monotonic() + 30
            while len(workers) < args.workers and time.monotonic() < deadline and bench.poll() is None:
                time.sleep(0.2)
                workers = [p for p in psutil.Process(bench.pid).children() if "spawn_main" in " ".join(p.cmdline())]
            time.sleep(args.delay)
            spies = [
                subprocess.Popen(
                    [
                        "py-spy",
                        "record",
                        "-p",
                        str(pid),
                        "-d",
                        str(args.seconds),
                        "-r",
                        "100",
                        "-f",
                        "raw",
                        "-o",
                        str(out / f"{name}.txt"),
                        "--nonblocking",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for name, pid in [("supervisor", bench.pid)] + [(f"worker-{i}", p.pid) for i, p in enumerate(workers)]
            ]
            for spy in spies:
                spy.wait(args.seconds + 60)
            bench.wait(args.timeout)
        finally:
            harness.kill_tree(bench.pid) if bench.poll() is None else None
    summary = json.loads((out / "summary.json").read_text())
    print(
        f"bench: {summary['fetched']} fetched in {summary['elapsed_s']} s, {summary['requests_per_s']}/s;"
        f" profiles in {out}"
    )
    for path in sorted(out.glob("*.txt")):
        summarise(path, "supervisor" if path.name.startswith("supervisor") else "worker")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", type=int, default=300_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=20, help="how long to sample")
    parser.add_argument("--delay", type=float, default=2.0, help="seconds after the workers start before sampling")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--dsn")
    parser.add_argument("--keep", help="directory for the raw profiles (default: a new temporary one)")
    parser.add_argument("--summarise", nargs="+", type=Path, help="only summarise these raw py-spy files")
    args = parser.parse_args()
    if args.summarise:
        for path in args.summarise:
            summarise(path, "supervisor" if "supervisor" in path.name else "worker")
    else:
        record(args)


if __name__ == "__main__":
    main()
