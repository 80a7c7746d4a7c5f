-- Each row's foreign-key check on job_id was about half of every INSERT into requests and
-- results (benchmarks/RESULTS.md: PostgreSQL CPU -25 %, throughput +5 to +10 % without them).
-- The ledger writes rows only for jobs it created, so the check bought nothing.
ALTER TABLE requests     DROP CONSTRAINT IF EXISTS requests_job_id_fkey;
ALTER TABLE results      DROP CONSTRAINT IF EXISTS results_job_id_fkey;
ALTER TABLE fingerprints DROP CONSTRAINT IF EXISTS fingerprints_job_id_fkey;
ALTER TABLE invalid_rows DROP CONSTRAINT IF EXISTS invalid_rows_job_id_fkey;
ALTER TABLE bodies       DROP CONSTRAINT IF EXISTS bodies_job_id_fkey;
