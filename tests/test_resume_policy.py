"""A resumed job runs with the policy it was started with: its stored settings, this run's
capacity, --allow-net added to its list; a policy flag that would change it is refused."""

from __future__ import annotations

import asyncpg

from conftest import run_cli
from crawler.ledger.jobs import create_job, find_job, set_job_state
from crawler.settings import Settings, load_settings, policy_flags_changing
from test_faults import crawl_process, kill_tree, wait_for_results, workers_of


def stored(**values) -> dict:
    """A job's settings as `crawl` stores them."""
    doc = {k: v for k, v in Settings(**values).as_dict().items() if k != "dsn"}
    doc["url_column"] = None
    return doc


def test_only_policy_flags_that_differ_from_the_job_are_changes() -> None:
    job = stored(max_attempts=1, cache_ttl=3600.0, allow_net=["127.0.0.0/8"], workers=2)
    flags = {
        "max_attempts": 1,
        "cache_ttl": "1h",
        "allow_net": ["10.0.0.0/8"],
        "workers": 8,
        "concurrency": 9,
        "metrics_port": 9100,
    }
    settings, sources = load_settings(environ={}, flags=flags)
    assert policy_flags_changing(job, settings, sources) == []  # the same values, capacity, networks added
    settings, sources = load_settings(environ={}, flags={"max_attempts": 4, "no_cache": True, "cache_ttl": "1h"})
    assert sorted(policy_flags_changing(job, settings, sources)) == ["max_attempts", "no_cache"]
    # the environment and config files are not flags: the job's policy simply wins over them
    settings, sources = load_settings(environ={"CRAWLER_MAX_ATTEMPTS": "7"}, flags={})
    assert policy_flags_changing(job, settings, sources) == []
    # a setting the job never stored (a job older than it) has no policy to change
    del job["max_body_bytes"]
    settings, sources = load_settings(environ={}, flags={"max_body_bytes": 5})
    assert policy_flags_changing(job, settings, sources) == []


async def interrupted_job(dsn: str, name: str, **policy) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        job = await create_job(conn, name=name, input="/nonexistent/urls.csv", settings=stored(**policy))
        await set_job_state(conn, job.id, "interrupted")
    finally:
        await conn.close()


async def test_a_policy_flag_on_resume_is_refused_with_one_sentence(session_dsn, tmp_path):
    await interrupted_job(session_dsn, "policy-refused", max_attempts=1, store_bodies=False)
    for args in (
        ["resume", "policy-refused", "--max-attempts", "5"],
        ["crawl", str(tmp_path / "urls.csv"), "--resume", "--job-name", "policy-refused", "--store-bodies"],
    ):
        proc = run_cli(*args, "--dsn", session_dsn, "--workers", "1")
        err = proc.stderr.decode()
        assert proc.returncode == 1, err
        flag = args[-1] if args[-1].startswith("--") else args[-2]
        assert err.startswith(f"crawler: {flag} (the job has ") and "would change the policy" in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    conn = await asyncpg.connect(session_dsn)
    try:  # refused before anything ran
        assert await conn.fetchval("SELECT state FROM jobs WHERE name = 'policy-refused'") == "interrupted"
    finally:
        await conn.close()


async def test_kill_9_then_resume_without_the_flags_runs_with_the_jobs_policy(session_dsn, mock_process, tmp_path):
    path = tmp_path / "urls.csv"
    rows = 6000
    # Every tenth URL answers 503 five times: with the job's --max-attempts 1 it is tried once;
    # with the default of 3 it would be tried three times.
    path.write_text(
        "url\n"
        + "".join(
            f"{mock_process}/flaky/5/{i}\n" if i % 10 == 0 else f"{mock_process}/delay/2/{i}\n" for i in range(rows)
        )
    )
    name = "resume-policy"
    proc = crawl_process(session_dsn, path, name, "--max-attempts", "1")  # with --allow-net 127.0.0.1/32
    try:
        await wait_for_results(session_dsn, name, 300, proc)
        assert workers_of(proc)
    finally:
        kill_tree(proc)
    conn = await asyncpg.connect(session_dsn)
    try:
        before = await conn.fetchval(
            "SELECT count(*) FROM results r JOIN jobs j ON j.id = r.job_id WHERE j.name = $1", name
        )
        assert before < rows
        resumed = run_cli("resume", name, "--dsn", session_dsn, "--workers", "2", "--quiet")  # no --allow-net
        assert resumed.returncode == 0, resumed.stderr.decode()
        job = await find_job(conn, name)
        assert job.state == "done"
        counts = await conn.fetchrow(
            "SELECT count(*) AS n, count(*) FILTER (WHERE error_kind = 'blocked') AS blocked,"
            " count(*) FILTER (WHERE status = 200) AS ok,"
            " count(*) FILTER (WHERE status = 503 AND attempts = 1) AS once,"
            " max(attempts) AS most FROM results WHERE job_id = $1",
            job.id,
        )
        assert (counts["n"], counts["blocked"], counts["ok"], counts["once"], counts["most"]) == (
            rows,
            0,
            rows - rows // 10,
            rows // 10,
            1,
        )
    finally:
        await conn.close()
