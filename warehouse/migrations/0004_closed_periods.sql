-- Closed periods. Finance closes a month: its rollup rows are copied into closed_daily and
-- closed_daily_tags, and from then on its reports read those copies, so they never change.
-- Whatever changes the month afterwards (late events, a background response completed
-- late, a re-pricing) posts as dated rows of period_adjustments in the next open month.
CREATE TABLE closed_periods (
    period      DATE PRIMARY KEY,        -- the month's first day
    closed_at   TIMESTAMPTZ NOT NULL,
    closed_by   VARCHAR NOT NULL,
    note        VARCHAR
);

CREATE TABLE closed_daily AS SELECT * FROM usage_daily WITH NO DATA;
CREATE TABLE closed_daily_tags AS SELECT * FROM usage_daily_tags WITH NO DATA;

CREATE SEQUENCE adjustment_id_seq START 1;
CREATE TABLE period_adjustments (
    adjustment_id       BIGINT PRIMARY KEY DEFAULT nextval('adjustment_id_seq'),
    posted_period       DATE NOT NULL,           -- the open month it is reported in
    posted_at           TIMESTAMPTZ NOT NULL,    -- when the change was found
    for_period          DATE NOT NULL,           -- the closed month it corrects
    kind                VARCHAR NOT NULL,        -- 'daily' (user grain) | 'tags'
    bucket              TIMESTAMPTZ NOT NULL,    -- the day it corrects
    user_id             VARCHAR,
    model               VARCHAR,
    service_tier        VARCHAR,
    status              VARCHAR,
    endpoint            VARCHAR,
    tag_key             VARCHAR,
    tag_value           VARCHAR,
    requests            BIGINT NOT NULL,
    input_tokens        BIGINT,
    cached_input_tokens BIGINT,
    output_tokens       BIGINT,
    reasoning_tokens    BIGINT,
    total_tokens        BIGINT,
    cost_pico           DECIMAL(38, 0) NOT NULL,
    unpriced            BIGINT NOT NULL
);
