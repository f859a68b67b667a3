-- The FOCUS export of closed months (warehouse/focus_close.py). Closing a month copies
-- its FOCUS grain (day x end user x model x tier x tags x charge) into closed_focus, and
-- its export reads that copy from then on, so it never changes. What later changes a
-- closed month is posted as the difference per grain row into focus_adjustments, dated
-- on a day of the first open month after it, and exported on that day as ChargeClass
-- Correction rows. focus_marks: how far the posting has looked (the events' ingest_seq,
-- the price catalog's mark).
CREATE TABLE closed_focus (
    day         DATE NOT NULL,
    user_id     VARCHAR,
    model       VARCHAR NOT NULL,
    tier        VARCHAR NOT NULL,
    tags        VARCHAR NOT NULL,       -- a JSON object of the rolled-up tag keys
    charge      VARCHAR NOT NULL,
    unit        VARCHAR NOT NULL,
    quantity    BIGINT NOT NULL,
    requests    BIGINT NOT NULL,
    cost_pico   DECIMAL(38, 0) NOT NULL,  -- 0 when unpriced
    unpriced    BOOLEAN NOT NULL
);

CREATE TABLE focus_adjustments (
    posted_period DATE NOT NULL,          -- the open month it is billed in
    posted_day    DATE NOT NULL,          -- the day of that month it is exported on
    posted_at     TIMESTAMPTZ NOT NULL,   -- when the change was found
    day         DATE NOT NULL,            -- the closed day it corrects
    user_id     VARCHAR,
    model       VARCHAR NOT NULL,
    tier        VARCHAR NOT NULL,
    tags        VARCHAR NOT NULL,
    charge      VARCHAR NOT NULL,
    unit        VARCHAR NOT NULL,
    quantity    BIGINT NOT NULL,          -- differences: negative ones too
    requests    BIGINT NOT NULL,
    cost_pico   DECIMAL(38, 0) NOT NULL,
    unpriced    BOOLEAN NOT NULL
);

CREATE TABLE focus_marks (
    seq         BIGINT NOT NULL,
    price_mark  BIGINT NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);

-- The months whose grain is in closed_focus: a month closed before these tables existed
-- (closed_periods less this) gets its copy at the next posting, from the events as they
-- are then, before anything is compared with it.
CREATE TABLE focus_copied (
    period      DATE NOT NULL
);
