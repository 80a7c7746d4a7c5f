-- What each worker process cost: peak resident memory and CPU time, reported with its heartbeat,
-- for `crawler bench` and `crawler status`.
ALTER TABLE workers ADD COLUMN peak_rss_bytes bigint, ADD COLUMN cpu_seconds real;
