-- Per-row method, headers and body (CSV columns `method`, `headers` as a JSON object, `body`),
-- and response bodies kept with --store-bodies (zlib-compressed, capped).
ALTER TABLE requests ADD COLUMN headers jsonb, ADD COLUMN body bytea;

CREATE TABLE bodies (
    job_id       bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    row_no       bigint NOT NULL,
    content_type text,
    encoding     text NOT NULL DEFAULT 'zlib',
    body         bytea NOT NULL,
    PRIMARY KEY (job_id, row_no)
);
