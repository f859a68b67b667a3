-- The price catalog. Every row is one price in force for one model (or fine-tune
-- prefix) and service tier over [effective_from, effective_to). Rows are never updated
-- or deleted: a correction or an override is a new row, and the winner at any instant
-- is the row with the highest priority, then the latest recorded_at. So the catalog
-- keeps its own history, and a price change never rewrites costs already incurred.
CREATE SEQUENCE price_id_seq START 1;
CREATE TABLE prices (
    price_id                   BIGINT PRIMARY KEY DEFAULT nextval('price_id_seq'),
    model                      VARCHAR NOT NULL,  -- an id, or a prefix ending in '*'
    service_tier               VARCHAR NOT NULL,  -- default | flex | priority | batch | scale
    effective_from             TIMESTAMPTZ NOT NULL,
    effective_to               TIMESTAMPTZ,       -- exclusive; null: open-ended
    currency                   VARCHAR NOT NULL DEFAULT 'USD',
    -- USD per 1M tokens
    input_per_mtok             DECIMAL(18, 6),
    cached_input_per_mtok      DECIMAL(18, 6),
    cache_write_per_mtok       DECIMAL(18, 6),
    output_per_mtok            DECIMAL(18, 6),
    -- Long context: when a request's input tokens exceed the threshold, these rates
    -- apply to all of its tokens (OpenAI's and genai-prices' "cliff" rule).
    tier_threshold             BIGINT,
    tier_input_per_mtok        DECIMAL(18, 6),
    tier_cached_input_per_mtok DECIMAL(18, 6),
    tier_cache_write_per_mtok  DECIMAL(18, 6),
    tier_output_per_mtok       DECIMAL(18, 6),
    -- Hosted tools, billed apart from tokens.
    web_search_per_call        DECIMAL(18, 6),
    image_input_per_mtok       DECIMAL(18, 6),
    image_cached_input_per_mtok DECIMAL(18, 6),
    image_output_per_mtok      DECIMAL(18, 6),
    source                     VARCHAR NOT NULL,  -- e.g. 'genai-prices 0.2.3', 'file:prices.toml', 'api:alice'
    priority                   INTEGER NOT NULL,  -- overrides (100) beat the published catalog (0)
    recorded_at                TIMESTAMPTZ NOT NULL DEFAULT now(),
    note                       VARCHAR
);

-- One row per run of a scheduled job: freshness for the API and the dashboard.
CREATE SEQUENCE job_run_id_seq START 1;
CREATE TABLE job_runs (
    run_id        BIGINT PRIMARY KEY DEFAULT nextval('job_run_id_seq'),
    job           VARCHAR NOT NULL,
    mode          VARCHAR NOT NULL,   -- incremental | full
    started_at    TIMESTAMPTZ NOT NULL,
    finished_at   TIMESTAMPTZ,
    rows_in       BIGINT,
    rows_out      BIGINT,
    watermark     BIGINT,             -- usage_events.ingest_seq processed up to
    price_mark    BIGINT,             -- prices.price_id processed up to
    error         VARCHAR
);

-- Rollups. Money is integer pico-dollars (1e-12 USD) as DECIMAL(38, 0): every cost is
-- tokens x a price with at most 6 decimals per 1M tokens, so sums are exact and reports
-- round once, at the end.
CREATE TABLE usage_hourly (
    bucket            TIMESTAMPTZ NOT NULL,
    user_id           VARCHAR,
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
CREATE TABLE usage_daily AS SELECT * FROM usage_hourly WITH NO DATA;

CREATE TABLE usage_daily_tags (
    bucket            TIMESTAMPTZ NOT NULL,
    tag_key           VARCHAR NOT NULL,
    tag_value         VARCHAR,
    model             VARCHAR,
    requests          BIGINT NOT NULL,
    input_tokens      BIGINT NOT NULL,
    output_tokens     BIGINT NOT NULL,
    total_tokens      BIGINT NOT NULL,
    cost_pico         DECIMAL(38, 0) NOT NULL,
    unpriced          BIGINT NOT NULL
);

-- previous_response_id chains, each response mapped to the first one of its conversation.
CREATE TABLE conversation_links (
    response_id       VARCHAR NOT NULL,
    root_id           VARCHAR NOT NULL,
    depth             INTEGER NOT NULL
);

CREATE TABLE conversation_days (
    root_id           VARCHAR NOT NULL,
    bucket            TIMESTAMPTZ NOT NULL,
    user_id           VARCHAR,
    first_at          TIMESTAMPTZ NOT NULL,
    last_at           TIMESTAMPTZ NOT NULL,
    responses         BIGINT NOT NULL,
    input_tokens      BIGINT NOT NULL,
    output_tokens     BIGINT NOT NULL,
    total_tokens      BIGINT NOT NULL,
    cost_pico         DECIMAL(38, 0) NOT NULL,
    unpriced          BIGINT NOT NULL
);

CREATE TABLE conversations (
    root_id           VARCHAR NOT NULL,
    user_id           VARCHAR,
    first_at          TIMESTAMPTZ NOT NULL,
    last_at           TIMESTAMPTZ NOT NULL,
    responses         BIGINT NOT NULL,
    input_tokens      BIGINT NOT NULL,
    output_tokens     BIGINT NOT NULL,
    total_tokens      BIGINT NOT NULL,
    cost_pico         DECIMAL(38, 0) NOT NULL,
    unpriced          BIGINT NOT NULL
);
