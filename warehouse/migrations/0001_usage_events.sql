-- One row per upstream response (keyed by its id), plus one row per request that
-- got an HTTP error before any response existed (keyed by a generated id).
-- Token columns follow the Responses API; Chat Completions map onto them.
--
-- event_id is unique, but deliberately not a PRIMARY KEY: DuckDB's ART index costs
-- memory and insert time on tens of millions of rows. The writer keeps it unique by
-- anti-joining each batch against rows recorded in the same time window (a replayed
-- event keeps its recorded_at, and zone maps make that window cheap to scan).
CREATE TABLE usage_events (
    event_id               VARCHAR NOT NULL,
    response_id            VARCHAR,
    endpoint               VARCHAR NOT NULL,   -- 'responses' | 'chat.completions'
    model                  VARCHAR,            -- as the upstream returned it
    requested_model        VARCHAR,            -- as the client asked for it
    status                 VARCHAR NOT NULL,   -- completed, incomplete, failed, cancelled,
                                               -- queued, in_progress, interrupted, error
    http_status            SMALLINT,
    user_id                VARCHAR,
    user_source            VARCHAR,            -- header | user | safety_identifier
    metadata               JSON,
    input_tokens           BIGINT,
    cached_input_tokens    BIGINT,
    cache_write_tokens     BIGINT,
    cache_write_30m_tokens BIGINT,
    cache_write_12h_tokens BIGINT,
    output_tokens          BIGINT,
    reasoning_tokens       BIGINT,
    total_tokens           BIGINT,
    web_search_calls       INTEGER,
    image_gen_input_tokens BIGINT,
    image_gen_input_image_tokens BIGINT,
    image_gen_cached_tokens BIGINT,
    image_gen_output_tokens BIGINT,
    service_tier           VARCHAR,
    previous_response_id   VARCHAR,
    conversation_id        VARCHAR,
    background             BOOLEAN NOT NULL DEFAULT false,
    streamed               BOOLEAN NOT NULL DEFAULT false,
    client_disconnected    BOOLEAN NOT NULL DEFAULT false,
    incomplete_reason      VARCHAR,
    error_type             VARCHAR,
    error_code             VARCHAR,
    created_at             TIMESTAMPTZ NOT NULL,  -- the response's created_at (request time for errors)
    completed_at           TIMESTAMPTZ,
    request_started_at     TIMESTAMPTZ NOT NULL,
    latency_ms             DOUBLE,                -- request start to last byte from upstream
    ttft_ms                DOUBLE,                -- request start to first body byte from upstream
    key_fingerprint        VARCHAR,               -- sha256 prefix of the API key, never the key
    recorded_at            TIMESTAMPTZ NOT NULL,  -- when the proxy captured it
    ingest_seq             BIGINT NOT NULL,       -- writer batch that last wrote the row
    updated_at             TIMESTAMPTZ NOT NULL
);

-- Exactly-once bookkeeping: the journal position already moved into usage_events,
-- committed in the same transaction as the rows.
CREATE TABLE ingest_checkpoint (
    id        INTEGER PRIMARY KEY,
    segment   BIGINT NOT NULL,
    "offset"  BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
