"""The `crawler` command as a user runs it: real processes, exit codes and one-sentence errors."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
import sys
import time

import asyncpg
import pytest

from conftest import ROOT, run_cli
from crawler.ledger.migrate import migration_files

ALLOW = ["--allow-net", "127.0.0.1/32"]


def test_missing_file_is_one_sentence_and_exit_1(session_dsn, tmp_path):
    proc = run_cli("crawl", str(tmp_path / "nope.csv"), "--dsn", session_dsn)
    assert proc.returncode == 1
    assert proc.stderr.decode().strip() == f"crawler: input file '{tmp_path / 'nope.csv'}' does not exist."
    assert b"Traceback" not in proc.stderr


def test_unreachable_database_is_exit_2_with_the_password_masked(tmp_path):
    path = tmp_path / "urls.txt"
    path.write_text("http://127.0.0.1/\n")
    proc = run_cli("crawl", str(path), "--dsn", "postgresql://me:hunter2@127.0.0.1:1/db")
    err = proc.stderr.decode()
    assert proc.returncode == 2
    assert err.startswith("crawler: cannot connect to PostgreSQL at postgresql://me:***@127.0.0.1:1/db")
    assert "hunter2" not in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["crawl", "x.csv", "--workers", "many"], "--workers"),
        (["crawl", "x.csv", "--concurrency", "-3"], "cannot be negative"),
        (["crawl"], "input"),
        (["export", "1", "--format", "xml"], "--format"),
        (["frobnicate"], "frobnicate"),
        (["bench", "--workers", "0"], "--workers must be auto or at least 1"),
        (["worker", "--workers", "some"], "--workers"),
        (["crawl", "x.csv", "--per-host-rate", "fast"], "--per-host-rate"),
        (["crawl", "x.csv", "--robots", "sometimes"], "--robots"),
        (["crawl", "x.csv", "--cache-ttl", "soon"], "soon"),
        (["resume", "weekly", "--chunk-size", "5"], "--chunk-size"),  # a job's chunks are decided when it starts
        # A job name that is all digits would hide the job with that id; blank or with control
        # characters, it would not print as itself in `status`, `jobs` or the summary.
        (["crawl", "x.csv", "--job-name", "42"], "all digits"),
        (["crawl", "x.csv", "--job-name", ""], "cannot be empty"),
        (["crawl", "x.csv", "--job-name", "  "], "cannot be empty"),
        (["crawl", "x.csv", "--job-name", "weekly\x1b[2J"], "control characters"),
        (["crawl", "x.csv", "--job-name", "weekly\u202e"], "control characters"),
        (["crawl", "x.csv", "--job-name", "w" * 201], "at most 200 characters"),
    ],
)
def test_bad_flags_are_exit_1_with_one_sentence(args, fragment):
    proc = run_cli(*args)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert fragment in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_missing_url_column_fails_before_anything_starts(session_dsn, tmp_path):
    path = tmp_path / "cols.csv"
    path.write_text("id,link\n1,http://127.0.0.1/\n")
    proc = run_cli("crawl", str(path), "--dsn", session_dsn, "--job-name", "no-url-column")
    assert proc.returncode == 1
    assert "no column named 'url'" in proc.stderr.decode()
    proc = run_cli("status", "no-url-column", "--dsn", session_dsn)
    assert proc.returncode == 1 and "no job" in proc.stderr.decode()


def test_stdin_crawl_summary_json_and_both_export_formats(session_dsn, mock_process, tmp_path):
    urls = [f"{mock_process}/ok/{i}" for i in range(40)] + [f"{mock_process}/ok/0", "gopher://old"]
    summary_path = tmp_path / "summary.json"
    proc = run_cli(
        "crawl",
        "-",
        "--dsn",
        session_dsn,
        "--workers",
        "2",
        "--job-name",
        "stdin-job",
        "--summary-json",
        str(summary_path),
        *ALLOW,
        input="\n".join(urls).encode(),
    )
    assert proc.returncode == 0, proc.stderr.decode()
    summary = json.loads(summary_path.read_text())
    expected = {"rows": 42, "requests": 41, "fetched": 40, "from_cache": 1, "invalid": 1, "ok": 41, "failed": 0}
    assert {k: summary[k] for k in expected} == expected
    assert {"job_id", "elapsed_s", "requests_per_s"} <= summary.keys()
    assert summary["rows"] == summary["fetched"] + summary["from_cache"] + summary["invalid"]

    out = tmp_path / "out.jsonl"
    proc = run_cli("export", "stdin-job", "--dsn", session_dsn, "--format", "jsonl", "-o", str(out))
    assert proc.returncode == 0, proc.stderr.decode()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in records] == list(range(1, 43))
    first, dup, bad = records[0], records[40], records[41]
    assert first["status"] == 200 and first["attempts"] == 1 and first["from_cache"] is False
    assert isinstance(first["elapsed_ms"], float) and first["body_bytes"] == 3 and len(first["body_sha256"]) == 64
    assert dup["from_cache"] is True and dup["status"] == 200 and dup["body_sha256"] == first["body_sha256"]
    assert bad["error_kind"] == "invalid_url" and "scheme" in bad["error"]

    proc = run_cli("export", str(summary["job_id"]), "--dsn", session_dsn, "--format", "csv")
    assert proc.returncode == 0
    table = list(csv.DictReader(io.StringIO(proc.stdout.decode())))
    assert len(table) == 42
    assert list(table[0]) == [
        "row",
        "url",
        "normalized_url",
        "status",
        "final_url",
        "error_kind",
        "error",
        "attempts",
        "from_cache",
        "elapsed_ms",
        "body_bytes",
        "body_sha256",
    ]
    assert table[0]["status"] == "200" and table[41]["error_kind"] == "invalid_url"

    proc = run_cli("export", "stdin-job", "--dsn", session_dsn, "--only", "invalid")
    assert [json.loads(line)["row"] for line in proc.stdout.decode().splitlines()] == [42]


def test_first_run_uses_the_embedded_database(mock_process, tmp_path):
    home = tmp_path / "home"
    env = {"CRAWLER_HOME": str(home), "CRAWLER_DSN": "", "DATABASE_URL": ""}
    path = tmp_path / "urls.txt"
    path.write_text("".join(f"{mock_process}/ok/{i}\n" for i in range(20)))
    try:
        proc = run_cli("crawl", str(path), "--workers", "1", "--quiet", *ALLOW, env=env)
        assert proc.returncode == 0, proc.stderr.decode()
        proc = run_cli("db", "url", env=env)
        assert proc.returncode == 0 and f"host={home}" in proc.stdout.decode()
        proc = run_cli("status", "--json", env=env)
        assert json.loads(proc.stdout)["fetched"] == 20
    finally:
        stopped = run_cli("db", "stop", env=env)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout.decode()
    assert stopped.stderr.decode() == ""  # one plain line on stdout, no library's warning


def test_migrate_is_idempotent_from_the_command_line(fresh_dsn):
    first = run_cli("migrate", "--dsn", fresh_dsn)
    second = run_cli("migrate", "--dsn", fresh_dsn)
    assert first.returncode == second.returncode == 0
    every = ", ".join(str(version) for version, _ in migration_files())
    assert first.stdout.decode().strip() == f"applied migrations: {every}"
    assert second.stdout.decode().strip() == "the schema is up to date."


def test_a_worker_started_elsewhere_joins_the_job_through_the_ledger(session_dsn, mock_process, tmp_path):
    """`crawler worker` needs only the DSN and the job: PostgreSQL is the coordinator."""
    path = tmp_path / "shared.txt"
    path.write_text("".join(f"{mock_process}/delay/20/{i}\n" for i in range(3000)))
    crawl = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "crawler",
            "crawl",
            str(path),
            "--dsn",
            session_dsn,
            "--job-name",
            "joined",
            "--workers",
            "1",
            "--concurrency",
            "5",
            "--chunk-size",
            "100",
            *ALLOW,
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )  # ~12 s alone: the helper joins in time
    try:
        deadline = time.monotonic() + 30
        while run_cli("status", "joined", "--dsn", session_dsn).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        helper = run_cli(
            "worker",
            "--job",
            "joined",
            "--dsn",
            session_dsn,
            "--workers",
            "1",
            "--concurrency",
            "20",
            *ALLOW,
            timeout=120,
        )
        assert helper.returncode == 0, helper.stderr.decode()
        assert crawl.wait(120) == 0, crawl.stderr.read().decode()
    finally:
        if crawl.poll() is None:
            crawl.kill()
            crawl.wait(10)
    status = json.loads(run_cli("status", "joined", "--dsn", session_dsn, "--json").stdout)
    assert status["state"] == "done" and status["fetched"] == 3000

    async def fetched_by_worker() -> list[int]:
        conn = await asyncpg.connect(session_dsn)
        try:
            rows = await conn.fetch(
                "SELECT w.fetched FROM workers w JOIN jobs j ON j.id = w.job_id WHERE j.name = 'joined'"
            )
            return [r["fetched"] for r in rows]
        finally:
            await conn.close()

    shares = asyncio.run(fetched_by_worker())
    assert len(shares) == 2 and all(n > 0 for n in shares) and sum(shares) == 3000


def _command_paths(parser=None, path=()):
    """Every command and subcommand, found from the parser itself so that a new one cannot be missed."""
    import argparse

    from crawler.cli import build_parser

    parser = build_parser() if parser is None else parser
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield from _command_paths(subparser, (*path, name))


def _example_commands(help_text: str) -> list[list[str]]:
    """The words of each `crawler ...` line in a help text's examples, without shell comments, a leading
    `cat x |` or a trailing redirection."""
    import shlex

    commands, in_examples = [], False
    for line in help_text.splitlines():
        if line.strip() in ("example:", "examples:"):
            in_examples = True
        elif in_examples and not line.strip():
            break
        elif in_examples:
            words = shlex.split(line, comments=True)
            if words and words[0] != "crawler" and "|" in words:
                words = words[words.index("|") + 1 :]
            if not words or words[0] != "crawler":
                continue
            ends = [i for i, word in enumerate(words) if word in ("|", ">", ">>", "<", "&&", ";")]
            commands.append(words[: ends[0]] if ends else words)
    return commands


@pytest.mark.parametrize("path", list(_command_paths()), ids=lambda path: " ".join(path) or "crawler")
def test_every_command_has_help_with_examples_that_parse(path, capsys):
    from crawler.cli import build_parser, main

    with pytest.raises(SystemExit) as stopped:
        main([*path, "--help"])
    assert stopped.value.code == 0
    examples = _example_commands(capsys.readouterr().out)
    assert examples, f"`crawler {' '.join(path)} --help` shows no example line starting with `crawler `"
    for words in examples:
        assert words[1 : 1 + len(path)] == list(path), f"an example of another command: {' '.join(words)}"
        build_parser().parse_args(words[1:])  # a stale example raises UsageError here


def test_top_level_help_ends_with_the_exit_codes(capsys):
    from crawler.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    lines = [line.split(None, 1) for line in out[out.index("exit codes:") :].splitlines()[1:] if line.strip()]
    for code, meaning in (
        ("0", "done"),
        ("1", "usage or input error"),
        ("2", "infrastructure error"),
        ("130", "interrupted"),
    ):
        assert any(words[0] == code and meaning in words[-1] for words in lines), code


async def test_status_and_jobs_on_a_database_without_jobs_then_with_two(fresh_dsn, tmp_path):
    empty = run_cli("status", "--dsn", fresh_dsn)
    assert empty.returncode == 0 and empty.stdout.decode().strip() == "no jobs yet.", empty.stderr.decode()
    path = tmp_path / "none.txt"
    path.write_text("not a url\n")  # one invalid row: a job that finishes without a request
    for name in ("first-job", "second-job"):
        done = run_cli("crawl", str(path), "--dsn", fresh_dsn, "--job-name", name, "--quiet")
        assert done.returncode == 0, done.stderr.decode()
    latest = run_cli("status", "--dsn", fresh_dsn, "--json")
    assert latest.returncode == 0, latest.stderr.decode()
    assert json.loads(latest.stdout)["job_name"] == "second-job"  # with no job named, the newest
    listed = run_cli("jobs", "--dsn", fresh_dsn).stdout.decode()
    assert listed.index("first-job") < listed.index("second-job")  # oldest first


# --- the flags of the settings, generated from their declarations -----------------------------------

RUN_FLAGS = {
    "--dsn",
    "--workers",
    "--concurrency",
    "--allow-net",
    "--max-attempts",
    "--per-host-concurrency",
    "--no-adaptive",
    "--per-host-rate",
    "--max-body-bytes",
    "--store-bodies",
    "--insecure",
    "--ca-file",
    "--dns-server",
    "--cache-ttl",
    "--no-cache",
    "--metrics-port",
}
SETTING_FLAGS = {  # as the README and scripts use them: none may go or change its name
    "crawl": RUN_FLAGS | {"--chunk-size", "--robots"},
    "bench": RUN_FLAGS | {"--chunk-size", "--robots"},
    "resume": RUN_FLAGS,
    "retry": RUN_FLAGS,
    "worker": {"--dsn", "--workers", "--concurrency", "--allow-net", "--metrics-port", "--ca-file", "--dns-server"},
    "export": {"--dsn"},
    "status": {"--dsn"},
    "jobs": {"--dsn"},
    "migrate": {"--dsn"},
    "config": {"--dsn"},
    "db": {"--dsn"},
}


def _subparser(command: str):
    import argparse

    from crawler.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def _setting_actions(parser) -> dict:
    from crawler.settings import KEYS

    return {action.option_strings[0]: action for action in parser._actions if action.dest in KEYS}


@pytest.mark.parametrize("command", sorted(SETTING_FLAGS))
def test_each_command_keeps_its_setting_flags(command):
    assert set(_setting_actions(_subparser(command))) == SETTING_FLAGS[command]


def _shown(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


@pytest.mark.parametrize("command", ["crawl", "worker"])
def test_each_setting_flag_has_help_with_the_dataclass_default(command):
    from crawler.settings import Settings

    defaults = Settings()
    for flag, action in _setting_actions(_subparser(command)).items():
        default = getattr(defaults, action.dest)
        assert action.help and action.help.strip(), flag
        assert action.default is None, flag  # unset, the file and the environment decide
        if isinstance(default, bool) or default in (None, "", []):
            assert "(default: " not in action.help, flag
        else:
            assert action.help.endswith(f" (default: {_shown(default)})"), flag


def test_crawl_help_shows_each_default_from_the_dataclass(capsys):
    from crawler.cli import main

    with pytest.raises(SystemExit):
        main(["crawl", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help: compare it unwrapped
    for shown in (
        "--concurrency N fetch tasks per worker (default: 200)",
        "--chunk-size N rows per chunk, the unit of leasing (default: 1000)",
        "--max-body-bytes N body cap in bytes after decompression; 0 = read none (default: 10485760)",
        "--robots {obey,ignore}",
        "--no-adaptive keep each host's limit fixed",
        "--dns-server HOST[:PORT] resolve names with this DNS server",
    ):
        assert shown in out


def _argument(dest: str, kind: type, tmp_path) -> tuple[list[str], object]:
    """Words that give a setting's flag a value, and the value the setting then has."""
    special = {
        "dsn": ("postgresql://u@127.0.0.1/db", "postgresql://u@127.0.0.1/db"),
        "workers": ("3", 3),
        "allow_net": ("10.0.0.0/8", ["10.0.0.0/8"]),
        "dns_servers": ("127.0.0.1:5353", ["127.0.0.1:5353"]),
        "cache_ttl": ("2h", 7200.0),
        "robots": ("obey", "obey"),
    }
    if dest == "ca_file":
        path = tmp_path / "ca.pem"
        path.write_text("")
        return [str(path)], str(path)
    if dest in special:
        text, value = special[dest]
        return [text], value
    return {int: (["7"], 7), float: (["2.5"], 2.5)}[kind]


@pytest.mark.parametrize("command", ["crawl", "worker", "retry"])
def test_every_setting_flag_sets_its_setting(command, tmp_path):
    from crawler.cli import _flags, build_parser
    from crawler.settings import Settings, load_settings

    defaults = Settings()
    positional = {"crawl": ["x.csv"], "retry": ["weekly"], "worker": []}[command]
    for flag, action in _setting_actions(_subparser(command)).items():
        default = getattr(defaults, action.dest)
        if isinstance(default, bool):
            words, expected = [flag], not default  # a switch turns its setting away from the default
        else:
            words, expected = _argument(action.dest, type(default), tmp_path)
            words = [flag, *words]
        args = build_parser().parse_args([command, *positional, *words])
        settings, sources = load_settings(environ={}, flags=_flags(args))
        assert getattr(settings, action.dest) == expected and sources[action.dest] == "flag", flag
