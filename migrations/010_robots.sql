-- Each host's robots.txt as a job decided it (--robots obey), so that every worker on every
-- machine decides the same way and the file is fetched once per job: a row is first a claim
-- (verdict NULL: `owner` is fetching it until `claim_expires`), then the decision.
CREATE TABLE robots (
    job_id        bigint NOT NULL,
    host          text NOT NULL,          -- scheme://host[:port], as the per-host scheduler keys it
    verdict       text,                   -- rules | allow_all | unreachable; NULL while claimed
    body          text,                   -- the file (its first 500 KiB) when verdict = rules
    reason        text,                   -- why allow_all or unreachable
    owner         text,                   -- the worker fetching it, while claimed
    claim_expires timestamptz,
    attempts      integer NOT NULL DEFAULT 0,
    decided_at    timestamptz,            -- when the file was fetched (kept when another job reuses it)
    reused_from   bigint,                 -- the job whose decision this one reused (--cache-ttl)
    PRIMARY KEY (job_id, host)
);

-- --cache-ttl: a later job reuses the latest fresh decision for a host.
CREATE INDEX robots_by_host ON robots (host, decided_at DESC) WHERE verdict IN ('rules', 'allow_all');
