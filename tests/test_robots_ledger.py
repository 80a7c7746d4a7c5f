"""The ledger's robots.txt decisions: one claimer per host, a dead claimer's host taken over, the
first decision the one that holds, and --cache-ttl's reuse across jobs."""

from __future__ import annotations

import uuid

from crawler.ledger import registry
from crawler.ledger.jobs import create_job
from crawler.ledger.robots_claims import RobotsRecord, claim_robots, decide_robots, release_robots_claims

RULES = RobotsRecord("rules", "User-agent: *\nDisallow: /private/\n", "")


async def new_job(db) -> int:
    job = await create_job(db, name=f"robots-{uuid.uuid4().hex[:8]}", input="-", settings={})
    return job.id


async def claim(db, job: int, hosts: list[str], owner: str, *, claim_seconds: float = 60, reuse_ttl: float = 0):
    return await claim_robots(db, job, hosts, owner, claim_seconds=claim_seconds, live_seconds=15, reuse_ttl=reuse_ttl)


async def test_one_worker_claims_a_host_the_others_wait_and_all_read_one_decision(db):
    job = await new_job(db)
    for worker in ("a", "b"):
        await registry.register_worker(db, job, worker, "here", 1)
    first = await claim(db, job, ["http://h1", "http://h2"], "a")
    assert sorted(first.claimed) == ["http://h1", "http://h2"] and first.decided == {}
    second = await claim(db, job, ["http://h1", "http://h3"], "b")
    assert second.claimed == ["http://h3"] and second.decided == {}  # h1 is a's, b waits
    assert await decide_robots(db, job, "http://h1", RULES, 1) == RULES
    third = await claim(db, job, ["http://h1"], "b")
    assert third.decided == {"http://h1": RULES} and third.claimed == []


async def test_a_dead_or_late_claimer_loses_the_host_and_the_first_decision_holds(db):
    job = await new_job(db)
    await registry.register_worker(db, job, "b", "here", 2)
    await claim(db, job, ["http://dead", "http://late"], "a")  # "a" never registered: not live
    taken = await claim(db, job, ["http://dead"], "b")
    assert taken.claimed == ["http://dead"]
    await db.execute("UPDATE robots SET owner = 'b' WHERE job_id = $1 AND host = 'http://late'", job)
    await db.execute("UPDATE robots SET claim_expires = now() - interval '1 s' WHERE job_id = $1", job)
    await registry.register_worker(db, job, "c", "here", 3)
    assert (await claim(db, job, ["http://late"], "c")).claimed == ["http://late"]  # expired, although b lives
    # b, presumed gone, comes back with its own decision: c's came first and holds for both
    allow = RobotsRecord("allow_all", "", "robots.txt unavailable: HTTP 404")
    assert await decide_robots(db, job, "http://late", allow, 1) == allow
    assert await decide_robots(db, job, "http://late", RULES, 1) == allow


async def test_released_claims_are_taken_at_once(db):
    job = await new_job(db)
    await registry.register_worker(db, job, "a", "here", 1)
    await registry.register_worker(db, job, "b", "here", 2)
    await claim(db, job, ["http://h"], "a")
    assert (await claim(db, job, ["http://h"], "b")).claimed == []
    await release_robots_claims(db, job, "a")
    assert (await claim(db, job, ["http://h"], "b")).claimed == ["http://h"]


async def test_cache_ttl_reuses_a_fresh_answer_of_another_job_never_an_outage(db):
    old = await new_job(db)
    await claim(db, old, ["http://kept", "http://down"], "a")
    await decide_robots(db, old, "http://kept", RULES, 1)
    await decide_robots(db, old, "http://down", RobotsRecord("unreachable", "", "no answer"), 3)
    job = await new_job(db)
    got = await claim(db, job, ["http://kept", "http://down"], "b", reuse_ttl=3600)
    assert got.decided == {"http://kept": RULES} and got.claimed == ["http://down"]
    assert await db.fetchval("SELECT reused_from FROM robots WHERE job_id = $1 AND host = 'http://kept'", job) == old
    stale = await new_job(db)
    await db.execute("UPDATE robots SET decided_at = now() - interval '2 hours' WHERE job_id = $1", old)
    await db.execute("UPDATE robots SET decided_at = now() - interval '2 hours' WHERE job_id = $1", job)
    assert (await claim(db, stale, ["http://kept"], "c", reuse_ttl=3600)).claimed == ["http://kept"]
