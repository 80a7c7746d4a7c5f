"""What reading an input costs the supervisor, per row: open_input and its batches (CSV parsing,
URL normalization, fingerprints) and, with --store, writing them as chunks (store_chunk),
for the working tree against a git revision.

    python benchmarks/ingest_path.py [--rows 200000] [--runs 5] [--baseline HEAD] [--callgrind]
    python benchmarks/ingest_path.py --store [--dsn DSN] [--duplicates 0.3] [--rows 200000]

Inputs: `bench` is the file `crawler bench` makes (a CSV of http://127.0.0.1:PORT/ok/<n>);
`mixed` is a seeded list of the URLs a real export holds (names and IP literals, http and https,
upper-case hosts, ports, paths, queries, percent-escapes, a few non-ASCII and invalid rows).
Variants: `current` is the working tree's crawler package; `base` is the package as of
--baseline, exported with `git archive` and put first on the child's PYTHONPATH.
Each (input, variant) runs in its own process; the figure is that process's CPU microseconds per
row while reading (imports excluded), medians of interleaved runs. With --callgrind each runs
instead under `valgrind --tool=callgrind` with --rows and 3 x --rows rows: the difference in
instructions over the difference in rows is the instructions per row, start-up cancelled out.

With --store each child also stores every batch as a chunk of a new job in a scratch database
(emptied before each run), as the supervisor does, and the figures are the CPU of the PostgreSQL
backend serving it (from /proc, so the server must be on this machine) and of the child itself,
per 1 000 rows; the `mixed` input is then replaced by `dups`, the bench file with --duplicates of
its rows repeating earlier ones. Nothing here opens a socket but the database's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INPUTS = ("bench", "mixed")
STORE_INPUTS = ("bench", "dups")
VARIANTS = ("base", "current")


def write_bench(path: Path, rows: int) -> None:
    with path.open("w") as out:
        out.write("url\n")
        out.writelines(f"http://127.0.0.1:8080/ok/{i}\n" for i in range(rows))


def write_mixed(path: Path, rows: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    words = ["news", "shop", "api", "static", "blog", "docs", "cdn", "mail", "img", "search", "user", "item"]
    tlds = ["com", "org", "net", "de", "io", "co.uk"]

    def host() -> str:
        draw = rng.random()
        if draw < 0.1:
            return f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        name = f"{rng.choice(['www.', '', 'm.'])}{rng.choice(words)}{rng.randrange(1000)}.{rng.choice(tlds)}"
        if draw < 0.15:
            return name.upper()
        if draw < 0.17:
            return "bücher" + name
        return name

    with path.open("w") as out:
        out.write("url\n")
        for _ in range(rows):
            draw = rng.random()
            if draw < 0.01:
                out.write(f"ftp://{host()}/file\n")
                continue
            if draw < 0.02:
                out.write("not a url\n")
                continue
            scheme = "https" if rng.random() < 0.7 else "http"
            port = f":{rng.choice([80, 443, 8080, 8443])}" if rng.random() < 0.05 else ""
            path = "".join(f"/{rng.choice(words)}-{rng.randrange(10000)}" for _ in range(rng.randrange(0, 4)))
            if rng.random() < 0.05:
                path += "/a%20b"
            if rng.random() < 0.02:
                path += "/%7euser"
            query = ""
            if rng.random() < 0.4:
                query = "?" + "&".join(f"{rng.choice(words)}={rng.randrange(100)}" for _ in range(rng.randrange(1, 4)))
            fragment = "#top" if rng.random() < 0.02 else ""
            out.write(f"{scheme}://{host()}{port}{path}{query}{fragment}\n")


def _backend_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def _store(path: str, dsn: str) -> dict:
    import asyncpg

    from crawler.job.inputs import InvalidRow, open_input
    from crawler.ledger.chunks import store_chunk
    from crawler.ledger.jobs import create_job

    conn = await asyncpg.connect(dsn)
    try:
        job = await create_job(conn, name=f"ingest-path-{os.getpid()}", input=path, settings={})
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        cpu0, pg0, t0 = time.process_time(), _backend_cpu(backend), time.perf_counter()
        rows = invalid = fetch = 0
        with open_input(path) as reader:
            for chunk_no, batch in enumerate(reader.batches(1000)):
                fetch += await store_chunk(conn, job.id, chunk_no, batch)
                rows += len(batch)
                invalid += sum(isinstance(row, InvalidRow) for row in batch)
        figures = {
            "cpu_s": time.process_time() - cpu0,
            "pg_cpu_s": _backend_cpu(backend) - pg0,
            "wall_s": time.perf_counter() - t0,
            "rows": rows,
            "invalid": invalid,
            "fetch": fetch,
        }
        # What was stored, to compare variants by: every request row's dup_of.
        figures["stored"] = await conn.fetchval(
            "SELECT md5(string_agg(row_no || ':' || coalesce(dup_of, 0), ',' ORDER BY row_no))"
            " FROM requests WHERE job_id = $1",
            job.id,
        )
        return figures
    finally:
        await conn.close()


def child(path: str, dsn: str | None) -> None:
    """Read the whole input in batches of 1 000, as the supervisor does (storing each as a chunk,
    with a DSN); print the figures."""
    import crawler

    if dsn:
        import asyncio

        figures = asyncio.run(_store(path, dsn))
    else:
        from crawler.job.inputs import InvalidRow, open_input

        cpu0, t0 = time.process_time(), time.perf_counter()
        rows = invalid = 0
        with open_input(path) as reader:
            for batch in reader.batches(1000):
                rows += len(batch)
                invalid += sum(isinstance(row, InvalidRow) for row in batch)
        figures = {
            "cpu_s": time.process_time() - cpu0,
            "wall_s": time.perf_counter() - t0,
            "rows": rows,
            "invalid": invalid,
        }
    print(json.dumps(figures | {"package": str(Path(crawler.__file__).parent)}))


def run_child(
    path: Path, variant: str, base_tree: str, *, callgrind: str | None = None, dsn: str | None = None
) -> dict | int:
    env = dict(os.environ)
    if variant == "base":
        env["PYTHONPATH"] = base_tree + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--child", str(path), *(["--dsn", dsn] if dsn else [])]
    if callgrind:
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={callgrind}", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env, cwd="/")
    if done.returncode != 0:
        raise SystemExit(f"ingest_path: {variant} on {path.name} failed: {done.stderr[-2000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    expected = base_tree if variant == "base" else str(ROOT)
    if not figures["package"].startswith(expected):
        raise SystemExit(f"ingest_path: {variant} imported {figures['package']}, not {expected}")
    if callgrind:
        Path(callgrind).unlink(missing_ok=True)
        import harness  # the parent's side only: children import no harness

        return harness.callgrind_instructions(done.stderr)
    return figures


def median(values: list[float]) -> float:
    values = sorted(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", default="HEAD", help="git revision of the `base` variant")
    parser.add_argument("--inputs", help=f"default {','.join(INPUTS)}; with --store {','.join(STORE_INPUTS)}")
    parser.add_argument(
        "--callgrind", action="store_true", help="instructions per row under callgrind, from --rows and 3 x --rows rows"
    )
    parser.add_argument("--store", action="store_true", help="store the chunks too; PostgreSQL CPU per row")
    parser.add_argument("--dsn", help="PostgreSQL server for --store (default: the crawler's own)")
    parser.add_argument("--duplicates", type=float, default=0.3, help="share of repeated rows in `dups`")
    parser.add_argument("--json", help="keep every run's figures here")
    parser.add_argument("--child", metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dsn)
        return
    if args.store and args.callgrind:
        raise SystemExit("ingest_path: --store measures PostgreSQL's CPU; it does not go with --callgrind")

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import harness

    server_dsn = harness.resolve_dsn(args.dsn) if args.store else None
    harness.print_machine(harness.machine(server_dsn))
    inputs = args.inputs.split(",") if args.inputs else list(STORE_INPUTS if args.store else INPUTS)
    scratch = harness.ScratchDatabase(server_dsn) if args.store else contextlib.nullcontext()
    with tempfile.TemporaryDirectory(prefix="crawler-ingest-path-") as tmp, scratch as db:
        base_tree = str(Path(tmp) / "base")
        os.mkdir(base_tree)
        harness.export_revision(args.baseline, base_tree, ("crawler",))
        sizes = (args.rows, 3 * args.rows) if args.callgrind else (args.rows,)
        files = {}
        for name in inputs:
            for size in sizes:
                files[name, size] = Path(tmp) / f"{name}-{size}.csv"
                if name == "dups":
                    from crawler.mock.bench import write_urls

                    write_urls(files[name, size], "http://127.0.0.1:8080", size, args.duplicates, 0)
                else:
                    (write_bench if name == "bench" else write_mixed)(files[name, size], size)
        what = f"callgrind, {args.rows} and {3 * args.rows} rows" if args.callgrind else f"{args.rows} rows"
        print(f"baseline {args.baseline}; {what}, {args.runs} runs", flush=True)
        figures: dict[tuple[str, str], list[float]] = {(i, v): [] for i in inputs for v in VARIANTS}
        pg: dict[tuple[str, str], list[float]] = {(i, v): [] for i in inputs for v in VARIANTS}
        invalid: dict[str, set] = {name: set() for name in inputs}
        for run in range(args.runs):
            for name in inputs:
                for variant in VARIANTS if run % 2 == 0 else VARIANTS[::-1]:
                    if args.callgrind:
                        out = str(Path(tmp) / "callgrind.out")
                        ir = run_child(files[name, sizes[1]], variant, base_tree, callgrind=out) - run_child(
                            files[name, sizes[0]], variant, base_tree, callgrind=out
                        )
                        figures[name, variant].append(ir / (sizes[1] - sizes[0]))
                    elif args.store:
                        db.empty()
                        result = run_child(files[name, sizes[0]], variant, base_tree, dsn=db.dsn)
                        figures[name, variant].append(1000 * result["cpu_s"] / result["rows"])
                        pg[name, variant].append(1000 * result["pg_cpu_s"] / result["rows"])
                        invalid[name].add((variant, (result["invalid"], result["fetch"], result["stored"])))
                        print(
                            f"  {name} {variant}: client {figures[name, variant][-1]:.4f},"
                            f" PostgreSQL {pg[name, variant][-1]:.4f} CPU s per 1 000 rows;"
                            f" wall {result['wall_s']:.1f} s",
                            flush=True,
                        )
                        continue
                    else:
                        result = run_child(files[name, sizes[0]], variant, base_tree)
                        figures[name, variant].append(1e6 * result["cpu_s"] / result["rows"])
                        invalid[name].add((variant, result["invalid"]))
                    print(f"  {name} {variant}: {figures[name, variant][-1]:,.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                [
                    {
                        "input": name,
                        "variant": variant,
                        "per_row" if not args.store else "client_cpu_s_per_1000": figures[name, variant],
                        **({"postgres_cpu_s_per_1000": pg[name, variant]} if args.store else {}),
                    }
                    for name in inputs
                    for variant in VARIANTS
                ],
                indent=2,
            )
        )
    if args.store:
        print(
            "\n| input | CPU s per 1 000 rows | base | current | current / base | runs (base; current) |"
            "\n|---|---|---|---|---|---|"
        )
        for name in inputs:
            for what, series in (("client (parse + store)", figures), ("PostgreSQL backend", pg)):
                base, current = median(series[name, "base"]), median(series[name, "current"])
                runs = "; ".join(", ".join(f"{x:.4f}" for x in series[name, v]) for v in VARIANTS)
                print(f"| {name} | {what} | {base:.4f} | {current:.4f} | {current / base:.3f} | {runs} |")
        for name in inputs:
            if len({outcome for _, outcome in invalid[name]}) > 1:
                print(f"WARNING: {name}: the variants stored different outcomes: {sorted(invalid[name])}")
        return
    unit = "instructions per row" if args.callgrind else "CPU µs per row"
    print(f"\n| input | base {unit} | current | current / base | runs (base; current) |\n|---|---|---|---|---|")
    for name in inputs:
        base, current = median(figures[name, "base"]), median(figures[name, "current"])
        runs = "; ".join(", ".join(f"{x:,.1f}" for x in figures[name, v]) for v in VARIANTS)
        print(f"| {name} | {base:,.1f} | {current:,.1f} | {current / base:.3f} | {runs} |")
    for name in inputs:
        counts = {count for _, count in invalid[name]}
        if len(counts) > 1:
            print(f"WARNING: {name}: the variants found different numbers of invalid rows: {sorted(invalid[name])}")


if __name__ == "__main__":
    main()
