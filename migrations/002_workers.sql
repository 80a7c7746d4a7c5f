-- Workers that take part in a job, wherever they run, with a heartbeat: what `crawler status`
-- shows as live workers and hosts, and how a supervisor tells a dead local worker's leases.
CREATE TABLE workers (
    job_id       bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    worker_id    text NOT NULL,            -- host:pid, also the lease owner
    host         text NOT NULL,
    pid          integer NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    stopped_at   timestamptz,
    fetched      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, worker_id)
);
