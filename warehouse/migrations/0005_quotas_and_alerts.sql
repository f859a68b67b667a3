-- Quota limits, as set through the admin API (the proxy holds them in memory; this
-- table is what it loads at start). One row per subject x unit x period.
--   scope 'user':    subject_key = the end user id, subject_value = ''
--   scope 'default': subject_key = subject_value = '' (every user without limits of their own)
--   scope 'tag':     subject_key = the metadata key, subject_value = its value
-- amount: pico-dollars (1e-12 USD) for unit 'usd', else tokens or requests.
CREATE TABLE quotas (
    scope          VARCHAR NOT NULL,
    subject_key    VARCHAR NOT NULL,
    subject_value  VARCHAR NOT NULL,
    unit           VARCHAR NOT NULL,   -- usd | tokens | requests
    period         VARCHAR NOT NULL,   -- minute | day | month | total
    mode           VARCHAR NOT NULL,   -- hard | soft
    amount         DECIMAL(38, 0) NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (scope, subject_key, subject_value, unit, period)
);

-- Alerts: quota thresholds (raised by the proxy) and abuse flags (the abuse job).
-- dedupe_key makes each alert happen once (per period, for quota thresholds).
CREATE SEQUENCE alert_id_seq START 1;
CREATE TABLE alerts (
    alert_id         BIGINT PRIMARY KEY DEFAULT nextval('alert_id_seq'),
    dedupe_key       VARCHAR NOT NULL UNIQUE,
    kind             VARCHAR NOT NULL,   -- quota_threshold | abuse
    rule             VARCHAR NOT NULL,   -- "usd/day 80%", "spend_spike", ...
    severity         VARCHAR NOT NULL,   -- info | warning | critical
    message          VARCHAR NOT NULL,
    user_id          VARCHAR,
    subject          VARCHAR,            -- "user:alice", "tag:customer=acme"
    window_start     TIMESTAMPTZ,
    window_end       TIMESTAMPTZ,
    evidence         JSON,
    created_at       TIMESTAMPTZ NOT NULL,
    acknowledged_at  TIMESTAMPTZ,
    acknowledged_by  VARCHAR
);
