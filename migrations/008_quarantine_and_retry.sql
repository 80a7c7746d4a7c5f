-- A chunk that keeps killing its workers is quarantined rather than allowed to stop the job:
-- `deaths` counts the holders of the chunk that died while holding it, with no holder finishing
-- it in between; at the limit its rows still without a result become `internal` results and
-- `quarantined` says why the chunk is done.
ALTER TABLE chunks
    ADD COLUMN deaths integer NOT NULL DEFAULT 0,
    ADD COLUMN quarantined boolean NOT NULL DEFAULT false;
-- What each worker holds: a chunk with deaths is leased only by a worker holding nothing, and
-- a worker holding such a chunk leases nothing more, so that the next death names one chunk.
CREATE INDEX chunks_held ON chunks (job_id, lease_owner) WHERE state = 'leased';
CREATE INDEX chunks_quarantined ON chunks (job_id, chunk_no) WHERE quarantined;

-- `crawler retry`: the attempts of the results it deleted to fetch their rows again, added to
-- the new results' attempts when the job is done again.
CREATE TABLE retried (
    job_id   bigint NOT NULL,
    row_no   bigint NOT NULL,
    attempts integer NOT NULL,
    PRIMARY KEY (job_id, row_no)
);
