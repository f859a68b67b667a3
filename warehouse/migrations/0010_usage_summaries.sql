-- Summaries of usage_daily for the questions asked most (spend per end user, spend per
-- model), so reports over months read thousands of rows, not millions: usage_daily's
-- grain (day x user x model x tier x status x endpoint) is nearly as fine as the events
-- when there are many users. Refreshed by the rollup job for the days it recomputed.
CREATE TABLE usage_daily_users (
    bucket            TIMESTAMPTZ NOT NULL,
    user_id           VARCHAR,
    requests          BIGINT NOT NULL,
    input_tokens      BIGINT NOT NULL,
    cached_input_tokens BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    output_tokens     BIGINT NOT NULL,
    reasoning_tokens  BIGINT NOT NULL,
    total_tokens      BIGINT NOT NULL,
    web_search_calls  BIGINT NOT NULL,
    cost_pico         DECIMAL(38, 0) NOT NULL,
    errors            BIGINT NOT NULL,
    incomplete        BIGINT NOT NULL,
    failed            BIGINT NOT NULL,
    unpriced          BIGINT NOT NULL,
    first_hour        TIMESTAMPTZ NOT NULL,   -- the user's first hour with usage that day
    last_hour         TIMESTAMPTZ NOT NULL
);

CREATE TABLE usage_daily_models (
    bucket            TIMESTAMPTZ NOT NULL,
    model             VARCHAR,
    service_tier      VARCHAR,
    status            VARCHAR NOT NULL,
    endpoint          VARCHAR NOT NULL,
    requests          BIGINT NOT NULL,
    input_tokens      BIGINT NOT NULL,
    cached_input_tokens BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    output_tokens     BIGINT NOT NULL,
    reasoning_tokens  BIGINT NOT NULL,
    total_tokens      BIGINT NOT NULL,
    web_search_calls  BIGINT NOT NULL,
    cost_pico         DECIMAL(38, 0) NOT NULL,
    errors            BIGINT NOT NULL,
    incomplete        BIGINT NOT NULL,
    failed            BIGINT NOT NULL,
    unpriced          BIGINT NOT NULL
);
