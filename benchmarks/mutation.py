"""Mutation testing of the crawler's pure modules with mutmut: how many deliberately broken
copies of a module its own tests catch. Slow and CPU-heavy, so it is run by hand, never in CI.

    python benchmarks/mutation.py crawler/fetch/retry.py            # one module, its own test files
    python benchmarks/mutation.py crawler/fetch/hosts.py --jobs 1   # one mutant at a time
    python benchmarks/mutation.py crawler/fetch/retry.py --survivors  # and print each surviving diff

Each run works on a copy of the repository in a scratch directory (mutmut writes its mutants
next to the sources it mutates), runs only the module's own test files against each mutant, and
prints the module's score: killed / (killed + survived). Timeouts count as killed (mutmut's
own rule: a mutant that makes a test hang was noticed). Results go to benchmarks/MUTATION.md
by hand, with the surviving mutants judged harmless and why.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Each module's own tests: a bounded selection, so a run costs minutes, not the whole suite per mutant.
# The pure ones only: tests/test_request_urls.py and tests/test_request_target.py also cover
# crawler/urls.py, through a database and real crawls, seconds a case, against every mutant.
TESTS = {
    "crawler/fetch/retry.py": ["tests/test_retry.py"],
    "crawler/fetch/failures.py": ["tests/test_failures.py"],
    "crawler/fetch/hosts.py": ["tests/test_hosts.py", "tests/test_hosts_properties.py"],
    "crawler/settings.py": ["tests/test_settings.py"],
    "crawler/urls.py": ["tests/test_urls.py"],
    "crawler/fetch/addresses.py": ["tests/test_addresses.py"],
}

# Functions a module runs only while it is imported (building a table of declarations, finding a
# directory): mutmut switches a mutant on per test, after the import, so no test can ever see these
# mutants, whatever it checks. They are listed apart and left out of the score; what they build
# is held by the tests of its users (the CLI's flags, the configuration check).
IMPORT_TIME = {
    "crawler/settings.py": ("setting", "_declare", "project_dir"),
}

KILLED = {"killed", "timeout", "segfault", "suspicious"}
SURVIVED = {"survived"}


def mutmut_config(module: str, tests: list[str]) -> str:
    selection = json.dumps([*tests, "-p", "no:cacheprovider", "-q", "-x", "--hypothesis-profile=mutation"])
    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["crawler"]\n'
        f'only_mutate = ["{module}"]\n'
        f"pytest_add_cli_args_test_selection = {selection}\n"
        'also_copy = ["migrations", "config"]\n'
    )


def scratch_copy(module: str, tests: list[str]) -> Path:
    work = Path(tempfile.mkdtemp(prefix="crawler-mutation-"))
    for name in ("crawler", "tests", "migrations", "config"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # Made before Python starts: a PYTHONPATH entry that does not exist yet is never searched.
    (work / "mutants").mkdir()
    (work / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + mutmut_config(module, tests))
    return work


def results(work: Path, env: dict) -> dict[str, str]:
    """mutant name -> status, from `mutmut results --all true`."""
    done = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    statuses = {}
    for line in done.stdout.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep:
            statuses[name] = status.strip()
    return statuses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", choices=sorted(TESTS))
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1: the machine is shared)")
    parser.add_argument("--survivors", action="store_true", help="print the diff of every surviving mutant")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()

    work = scratch_copy(args.module, TESTS[args.module])
    # The mutated package, not an installed one, must be the one imported.
    env = {**os.environ, "PYTHONPATH": str(work / "mutants"), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("CI", None)
    try:
        subprocess.run(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.jobs)], cwd=work, env=env, check=True
        )
        statuses = results(work, env)
        killed = sorted(n for n, s in statuses.items() if s in KILLED)
        survived = sorted(n for n, s in statuses.items() if s in SURVIVED)
        at_import = {
            n
            for n in statuses
            if any(n.split(".")[-1].startswith(f"x_{f}__mutmut_") for f in IMPORT_TIME.get(args.module, ()))
        }
        killed = [n for n in killed if n not in at_import]
        survived = [n for n in survived if n not in at_import]
        if at_import:
            print(
                f"  run only at import, not counted: {len(at_import)} mutants of {', '.join(IMPORT_TIME[args.module])}"
            )
        other = sorted(f"{n}: {s}" for n, s in statuses.items() if s not in KILLED | SURVIVED)
        total = len(killed) + len(survived)
        score = 100.0 * len(killed) / total if total else 100.0
        print(f"{args.module}: {len(killed)} of {total} mutants killed ({score:.1f} %)")
        for line in other:
            print(f"  not counted: {line}")
        for name in survived:
            print(f"  survived: {name}")
            if args.survivors:
                diff = subprocess.run(
                    [sys.executable, "-m", "mutmut", "show", name], cwd=work, env=env, capture_output=True, text=True
                )
                print("    " + diff.stdout.strip().replace("\n", "\n    "))
        return 0
    finally:
        if args.keep:
            print(f"scratch directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
