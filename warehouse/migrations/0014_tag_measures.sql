-- The tag rollup keeps every measure a report shows (cached input and reasoning tokens,
-- errors, incomplete, failed), so a report by tag says the same from it as from the raw
-- events. The copies of closed months get the columns too (null there: those months'
-- figures stay as they were closed).
ALTER TABLE usage_daily_tags ADD COLUMN cached_input_tokens BIGINT;
ALTER TABLE usage_daily_tags ADD COLUMN reasoning_tokens BIGINT;
ALTER TABLE usage_daily_tags ADD COLUMN errors BIGINT;
ALTER TABLE usage_daily_tags ADD COLUMN incomplete BIGINT;
ALTER TABLE usage_daily_tags ADD COLUMN failed BIGINT;
ALTER TABLE closed_daily_tags ADD COLUMN cached_input_tokens BIGINT;
ALTER TABLE closed_daily_tags ADD COLUMN reasoning_tokens BIGINT;
ALTER TABLE closed_daily_tags ADD COLUMN errors BIGINT;
ALTER TABLE closed_daily_tags ADD COLUMN incomplete BIGINT;
ALTER TABLE closed_daily_tags ADD COLUMN failed BIGINT;

-- Rows rolled up before hold none of them: the next run rebuilds in full.
INSERT INTO job_runs (job, mode, started_at, finished_at, error)
SELECT 'rollup', 'full', now(), now(),
       'migration 0014 (tag measures): the next run rebuilds the rollups in full'
WHERE EXISTS (SELECT 1 FROM job_runs WHERE job = 'rollup');
