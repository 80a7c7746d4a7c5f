-- Per-chunk counters, so progress (polled every fraction of a second) reads the small chunks
-- table rather than counting results: input rows, invalid rows, and outcomes so far.
ALTER TABLE chunks
    ADD COLUMN input_rows integer NOT NULL DEFAULT 0,
    ADD COLUMN invalid_rows integer NOT NULL DEFAULT 0,
    ADD COLUMN ok_rows integer NOT NULL DEFAULT 0,
    ADD COLUMN failed_rows integer NOT NULL DEFAULT 0;
