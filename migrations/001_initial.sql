-- The ledger: jobs, their chunks (the unit of leasing), requests, results and invalid rows.
-- Every table is keyed by job so that one database holds many jobs and a job can be dropped whole.

CREATE TABLE jobs (
    id           bigserial PRIMARY KEY,
    name         text UNIQUE,
    input        text NOT NULL,
    settings     jsonb NOT NULL DEFAULT '{}',
    -- ingesting: the supervisor is still writing chunks; running: all chunks written;
    -- done: every row has its terminal state; interrupted: stopped, resumable.
    state        text NOT NULL DEFAULT 'ingesting'
                 CHECK (state IN ('ingesting', 'running', 'done', 'interrupted')),
    rows_read    bigint NOT NULL DEFAULT 0,   -- input rows stored so far (valid + invalid)
    ingest_done  boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now(),
    first_fetch_at timestamptz,
    finished_at  timestamptz
);

CREATE TABLE chunks (
    job_id        bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    chunk_no      integer NOT NULL,
    first_row     bigint NOT NULL,
    last_row      bigint NOT NULL,
    fetch_rows    integer NOT NULL,         -- rows of this chunk that need a fetch (not duplicates)
    done_rows     integer NOT NULL DEFAULT 0,
    state         text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'leased', 'done')),
    lease_owner   text,
    lease_expires timestamptz,
    -- Bumped by every lease: a worker whose fence is no longer current cannot commit.
    fence         bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, chunk_no)
);
CREATE INDEX chunks_open ON chunks (job_id, chunk_no) WHERE state <> 'done';

-- One row per valid input row. dup_of names the row whose fetch this row reuses.
CREATE TABLE requests (
    job_id      bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    row_no      bigint NOT NULL,
    chunk_no    integer NOT NULL,
    method      text NOT NULL,
    url         text NOT NULL,
    fingerprint bytea NOT NULL,
    dup_of      bigint,
    PRIMARY KEY (job_id, row_no)
);

-- The first row of each fingerprint in a job: the one that is fetched.
CREATE TABLE fingerprints (
    job_id      bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    fingerprint bytea NOT NULL,
    row_no      bigint NOT NULL,
    PRIMARY KEY (job_id, fingerprint)
);

CREATE TABLE invalid_rows (
    job_id  bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    row_no  bigint NOT NULL,
    raw     text NOT NULL,
    reason  text NOT NULL,
    PRIMARY KEY (job_id, row_no)
);

-- Exactly one result per request per job: the primary key makes every write idempotent.
CREATE TABLE results (
    job_id      bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    row_no      bigint NOT NULL,
    status      smallint,
    final_url   text,
    error_kind  text,
    error       text,
    attempts    smallint NOT NULL,
    from_cache  boolean NOT NULL DEFAULT false,
    elapsed_ms  real,
    body_bytes  bigint,
    body_sha256 bytea,
    fetched_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, row_no)
);
