-- Rollups as appended partial sums (issue 18): an incremental run appends, for each day
-- it changed, the sums of what changed, and never rewrites stored rows; every reader
-- adds rows up by key; compaction folds a day's parts into one row per key.
--
-- One row per part appended: the day it belongs to, the run that wrote it, its rows.
-- A day with rows here has parts awaiting compaction; compaction (and a rebuild, or a
-- recompute of the day) deletes them.
CREATE TABLE rollup_parts (
    day     DATE NOT NULL,
    run_id  BIGINT NOT NULL,
    "rows"  BIGINT NOT NULL
);

-- What each run did, beyond rows in and out: seconds per step and kind (JSON), the
-- parts it appended, and the parts a compaction folded.
ALTER TABLE job_runs ADD COLUMN phases VARCHAR;
ALTER TABLE job_runs ADD COLUMN parts_written BIGINT;
ALTER TABLE job_runs ADD COLUMN parts_compacted BIGINT;
