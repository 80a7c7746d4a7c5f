-- The cross-job response cache (--cache-ttl): the latest outcome per request fingerprint, with
-- the validators needed to revalidate it; and how each result was served from a cache.
CREATE TABLE response_cache (
    fingerprint   bytea PRIMARY KEY,
    status        smallint NOT NULL,
    final_url     text,
    body_bytes    bigint,
    body_sha256   bytea,
    etag          text,
    last_modified text,
    fetched_at    timestamptz NOT NULL DEFAULT now(),
    job_id        bigint
);

-- NULL: fetched. 'duplicate': the same request earlier in the job. 'fresh': a stored response
-- within its TTL. 'revalidated': a stored response the server confirmed with 304.
ALTER TABLE results ADD COLUMN cache_kind text;
