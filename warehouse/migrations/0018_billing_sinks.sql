-- Billing sinks (tokentill/billing_sinks.py): usage pushed to a billing system, each sink
-- keeping its own place in the events. The place is a key of `usage_events`' order by
-- (ingest_seq, event_id): `ingest_seq` grows in commit order (in a lake too, under its
-- commit lock), so what a sink has passed never gains a row; a pending response that
-- settles later comes back with a newer ingest_seq, and is sent then. One row per sink,
-- rewritten (delete + insert, one transaction) by the run that moves it.
CREATE TABLE sink_marks (
    sink         VARCHAR NOT NULL,
    seq          BIGINT NOT NULL,      -- every event up to this ingest_seq is passed ...
    after_event  VARCHAR,              -- ... or, when set, those of `seq` up to this id
    delivered    BIGINT NOT NULL,      -- events the receiver accepted (or already had)
    skipped      BIGINT NOT NULL,      -- billable, but not this sink's (subject, filter, zero)
    rejected     BIGINT NOT NULL,      -- refused by the receiver as malformed: sink_rejects
    caught_up_at TIMESTAMPTZ,          -- the last run that reached the newest event
    last_error   VARCHAR,              -- why the last run stopped short (null: it did not)
    updated_at   TIMESTAMPTZ NOT NULL
);

-- Events a receiver refused for themselves (a 4xx naming the event, not the sink): set
-- aside here, with the answer, so that one bad event never stops the rest.
CREATE TABLE sink_rejects (
    sink        VARCHAR NOT NULL,
    event_id    VARCHAR NOT NULL,
    response_id VARCHAR,
    subject     VARCHAR,
    reason      VARCHAR NOT NULL,
    rejected_at TIMESTAMPTZ NOT NULL
);
