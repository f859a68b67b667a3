-- Events still pending (queued, in_progress, interrupted) as the rollup job counted them:
-- the writer only ever updates pending rows, so when one of them is written again the
-- next run takes this row's partial sums away and adds the new ones, instead of
-- recomputing its buckets from the raw events. The job owns this table: a full rebuild
-- refills it, every run keeps it in step with what the rollups count.
CREATE TABLE rollup_pending (
    event_id                     VARCHAR NOT NULL,
    response_id                  VARCHAR,
    endpoint                     VARCHAR NOT NULL,
    model                        VARCHAR,
    service_tier                 VARCHAR,
    status                       VARCHAR NOT NULL,
    user_id                      VARCHAR,
    created_at                   TIMESTAMPTZ NOT NULL,
    reasoning_tokens             BIGINT,
    total_tokens                 BIGINT,
    input_tokens                 BIGINT,
    cached_input_tokens          BIGINT,
    cache_write_tokens           BIGINT,
    output_tokens                BIGINT,
    web_search_calls             BIGINT,
    image_gen_input_tokens       BIGINT,
    image_gen_input_image_tokens BIGINT,
    image_gen_cached_tokens      BIGINT,
    image_gen_output_tokens      BIGINT,
    tag_values                   VARCHAR[],
    conversation_root            VARCHAR,   -- the conversation it was counted in
    cost_pico                    BIGINT,    -- as priced then (null: unpriced)
    unpriced                     BIGINT NOT NULL
);

-- A warehouse rolled up before this table existed has pending events counted but not kept
-- here: its next run must rebuild in full (a failed full run makes the next one full).
INSERT INTO job_runs (job, mode, started_at, finished_at, error)
SELECT 'rollup', 'full', now(), now(),
       'migration 0003 (rollup_pending): the next run rebuilds the rollups in full'
WHERE EXISTS (SELECT 1 FROM job_runs WHERE job = 'rollup');
