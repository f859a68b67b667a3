"""The rollup job's cost: a full rebuild and an incremental run over millions of events.

One run, in a fresh DuckDB file in a temporary directory:

1. generates `--events` synthetic usage events (10,000 end users, skewed; 20 models, most
   of them priced by genai-prices' OpenAI catalog, a fine-tune and two unknown models that
   stay unpriced; mostly the default service tier; some incomplete, failed and error rows;
   tag metadata; about 20% of responses continuing an earlier one; 90 days ending now)
   with DuckDB SQL alone, and seeds the price catalog;
2. times a full rebuild (`RollupJob.run(full=True)`), with a breakdown of where it goes;
3. times the same per-day aggregation (count, token sums, cost from a prices join)
   written as one plain DuckDB SQL statement: the baseline; then the job's usage rollups
   themselves (hourly, daily, tags and the two summaries, each at the job's grain, as
   tables) in plain DuckDB SQL, and checks they hold the job's rows: what DuckDB alone
   takes to build them; and the floors (reading the events, copying the rows written);
4. inserts `--new-events` events (most in the last day, a few hundred late ones dated
   days earlier) and completes the background responses still `queued`, then times an
   incremental run in a fresh process (as after a restart) and checks it added to exactly
   the days that changed, recomputing none; then inserts as many again and times a
   second run of the same job in the same process, as in a server that runs it every
   minute;
5. checks the rollups add up (daily requests = events; daily cost = hourly cost).

Each phase runs in its own subprocess, so each one's peak RSS is its own (wait4's
ru_maxrss). Figures are checked against targets (PASS/MISS) and summarised as a
markdown table. A MISS does not fail the run; something broken (a failed job run, sums
that do not add up, an incremental run touching the wrong days) exits 1.

    python bench/rollup.py [--events 10000000] [--new-events 100000] [--keep]
                           [--generated FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
from _common import (
    CLOCK_TICKS,
    ROOT,
    BenchError,
    make_workdir,
    markdown_table,
    remove_workdir,
    verdict,
)

from tokentill.warehouse import rollup_compact
from tokentill.warehouse.db import open_warehouse
from tokentill.warehouse.jobs import RollupConfig, RollupJob, RunResult
from tokentill.warehouse.prices import CatalogCache, seed_published
from tokentill.warehouse.rollup_merge import usage_deltas
from tokentill.warehouse.rollup_rebuild import events_per_day, recompute
from tokentill.warehouse.rollup_run import (
    EVENT_COLUMNS,
    PriceSnapshot,
    Run,
    select_events,
    shares,
)
from tokentill.warehouse.rollups import HOURLY_KEYS, USAGE_MEASURES
from tokentill.warehouse.summaries import MODEL_KEYS


def code_fingerprint() -> str:
    """A hash of the warehouse package's source: which job code a phase imported (other
    engineers may change it while a long run goes on)."""
    digest = hashlib.sha1(usedforsecurity=False)
    package = ROOT / "warehouse"
    for path in sorted([*package.rglob("*.py"), *package.rglob("*.sql")]):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


CODE_AT_IMPORT = code_fingerprint()

USERS = 10_000
DAYS = 90
# The traffic's shape (`--shape`, passed to the phases' processes in the environment):
# `uniform`: users log-uniform over 10,000, models as MODELS' shares, load flat over the
# day; `zipf`: shaped like real traffic: users drawn from a Zipf law (s = 1.1: a few
# hundred users make most calls), models by a Zipf law of their rank (a few models, most
# calls), and a diurnal load (four times busier at its peak than at night).
SHAPE = os.environ.get("TOKENTILL_BENCH_SHAPE", "uniform")
ZIPF_S = 1.1
BATCH = 20_000  # events per ingest_seq, like the writer's batches
LATE_SHARE = 0.004  # of the new events: dated days earlier
LATE_DAYS = (3, 8, 21)  # how many days earlier the late events are dated
QUEUED_WINDOW = timedelta(hours=2)  # background responses this recent are still queued

# Targets.
FULL_RATIO = 1.25  # the full rebuild / plain DuckDB SQL building the usage rollups, same run
FIRST_S = 1.5  # an incremental run of 100,000 new events, first in its process
INCREMENTAL_S = 1.0  # the same, warm
CPU_PER_EVENT_US = 10.0  # warm
PEAK_GB = 3.0

# (model, share in %, reasoning model, has flex prices, has priority prices)
MODELS: tuple[tuple[str, float, bool, bool, bool], ...] = (
    ("gpt-4o-mini", 18, False, False, True),
    ("gpt-4.1-mini", 12, False, False, True),
    ("gpt-5-mini", 10, True, True, True),
    ("gpt-4o", 8, False, False, True),
    ("gpt-5", 8, True, True, True),
    ("gpt-4.1", 6, False, False, True),
    ("o4-mini", 6, True, True, True),
    ("gpt-5-nano", 5, True, True, False),
    ("gpt-4.1-nano", 4, False, False, True),
    ("gpt-4o-2024-08-06", 4, False, False, True),
    ("gpt-4o-mini-2024-07-18", 3, False, False, True),
    ("o3", 3, True, True, True),
    ("gpt-5-2025-08-07", 3, True, True, True),
    ("gpt-4.1-2025-04-14", 2, False, False, True),
    ("o3-mini", 2, True, False, False),
    ("gpt-5.1", 2, True, True, True),
    ("o1", 1, True, False, False),
    ("ft:gpt-4o-mini-2024-07-18:acme::x1", 1.5, False, False, False),
    ("acme-llama-3.1-70b", 1, False, False, False),  # unknown: stays unpriced
    ("local-mistral-small", 0.5, False, False, False),  # unknown: stays unpriced
)
IMAGE_TOOL_MODELS = ("gpt-4.1", "gpt-5", "gpt-4o")
UNKNOWN_MODELS = ("acme-llama-3.1-70b", "local-mistral-small")
FEATURES = ("chat", "search", "summarize", "extract", "agent", "classify", "translate", "draft")


# -- synthetic events, in SQL ----------------------------------------------------------------

# Every random choice is a hash of the event's index, so any event's attributes (its
# response id, whether it is a valid parent to continue) can be recomputed from its index.
_MACROS = f"""
CREATE OR REPLACE TEMP MACRO bench_u(i, k) AS (hash(i, k) % 1000000)::DOUBLE / 1000000.0;
CREATE OR REPLACE TEMP MACRO bench_is_resp(i) AS bench_u(i, 4) < 0.70;
CREATE OR REPLACE TEMP MACRO bench_is_error(i) AS bench_u(i, 3) >= 0.99;
CREATE OR REPLACE TEMP MACRO bench_resp_id(i) AS
    'resp_' || md5(i::VARCHAR) || lpad(to_hex(i::BIGINT), 16, '0');
CREATE OR REPLACE TEMP MACRO bench_chat_id(i) AS
    'chatcmpl-' || left(md5(i::VARCHAR), 13) || lpad(to_hex(i::BIGINT), 16, '0');
CREATE OR REPLACE TEMP MACRO bench_parent_ok(j) AS
    j >= 0 AND bench_is_resp(j) AND NOT bench_is_error(j);
CREATE OR REPLACE TEMP MACRO bench_user(i) AS
    least(CAST(floor({{user_draw}}) AS BIGINT), {USERS});
"""
# A draw of user rank in [1, USERS]: log-uniform, or Zipf (the continuous power law's
# inverse CDF: (1 + u (N^(1-s) - 1))^(1 / (1 - s))).
_USER_DRAW = {
    "uniform": f"exp(bench_u(i, 6) * ln({USERS}))",
    "zipf": f"pow(1 + bench_u(i, 6) * (pow({USERS}, {1 - ZIPF_S}) - 1), {1 / (1 - ZIPF_S)})",
}
_MACROS = _MACROS.replace("{user_draw}", _USER_DRAW[SHAPE])


def _shares() -> list[tuple[str, int]]:
    """Each model's slots of 1000: MODELS' shares, or (zipf) by 1 / rank^1.2 in MODELS'
    order, the unknown models kept in the tail."""
    if SHAPE != "zipf":
        return [(model, round(share * 10)) for model, share, *_ in MODELS]
    weights = [1 / (rank + 1) ** 1.2 for rank in range(len(MODELS))]
    slots = [max(1, round(1000 * w / sum(weights))) for w in weights]
    slots[0] += 1000 - sum(slots)
    return [(model, n) for (model, *_), n in zip(MODELS, slots, strict=True)]


def _model_case() -> str:
    """A CASE picking a model from a hash slot in [0, 1000), in proportion to its share."""
    branches, upper = [], 0
    for model, slots in _shares():
        upper += slots
        branches.append(f"WHEN slot < {upper} THEN '{model}'")
    if upper != 1000:
        raise BenchError(f"model shares add up to {upper / 10}%, not 100%")
    return "CASE " + " ".join(branches) + " END"


def _in(names: list[str]) -> str:
    return "(" + ", ".join(f"'{n}'" for n in names) + ")"


def events_sql(lo: int, hi: int, created_at: str, ingest_seq: str, continues: str) -> str:
    """INSERT events with indexes [lo, hi). `created_at`, `ingest_seq` and `continues`
    (whether this event may continue an earlier response) are SQL over `i`."""
    reasoning = _in([m for m, _, r, _, _ in MODELS if r])
    flex = _in([m for m, _, _, f, _ in MODELS if f])
    priority = _in([m for m, _, _, _, p in MODELS if p])
    features = "[" + ", ".join(f"'{f}'" for f in FEATURES) + "]"
    # A continuation tries three candidate parents at most an hour or so earlier.
    candidates = [f"i - 1 - hash(i, {20 + n}) % 3000" for n in range(3)]
    parent = " ".join(f"WHEN bench_parent_ok({c}) THEN bench_resp_id({c})" for c in candidates)
    return f"""
INSERT INTO usage_events BY NAME
WITH a AS (
    SELECT
        i,
        {created_at} AS created_at,
        {ingest_seq} AS ingest_seq,
        {continues} AS may_continue,
        hash(i, 8) % 1000 AS slot,
        bench_u(i, 3) AS r_status,
        bench_is_resp(i) AS is_resp,
        bench_user(i) AS u,
        bench_u(i, 7) < 0.02 AS anonymous,
        bench_u(i, 9) < 0.03 AS background,
        bench_u(i, 5) AS r_prev,
        bench_u(i, 15) AS r_tier,
        bench_u(i, 16) AS r_latency
    FROM range({lo}, {hi}) AS t(i)
), b AS (
    SELECT
        *,
        {_model_case()} AS model,
        is_resp AND background AS is_background,
        CASE
            WHEN r_status >= 0.99 THEN 'error'
            WHEN is_resp AND background
                 AND created_at > TIMESTAMPTZ '{{queued_after}}' THEN 'queued'
            WHEN r_status < 0.955 THEN 'completed'
            WHEN r_status < 0.975 THEN 'incomplete'
            WHEN r_status < 0.985 THEN 'failed'
            ELSE 'cancelled'
        END AS status,
        exp(ln(300) + r_latency * ln(200)) AS latency_ms
    FROM a
), c AS (
    SELECT
        *,
        status IN ('completed', 'incomplete') AS has_usage,
        CAST(exp(ln(40) + bench_u(i, 10) * ln(3000)) AS BIGINT) AS inp,
        CAST(exp(ln(5) + bench_u(i, 13) * ln(1600)) AS BIGINT) AS outp,
        created_at - to_microseconds(CAST(hash(i, 17) % 50000 AS BIGINT))
            AS request_started_at
    FROM b
)
SELECT
    CASE WHEN status = 'error' THEN 'evt_' || md5('evt' || i::VARCHAR)
         WHEN is_resp THEN bench_resp_id(i) ELSE bench_chat_id(i) END AS event_id,
    CASE WHEN status = 'error' THEN NULL
         WHEN is_resp THEN bench_resp_id(i) ELSE bench_chat_id(i) END AS response_id,
    CASE WHEN is_resp THEN 'responses' ELSE 'chat.completions' END AS endpoint,
    model,
    model AS requested_model,
    status,
    CAST(CASE WHEN status <> 'error' THEN 200
              WHEN hash(i, 18) % 3 = 0 THEN 400
              WHEN hash(i, 18) % 3 = 1 THEN 429 ELSE 500 END AS SMALLINT) AS http_status,
    CASE WHEN NOT anonymous THEN 'user_' || lpad(u::VARCHAR, 5, '0') END AS user_id,
    CASE WHEN anonymous THEN NULL
         WHEN u % 10 < 6 THEN 'header' WHEN u % 10 < 9 THEN 'user'
         ELSE 'safety_identifier' END AS user_source,
    CASE WHEN bench_u(i, 19) >= 0.08 THEN json_object(
        'team', 'team-' || (u % 12)::VARCHAR,
        'project', 'proj-' || ((u * 7) % 40)::VARCHAR,
        'feature', CASE WHEN bench_u(i, 24) < 0.9
                        THEN ({features})[1 + CAST(hash(i, 25) % {len(FEATURES)} AS BIGINT)] END,
        'customer', 'cust-' || lpad((u % 800)::VARCHAR, 4, '0')
    ) END AS metadata,
    CASE WHEN has_usage THEN inp END AS input_tokens,
    CASE WHEN has_usage THEN
        CASE WHEN bench_u(i, 11) < 0.45 THEN CAST(inp * bench_u(i, 12) * 0.9 AS BIGINT)
             ELSE 0 END
    END AS cached_input_tokens,
    CASE WHEN has_usage THEN outp END AS output_tokens,
    CASE WHEN has_usage THEN
        CASE WHEN model IN {reasoning} THEN CAST(outp * bench_u(i, 14) * 0.85 AS BIGINT)
             ELSE 0 END
    END AS reasoning_tokens,
    CASE WHEN has_usage THEN inp + outp END AS total_tokens,
    CASE WHEN has_usage AND is_resp THEN
        CASE WHEN bench_u(i, 26) < 0.04 THEN CAST(1 + hash(i, 27) % 3 AS INTEGER) ELSE 0 END
    END AS web_search_calls,
    CASE WHEN has_usage AND is_resp AND model IN {_in(list(IMAGE_TOOL_MODELS))}
              AND bench_u(i, 28) < 0.02 THEN CAST(50 + hash(i, 29) % 450 AS BIGINT) END
        AS image_gen_input_tokens,
    CASE WHEN has_usage AND is_resp AND model IN {_in(list(IMAGE_TOOL_MODELS))}
              AND bench_u(i, 28) < 0.02 THEN CAST(hash(i, 29) % 2 * 323 AS BIGINT) END
        AS image_gen_input_image_tokens,
    CASE WHEN has_usage AND is_resp AND model IN {_in(list(IMAGE_TOOL_MODELS))}
              AND bench_u(i, 28) < 0.02 THEN CAST(1056 + hash(i, 29) % 3 * 1552 AS BIGINT) END
        AS image_gen_output_tokens,
    CASE
        WHEN NOT is_resp AND r_tier >= 0.98 THEN NULL
        WHEN model IN {flex} AND r_tier < 0.10 THEN 'flex'
        WHEN model IN {priority} AND r_tier >= 0.10 AND r_tier < 0.15 THEN 'priority'
        ELSE 'default'
    END AS service_tier,
    CASE WHEN is_resp AND may_continue AND r_prev < 0.29 THEN CASE {parent} END END
        AS previous_response_id,
    is_background AS background,
    NOT is_background AND bench_u(i, 30) < 0.5 AS streamed,
    NOT is_background AND bench_u(i, 30) < 0.002 AS client_disconnected,
    CASE WHEN status = 'incomplete' THEN 'max_output_tokens' END AS incomplete_reason,
    CASE WHEN status = 'failed' THEN 'server_error'
         WHEN status = 'error' THEN 'invalid_request_error' END AS error_type,
    CASE WHEN status = 'error' THEN 'rate_limit_exceeded' END AS error_code,
    created_at,
    CASE WHEN status NOT IN ('error', 'queued')
         THEN created_at + to_microseconds(CAST(latency_ms * 1000 AS BIGINT)) END
        AS completed_at,
    request_started_at,
    latency_ms,
    CASE WHEN NOT is_background AND bench_u(i, 30) < 0.5
         THEN latency_ms * (0.1 + 0.2 * bench_u(i, 31)) END AS ttft_ms,
    'sha256:' || left(md5('key-' || (u % 25)::VARCHAR), 16) AS key_fingerprint,
    request_started_at + to_microseconds(CAST(latency_ms * 1000 AS BIGINT) + 2000)
        AS recorded_at,
    ingest_seq,
    request_started_at + to_microseconds(CAST(latency_ms * 1000 AS BIGINT) + 2000)
        AS updated_at
FROM c
"""


def _diurnal(start: datetime, offset_us: str) -> str:
    """`start` + an offset spread evenly, warped within each day to a diurnal load: a
    day's fraction x becomes g(x) = x - A/2pi (sin 2pi(x - p) + sin 2pi p), increasing,
    g(0) = 0 and g(1) = 1, whose density 1 / (1 - A cos 2pi(x - p)) is (1 + A) / (1 - A)
    = 4 times higher at p (15:00 after start's time of day) than half a day away."""
    a, p, day = 0.6, 0.625, 86_400_000_000
    x = f"(({offset_us}) / {day} - floor(({offset_us}) / {day}))"
    warped = f"({x} - {a} / (2 * pi()) * (sin(2 * pi() * ({x} - {p})) + sin(2 * pi() * {p})))"
    return (
        f"TIMESTAMPTZ '{_ts(start)}' + to_microseconds(CAST("
        f"(floor(({offset_us}) / {day}) + {warped}) * {day} AS BIGINT))"
    )


def _ts(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")


def _scalar(conn: duckdb.DuckDBPyConnection, sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    return None if row is None else row[0]


def _peak_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


# -- phases (each in its own process) ------------------------------------------------------


def phase_generate(db: Path, events: int) -> dict[str, Any]:
    """Generate the events and seed the prices (`events` 0: the file holds them already,
    from an earlier run's --generated copy: only describe it)."""
    now = datetime.now(UTC)
    start = now - timedelta(days=DAYS)
    conn = open_warehouse(db)
    conn.execute(_MACROS)
    generate_s = seed_s = 0.0
    prices = 0
    if events:
        step_us = DAYS * 86_400 * 1_000_000 / events
        clock = time.perf_counter()
        created = (
            f"TIMESTAMPTZ '{_ts(start)}' + to_microseconds("
            f"CAST((i + 0.9 * bench_u(i, 1)) * {step_us} AS BIGINT))"
        )
        if SHAPE == "zipf":
            created = _diurnal(start, f"(i + 0.9 * bench_u(i, 1)) * {step_us}")
        sql = events_sql(0, events, created, f"i // {BATCH} + 1", "true").replace(
            "{queued_after}", _ts(now - QUEUED_WINDOW)
        )
        conn.execute(sql)
        generate_s = time.perf_counter() - clock
        clock = time.perf_counter()
        prices = seed_published(conn)
        seed_s = time.perf_counter() - clock
        conn.execute("CHECKPOINT")
    stats = conn.execute(
        """SELECT count(*), count(previous_response_id), count(*) FILTER (status = 'completed'),
                  count(*) FILTER (status = 'queued'), count(DISTINCT user_id),
                  count(DISTINCT model), min(created_at), max(created_at),
                  count(*) FILTER (cached_input_tokens > input_tokens
                                   OR reasoning_tokens > output_tokens
                                   OR total_tokens <> input_tokens + output_tokens),
                  count(*) FILTER (service_tier <> 'default')
           FROM usage_events"""
    ).fetchone()
    conn.close()
    if stats is None:
        raise BenchError("no statistics")
    if stats[8]:
        raise BenchError(f"{stats[8]} generated events break a token invariant")
    return {
        "events": stats[0],
        "continued": stats[1],
        "completed": stats[2],
        "queued": stats[3],
        "users": stats[4],
        "models": stats[5],
        "first": str(stats[6]),
        "last": str(stats[7]),
        "non_default_tier": stats[9],
        "generate_s": generate_s,
        "seed_s": seed_s,
        "prices": prices,
        "db_bytes": db.stat().st_size,
    }


def phase_report(result: RunResult) -> dict[str, float]:
    """Seconds per `<step>/<kind>` as the job timed them (`RunResult.phases`), and the
    run's bookkeeping around them (its `job_runs` row, the transaction's COMMIT)."""
    out = dict(result.phases)
    out["job/bookkeeping (job_runs, COMMIT)"] = result.seconds - sum(result.phases.values())
    return out


def server_memory_limit() -> str | None:
    """DuckDB's memory limit as `tokentill serve` sets it by default (None: DuckDB's own)."""
    from tokentill.settings import Settings

    field = Settings.model_fields.get("warehouse_memory_limit")
    return None if field is None else str(field.default)


def _open(db: Path, memory_limit: str | None) -> duckdb.DuckDBPyConnection:
    if memory_limit:
        return open_warehouse(db, memory_limit=memory_limit)
    return open_warehouse(db)


def _run_job(
    db: Path, full: bool, memory_limit: str | None
) -> tuple[RunResult, float, duckdb.DuckDBPyConnection, RollupJob]:
    """One run of the job as the server makes it; returns it with its CPU seconds."""
    conn = _open(db, memory_limit)
    job = RollupJob(conn.cursor, RollupConfig())
    cpu = time.process_time()
    result = job.run(full=full)
    cpu_s = time.process_time() - cpu
    if result.error:
        raise BenchError(f"the rollup run failed: {result.error}")
    return result, cpu_s, conn, job


_COUNTED = (
    "usage_hourly",
    "usage_daily",
    "usage_daily_tags",
    "conversation_days",
    "conversations",
    "conversation_links",
)


def phase_full(db: Path, memory_limit: str | None) -> dict[str, Any]:
    result, cpu_s, conn, _ = _run_job(db, True, memory_limit)
    tables = {t: _scalar(conn, f"SELECT count(*) FROM {t}") for t in _COUNTED}
    # Status as counts instead of a key of the grain: how many rows it would save.
    without_status = {
        t: _scalar(
            conn,
            f"""SELECT count(*) FROM (SELECT bucket, user_id, model, service_tier, endpoint
                FROM {t} GROUP BY ALL)""",
        )
        for t in ("usage_hourly", "usage_daily")
    }
    conn.close()
    return {
        "without_status": without_status,
        "seconds": result.seconds,
        "rows_in": result.rows_in,
        "rows_out": result.rows_out,
        "days": result.days,
        "mode": result.mode,
        "cpu_s": cpu_s,
        "profile": phase_report(result),
        "tables": tables,
        "db_bytes": db.stat().st_size,
    }


# What both SQL phases price with: the default tier's price of each model in force now
# (by its own name, else its dated snapshot's family), in pico-dollars per token. Exact for
# the default tier over the window; flex, priority and fine-tunes are not priced by it.
_PRICED_SQL = r"""
price_now AS (
    SELECT model,
           CAST(input_per_mtok * 1000000 AS BIGINT) AS input_pico,
           CAST(coalesce(cached_input_per_mtok, input_per_mtok) * 1000000 AS BIGINT)
               AS cached_pico,
           CAST(output_per_mtok * 1000000 AS BIGINT) AS output_pico,
           CAST(coalesce(web_search_per_call, 0) * 1000000000000 AS BIGINT) AS search_pico
    FROM prices
    WHERE service_tier = 'default' AND effective_to IS NULL
    QUALIFY row_number() OVER (PARTITION BY model
                               ORDER BY priority DESC, recorded_at DESC, price_id DESC) = 1
), priced AS (
    SELECT e.created_at, e.user_id, e.model, e.service_tier, e.status, e.endpoint,
           e.metadata, e.input_tokens, e.cached_input_tokens, e.cache_write_tokens,
           e.output_tokens, e.reasoning_tokens, e.total_tokens, e.web_search_calls,
           coalesce(exact.input_pico, family.input_pico) AS input_pico,
           coalesce(exact.cached_pico, family.cached_pico) AS cached_pico,
           coalesce(exact.output_pico, family.output_pico) AS output_pico,
           coalesce(exact.search_pico, family.search_pico) AS search_pico
    FROM usage_events AS e
    LEFT JOIN price_now AS exact ON exact.model = e.model
    LEFT JOIN price_now AS family
           ON family.model = regexp_replace(e.model, '-\d{4}-\d{2}-\d{2}$', '')
)"""
_COST_SQL = """sum(CAST((coalesce(input_tokens, 0) - coalesce(cached_input_tokens, 0)) * input_pico
                + coalesce(cached_input_tokens, 0) * cached_pico
                + coalesce(output_tokens, 0) * output_pico
                + coalesce(web_search_calls, 0) * search_pico AS DECIMAL(38, 0))) AS cost_pico,
       count(*) FILTER (input_pico IS NULL
                        AND coalesce(input_tokens, 0) + coalesce(output_tokens, 0) > 0)
           AS unpriced"""
_BASELINE_SQL = f"""
CREATE OR REPLACE TABLE bench_baseline_daily AS
WITH {_PRICED_SQL}
SELECT date_trunc('day', created_at) AS bucket, user_id, model, service_tier, status,
       count(*) AS requests,
       sum(coalesce(input_tokens, 0)) AS input_tokens,
       sum(coalesce(cached_input_tokens, 0)) AS cached_input_tokens,
       sum(coalesce(output_tokens, 0)) AS output_tokens,
       sum(coalesce(reasoning_tokens, 0)) AS reasoning_tokens,
       sum(coalesce(total_tokens, 0)) AS total_tokens,
       sum(coalesce(web_search_calls, 0)) AS web_search_calls,
       {_COST_SQL}
FROM priced
GROUP BY ALL
"""

# The usage rollups of the job (not its conversations), each at the job's grain, written
# by plain DuckDB SQL as tables of the same file: what DuckDB alone takes to build them.
_SUMMED = ", ".join(f"sum({c}) AS {c}" for c in USAGE_MEASURES)
_COUNTED_SQL = ", ".join(
    f"sum(coalesce({c}, 0)) AS {c}"
    for c in USAGE_MEASURES
    if c.endswith("_tokens") or c == "web_search_calls"
)
_GRAIN = ", ".join(k for k in HOURLY_KEYS if k != "bucket")
_MODEL_GRAIN = ", ".join(k for k in MODEL_KEYS if k != "bucket")
_TAG_KEYS = RollupConfig().tag_keys
_TAG_PATHS = ", ".join("'$.\"" + key + "\"'" for key in _TAG_KEYS)
_SQL_ROLLUPS: dict[str, str] = {
    "usage_hourly": f"""
        WITH {_PRICED_SQL}
        SELECT date_trunc('hour', created_at) AS bucket, {_GRAIN},
               count(*) AS requests,
               {_COUNTED_SQL},
               {_COST_SQL},
               count(*) FILTER (status = 'error') AS errors,
               count(*) FILTER (status = 'incomplete') AS incomplete,
               count(*) FILTER (status = 'failed') AS failed
        FROM priced GROUP BY ALL""",
    "usage_daily": f"""SELECT date_trunc('day', bucket) AS bucket, {_GRAIN}, {_SUMMED}
        FROM bench_sql_usage_hourly GROUP BY ALL""",
    "usage_daily_users": f"""SELECT date_trunc('day', bucket) AS bucket, user_id, {_SUMMED},
               min(bucket) AS first_hour, max(bucket) AS last_hour
        FROM bench_sql_usage_hourly GROUP BY ALL""",
    "usage_daily_models": f"""SELECT bucket, {_MODEL_GRAIN}, {_SUMMED}
        FROM bench_sql_usage_daily GROUP BY ALL""",
    "usage_daily_tags": f"""
        WITH {_PRICED_SQL}, tagged AS (
            SELECT *, json_extract_string(metadata, [{_TAG_PATHS}]) AS tag_values
            FROM priced
        ), flat AS (
            SELECT *, ({list(_TAG_KEYS)})[i] AS tag_key, tag_values[i] AS tag_value
            FROM tagged, range(1, {len(_TAG_KEYS) + 1}) AS keys(i)
        )
        SELECT date_trunc('day', created_at) AS bucket, tag_key, tag_value, model,
               count(*) AS requests,
               sum(coalesce(input_tokens, 0)) AS input_tokens,
               sum(coalesce(output_tokens, 0)) AS output_tokens,
               sum(coalesce(total_tokens, 0)) AS total_tokens,
               {_COST_SQL}
        FROM flat WHERE tag_value IS NOT NULL GROUP BY ALL""",
}


def phase_baseline(db: Path, memory_limit: str | None) -> dict[str, Any]:
    conn = _open(db, memory_limit)
    events = _scalar(conn, "SELECT count(*) FROM usage_events")
    clock, cpu = time.perf_counter(), time.process_time()
    conn.execute(_BASELINE_SQL)
    seconds, cpu_s = time.perf_counter() - clock, time.process_time() - cpu
    row = conn.execute(
        "SELECT count(*), sum(requests), sum(cost_pico), sum(unpriced) FROM bench_baseline_daily"
    ).fetchone()
    job = conn.execute("SELECT sum(cost_pico), sum(unpriced) FROM usage_daily").fetchone()
    # Where the two must agree to the pico-dollar: default tier (prices unchanged over the
    # window), no image generation, no fine-tune (the SQL's join does not price those).
    same = f"""coalesce(service_tier, 'default') = 'default'
        AND model NOT IN {_in(list(IMAGE_TOOL_MODELS))} AND model NOT LIKE 'ft:%'"""
    subset = conn.execute(
        f"""SELECT (SELECT sum(cost_pico) FROM bench_baseline_daily WHERE {same}),
                   (SELECT sum(cost_pico) FROM usage_daily WHERE {same})"""
    ).fetchone()
    conn.close()
    if row is None or job is None or subset is None:
        raise BenchError("no baseline result")
    return {
        "seconds": seconds,
        "cpu_s": cpu_s,
        "events": events,
        "rows_out": row[0],
        "requests": int(row[1]),
        "cost_pico": int(row[2] or 0),
        "unpriced": int(row[3]),
        "job_cost_pico": int(job[0] or 0),
        "job_unpriced": int(job[1]),
        "subset_sql_pico": int(subset[0] or 0),
        "subset_job_pico": int(subset[1] or 0),
    }


def phase_sql_rollups(db: Path, memory_limit: str | None) -> dict[str, Any]:
    """The job's usage rollups (hourly, daily, tags and the two summaries: every table but
    the conversations') written by plain DuckDB SQL, each at the job's grain, as tables
    of the same file, then checked against the job's row counts and dropped. Priced more
    simply than the job (`_PRICED_SQL`), so this is less work than the job's, not more."""
    conn = _open(db, memory_limit)
    seconds: dict[str, float] = {}
    clock, cpu = time.perf_counter(), time.process_time()
    for table, sql in _SQL_ROLLUPS.items():
        started = time.perf_counter()
        conn.execute(f"CREATE TABLE bench_sql_{table} AS {sql}")
        seconds[table] = time.perf_counter() - started
    conn.execute("CHECKPOINT")
    total_s, cpu_s = time.perf_counter() - clock, time.process_time() - cpu
    rows = {
        table: (
            int(_scalar(conn, f"SELECT count(*) FROM bench_sql_{table}")),
            int(_scalar(conn, f"SELECT count(*) FROM {table}")),
        )
        for table in _SQL_ROLLUPS
    }
    requests = _scalar(conn, "SELECT sum(requests) FROM bench_sql_usage_daily")
    for table in reversed(list(_SQL_ROLLUPS)):
        conn.execute(f"DROP TABLE bench_sql_{table}")
    conn.execute("CHECKPOINT")
    conn.close()
    return {
        "seconds": total_s,
        "cpu_s": cpu_s,
        "tables": seconds,
        "rows": rows,
        "requests": int(requests),
    }


def phase_floor(db: Path, memory_limit: str | None) -> dict[str, Any]:
    """The least DuckDB spends to read what the full rebuild reads (the events' columns,
    into Arrow) and to store what it wrote (every output table copied table to table, no
    grouping, no Arrow, then dropped). Below the two no rollup job can go on this
    machine, whatever computes the rows."""
    conn = _open(db, memory_limit)
    # Reading: the columns the job reads (tag values out of the metadata JSON included),
    # into Arrow, a batch at a time, and nothing done with them.
    select = select_events([c for c in EVENT_COLUMNS if c != "event_id"], RollupConfig().tag_keys)
    clock, cpu = time.perf_counter(), time.process_time()
    reader = conn.sql(f"SELECT {select} FROM usage_events AS e").to_arrow_reader(1_000_000)
    read_rows = sum(batch.num_rows for batch in reader)
    read_s, read_cpu_s = time.perf_counter() - clock, time.process_time() - cpu
    tables = [*_COUNTED, "usage_daily_users", "usage_daily_models"]
    rows = sum(int(_scalar(conn, f"SELECT count(*) FROM {t}")) for t in tables)
    clock, cpu = time.perf_counter(), time.process_time()
    for table in tables:
        conn.execute(f"CREATE TABLE bench_floor_{table} AS FROM {table} LIMIT 0")
        conn.execute(f"INSERT INTO bench_floor_{table} SELECT * FROM {table}")
    seconds, cpu_s = time.perf_counter() - clock, time.process_time() - cpu
    for table in tables:
        conn.execute(f"DROP TABLE bench_floor_{table}")
    conn.execute("CHECKPOINT")
    conn.close()
    return {
        "seconds": seconds,
        "cpu_s": cpu_s,
        "rows": rows,
        "read_s": read_s,
        "read_cpu_s": read_cpu_s,
        "read_rows": read_rows,
    }


def _add_events(
    conn: duckdb.DuckDBPyConnection, new_events: int, now: datetime
) -> tuple[int, int, int, float]:
    """Insert `new_events` events, most over the 24 hours before `now`, in order, a few
    late ones dated days earlier, and complete the background responses still queued (in
    one more writer batch). Returns the events inserted, those late, the queued rows
    completed and the seconds it took."""
    first = int(_scalar(conn, "SELECT count(*) FROM usage_events"))
    seq = int(_scalar(conn, "SELECT max(ingest_seq) FROM usage_events"))
    late = f"bench_u(i, 32) < {LATE_SHARE}"
    late_days = "[" + ", ".join(str(d) for d in LATE_DAYS) + "]"
    step_us = 86_400 * 1_000_000 / new_events
    created = f"""CASE WHEN {late}
        THEN TIMESTAMPTZ '{_ts(now)}'
             - to_days(CAST(({late_days})[1 + CAST(hash(i, 33) % {len(LATE_DAYS)} AS BIGINT)]
                            AS INTEGER))
             - to_microseconds(CAST(hash(i, 34) % 3600000000 AS BIGINT))
        ELSE TIMESTAMPTZ '{_ts(now - timedelta(days=1))}'
             + to_microseconds(CAST((i - {first} + 0.9 * bench_u(i, 1)) * {step_us} AS BIGINT))
        END"""
    clock = time.perf_counter()
    sql = events_sql(
        first,
        first + new_events,
        created,
        f"{seq} + (i - {first}) // {BATCH} + 1",
        f"NOT ({late})",
    ).replace("{queued_after}", _ts(now))  # nothing new is queued
    conn.execute(sql)
    completed_seq = seq + math.ceil(new_events / BATCH) + 1
    completed = conn.execute(
        f"""UPDATE usage_events SET
                status = 'completed',
                input_tokens = 1000 + hash(event_id, 1) % 5000,
                cached_input_tokens = 0,
                output_tokens = 200 + hash(event_id, 2) % 2000,
                reasoning_tokens = 0,
                total_tokens = 1000 + hash(event_id, 1) % 5000 + 200 + hash(event_id, 2) % 2000,
                completed_at = TIMESTAMPTZ '{_ts(now)}',
                ingest_seq = {completed_seq},
                updated_at = TIMESTAMPTZ '{_ts(now)}'
            WHERE status = 'queued'"""
    ).fetchone()
    insert_s = time.perf_counter() - clock
    inserted = int(_scalar(conn, "SELECT count(*) FROM usage_events")) - first
    late_rows = int(
        _scalar(
            conn,
            f"""SELECT count(*) FROM usage_events WHERE ingest_seq > {seq}
                AND created_at < TIMESTAMPTZ '{_ts(now - timedelta(days=2))}'""",
        )
    )
    return inserted, late_rows, int(completed[0]) if completed else 0, insert_s


def phase_incremental(db: Path, new_events: int, memory_limit: str | None) -> dict[str, Any]:
    conn = _open(db, memory_limit)
    conn.execute(_MACROS)
    now = datetime.now(UTC)
    last_watermark = int(
        _scalar(conn, "SELECT watermark FROM job_runs WHERE error IS NULL ORDER BY run_id DESC")
    )
    inserted, late_rows, completed, insert_s = _add_events(conn, new_events, now)
    conn.close()

    # The first run in a process, as after a restart: nothing cached, in DuckDB or the job.
    result, cpu_s, conn, job = _run_job(db, False, memory_limit)
    # The days that changed: those of every event written since the last run (their
    # partial sums are added to the stored buckets; no price changed, so no day is
    # recomputed whole).
    expected = [
        r[0]
        for r in conn.execute(
            f"""SELECT DISTINCT date_trunc('day', created_at) FROM usage_events
                WHERE ingest_seq > {last_watermark}"""
        ).fetchall()
    ]
    touched = sorted(result.recomputed)
    report = phase_report(result)
    # A run in a server that has run the job before (every minute, by default): as many
    # new events again, the same job object, DuckDB's buffers as the last run left them.
    conn.execute(_MACROS)
    warm_inserted, warm_late, _, _ = _add_events(conn, new_events, now)
    cpu = time.process_time()
    warm = job.run()
    warm_cpu_s = time.process_time() - cpu
    if warm.error:
        raise BenchError(f"the second incremental run failed: {warm.error}")
    conn.close()
    return {
        "seconds": result.seconds,
        "cpu_s": cpu_s,
        "mode": result.mode,
        "rows_in": result.rows_in,
        "rows_out": result.rows_out,
        "days": result.days,
        "inserted": inserted,
        "late": late_rows,
        "completed_queued": completed,
        "insert_s": insert_s,
        "recomputed": [str(d.date()) for d in touched],
        "expected": sorted(str(d.date()) for d in expected),
        "profile": report,
        "warm_seconds": warm.seconds,
        "warm_cpu_s": warm_cpu_s,
        "warm_inserted": warm_inserted,
        "warm_rows_in": warm.rows_in,
        "warm_mode": warm.mode,
        "warm_late": warm_late,
        "warm_recomputed": len(warm.recomputed),
        "warm_profile": phase_report(warm),
    }


MINUTE_PARTS = 1_440  # a day of minute runs


def minute_parts(
    conn: duckdb.DuckDBPyConnection, day: datetime, parts: int = MINUTE_PARTS
) -> dict[str, Any]:
    """Replace the usage rows of `day` by `parts` parts (1,440: one per minute of its
    events), each the partial sums the job's own `usage_deltas` computes for its slice
    (as that many incremental runs would append), in one transaction."""
    catalog = CatalogCache().read(conn)
    run = Run(
        conn,
        RollupConfig(),
        PriceSnapshot(catalog.names, catalog.intervals),
        int(_scalar(conn, "SELECT max(ingest_seq) FROM usage_events")),
        threading.Event(),
        run_id=10**9,  # parts need a run id: one far above the job's
    )
    clock = time.perf_counter()
    conn.execute("BEGIN TRANSACTION")
    for table in rollup_compact.APPENDED:
        run.delete_days(table, [day])
    rollup_compact.forget(run, [day])  # parts an earlier call left
    events = run.read(
        f"""SELECT {run.select(EVENT_COLUMNS, tags=True)} FROM usage_events AS e
            WHERE e.created_at >= ? AND e.created_at < ?""",
        [day, day + timedelta(days=1)],
    ).with_columns(
        pl.lit(None, pl.String).alias("conversation_root"),
        ((pl.col("created_at") - pl.lit(day)).dt.total_minutes() * parts // MINUTE_PARTS).alias(
            "_minute"
        ),
    )
    # Each minute's partial sums as the job computes them (`usage_deltas`), written a
    # table at a time: the rows and the parts listed are those of 1,440 runs, without
    # the 1,440 x 6 statements.
    priced = run.compute(run.price(events.drop("_minute"))).with_columns(events["_minute"])
    empty = priced.clear().drop("_minute").lazy()
    tables: dict[str, list[pl.DataFrame]] = {table: [] for table in rollup_compact.APPENDED}
    listed: list[tuple[Any, int, int]] = []
    for _, minute in priced.group_by("_minute", maintain_order=True):
        rows = 0
        for table, delta in usage_deltas(run, minute.drop("_minute").lazy(), empty).items():
            kept = rollup_compact.changed(delta, rollup_compact.APPENDED[table][1])
            tables[table].append(kept)
            rows += kept.height
        listed.append((day.date(), 10**9 + len(listed), rows))
    for table, frames in tables.items():
        run.insert(table, pl.concat(frames, how="vertical_relaxed"))
    run.insert("rollup_parts", pl.DataFrame(listed, schema=["day", "run_id", "rows"], orient="row"))
    part_rows = sum(rows for *_, rows in listed)
    conn.execute("COMMIT")
    parts = _scalar(conn, f"SELECT count(*) FROM rollup_parts WHERE day = DATE '{day.date()}'")
    return {
        "day": str(day.date()),
        "events": events.height,
        "parts": int(parts),
        "part_rows": part_rows,
        "parts_s": time.perf_counter() - clock,
        "watermark": run.watermark,
        "prices": run.prices,
    }


def parts_day() -> datetime:
    """The day the parts go to: the day before yesterday (whole, and in every range)."""
    return (datetime.now(UTC) - timedelta(days=2)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )


def phase_parts(db: Path, memory_limit: str | None, parts: int) -> dict[str, Any]:
    """Leave a day of `parts` parts in the warehouse, uncompacted (bench/api.py)."""
    conn = _open(db, memory_limit)
    made = minute_parts(conn, parts_day(), parts)
    if os.environ.get("TOKENTILL_BENCH_CHECKPOINT"):
        conn.execute("CHECKPOINT")  # as a server's writes reach the WAL's threshold
    conn.close()
    return {k: v for k, v in made.items() if k not in ("prices", "watermark")}


def phase_compaction(db: Path, memory_limit: str | None) -> dict[str, Any]:
    """A day of minute runs, folded: `minute_parts`, then compaction is timed, and
    against it, the day rebuilt from its events (`recompute`), which must leave exactly
    the rows compaction left."""
    conn = _open(db, memory_limit)
    job = RollupJob(conn.cursor, RollupConfig())
    day = parts_day()
    made = minute_parts(conn, day)
    cpu = time.process_time()
    folded = job.compact(max_parts=made["parts"] - 1, older_than=datetime(2000, 1, 1, tzinfo=UTC))
    compact_cpu_s = time.process_time() - cpu
    if folded.error or folded.days != 1:
        raise BenchError(f"compaction failed: {folded.error} ({folded.days} days)")

    def rows() -> dict[str, list[tuple[Any, ...]]]:
        return {
            table: sorted(
                conn.execute(
                    f"SELECT * FROM {table} WHERE bucket >= ? AND bucket < ?",
                    [day, day + timedelta(days=1)],
                ).fetchall(),
                key=str,
            )
            for table in rollup_compact.APPENDED
        }

    compacted = rows()
    cpu = time.process_time()
    clock = time.perf_counter()
    conn.execute("BEGIN TRANSACTION")
    rebuilt_run = Run(conn, RollupConfig(), made["prices"], made["watermark"], threading.Event())
    recompute(rebuilt_run, events_per_day(rebuilt_run, [day]), replace=True)
    conn.execute("COMMIT")
    rebuild_s, rebuild_cpu_s = time.perf_counter() - clock, time.process_time() - cpu
    same = rows() == compacted
    conn.close()
    return {
        **{k: v for k, v in made.items() if k not in ("prices", "watermark")},
        "compact_s": folded.seconds,
        "compact_cpu_s": compact_cpu_s,
        "rows_after": folded.rows_out,
        "rebuild_day_s": rebuild_s,
        "rebuild_day_cpu_s": rebuild_cpu_s,
        "same_rows": same,
    }


def run_phase(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    db = Path(args.db)
    if args.phase == "generate":
        out = phase_generate(db, args.events)
    elif args.phase == "full":
        out = phase_full(db, args.memory_limit)
    elif args.phase == "baseline":
        out = phase_baseline(db, args.memory_limit)
    elif args.phase == "sql_rollups":
        out = phase_sql_rollups(db, args.memory_limit)
    elif args.phase == "floor":
        out = phase_floor(db, args.memory_limit)
    elif args.phase == "parts":
        out = phase_parts(db, args.memory_limit, args.parts)
    elif args.phase == "compaction":
        out = phase_compaction(db, args.memory_limit)
    elif args.phase == "incremental":
        out = phase_incremental(db, args.new_events, args.memory_limit)
    else:
        raise BenchError(f"unknown phase {args.phase}")
    out["vm_hwm_kb"] = _peak_kb()
    out["code"] = CODE_AT_IMPORT
    print("RESULT " + json.dumps(out, default=str), flush=True)


# -- the driver -----------------------------------------------------------------------------


def _busy_cpu_seconds() -> float:
    """CPU time spent by the whole machine so far (all CPUs, not idle or iowait)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


@dataclass
class PhaseRun:
    result: dict[str, Any]
    peak_mb: float  # the child's own peak RSS (wait4's ru_maxrss)
    wall_s: float
    foreign_cpu_s: float  # CPU time other processes used meanwhile (noise in the timings)


def spawn(phase: str, db: Path, *extra: str) -> PhaseRun:
    """Run one phase in a subprocess: its result, its own peak RSS, and how much CPU the
    rest of the machine used meanwhile (another benchmark or a test suite skews timings)."""
    argv = [sys.executable, str(Path(__file__)), "--phase", phase, "--db", str(db), *extra]
    busy, clock = _busy_cpu_seconds(), time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=ROOT, text=True)
    if proc.stdout is None:
        raise BenchError("no stdout")
    output = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - clock
    foreign = _busy_cpu_seconds() - busy - usage.ru_utime - usage.ru_stime
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [ln for ln in output.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise BenchError(f"phase {phase} failed (exit {proc.returncode}):\n{output}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    return PhaseRun(result, usage.ru_maxrss / 1024, wall, max(0.0, foreign))


def _mb(value: float) -> str:
    return f"{value / 1024:.2f} GB" if value >= 1024 else f"{value:.0f} MB"


def _rate(events: float, seconds: float) -> str:
    rate = events / seconds if seconds else 0.0
    return f"{rate / 1e6:.2f}M events/s" if rate >= 1e6 else f"{rate / 1e3:.0f}k events/s"


def _usd(pico: int) -> str:
    return f"${pico / 1e12:,.2f}"


def _print_profile(profile: dict[str, float], total: float) -> None:
    for label, seconds in sorted(profile.items(), key=lambda kv: -kv[1]):
        if seconds >= 0.005:
            print(f"      {label:<44} {seconds:7.2f} s  {100 * seconds / total:5.1f}%")
    by_kind = shares(profile)
    print(
        "      share: "
        + ", ".join(f"{kind} {100 * by_kind[kind] / total:.0f}%" for kind in by_kind)
    )


def check_sums(db: Path) -> list[tuple[str, bool, str]]:
    conn = duckdb.connect(str(db), read_only=True)
    try:
        events = int(_scalar(conn, "SELECT count(*) FROM usage_events"))
        daily_requests = int(_scalar(conn, "SELECT sum(requests) FROM usage_daily"))
        hourly_requests = int(_scalar(conn, "SELECT sum(requests) FROM usage_hourly"))
        daily_cost = int(_scalar(conn, "SELECT sum(cost_pico) FROM usage_daily"))
        hourly_cost = int(_scalar(conn, "SELECT sum(cost_pico) FROM usage_hourly"))
        # Flex and priority prices start on 2026-10-12 in the catalog: earlier events of
        # those tiers are unpriced, rightly. On the default tier only unknown models are.
        unpriced_models = [
            r[0]
            for r in conn.execute(
                """SELECT DISTINCT model FROM usage_daily
                   WHERE unpriced > 0 AND coalesce(service_tier, 'default') = 'default'
                   ORDER BY 1"""
            ).fetchall()
        ]
    finally:
        conn.close()
    return [
        (
            "sum(usage_daily.requests) = count(usage_events)",
            daily_requests == events,
            f"{daily_requests:,} vs {events:,}",
        ),
        (
            "sum(usage_hourly.requests) = count(usage_events)",
            hourly_requests == events,
            f"{hourly_requests:,} vs {events:,}",
        ),
        (
            "sum(cost_pico) daily = hourly",
            daily_cost == hourly_cost,
            f"{_usd(daily_cost)} vs {_usd(hourly_cost)}",
        ),
        (
            "unpriced on the default tier: the unknown models only",
            set(unpriced_models) == set(UNKNOWN_MODELS),
            ", ".join(unpriced_models),
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--new-events", type=int, default=100_000)
    parser.add_argument("--keep", action="store_true", help="keep the DuckDB file")
    parser.add_argument(
        "--generated",
        metavar="FILE",
        help="start from a copy of FILE if it exists (events generated by an earlier run), "
        "else generate and save a copy there before any rollup runs: generating 10M "
        "events takes minutes",
    )
    parser.add_argument(
        "--memory-limit",
        help="DuckDB memory limit for the job and the baseline (default: the server's, "
        "warehouse_memory_limit; 'none': DuckDB's own, 80%% of RAM)",
    )
    parser.add_argument(
        "--shape",
        choices=("uniform", "zipf"),
        default=SHAPE,
        help="the traffic's shape: uniform (the default) or zipf, shaped like real traffic",
    )
    parser.add_argument("--parts", type=int, default=MINUTE_PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_limit is None:
        args.memory_limit = server_memory_limit()
    elif args.memory_limit.lower() == "none":
        args.memory_limit = ""
    if args.phase:
        run_phase(args)
        return 0

    workdir = make_workdir("tokentill-bench-rollup-")
    db = workdir / "warehouse.duckdb"
    try:
        return drive(args, db)
    except BenchError as exc:
        print(f"\nBROKEN: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"\nkept {db}")
        else:
            remove_workdir(workdir)


def git_revision() -> str:
    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "warehouse")
    return head + (" + uncommitted changes in warehouse/" if dirty else "")


def drive(args: argparse.Namespace, db: Path) -> int:
    os.environ["TOKENTILL_BENCH_SHAPE"] = args.shape  # the phases' processes read it
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(
        f"rollup benchmark ({args.shape} traffic): {args.events:,} events, {USERS:,} users, "
        f"{len(MODELS)} models, "
        f"{DAYS} days; then {args.new_events:,} new events"
    )
    print(
        f"machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{mem_gb:.1f} GiB RAM; Python {platform.python_version()}, duckdb {duckdb.__version__}, "
        f"polars {pl.__version__}, genai-prices {metadata.version('genai-prices')}"
    )
    print(
        f"code: {git_revision()}; DuckDB memory limit for the job and the baseline: "
        f"{args.memory_limit or 'DuckDB default (80% of RAM)'}"
    )
    print(f"database: {db}\n")

    reuse = Path(args.generated) if args.generated else None
    if reuse is not None and reuse.exists():
        shutil.copyfile(reuse, db)
        print(f"events: a copy of {reuse} (generated earlier; --events ignored)")
        gen_run = spawn("generate", db, "--events", "0")
    else:
        gen_run = spawn("generate", db, "--events", str(args.events))
        if reuse is not None:
            shutil.copyfile(db, reuse)
    gen = gen_run.result
    events = int(gen["events"])
    print(
        f"generate     {events:,} events in {gen['generate_s']:.1f} s "
        f"({_rate(events, gen['generate_s'])}); {gen['prices']} price rows seeded in "
        f"{gen['seed_s']:.2f} s; file {gen['db_bytes'] / 2**30:.2f} GiB"
    )
    print(
        f"             {gen['users']:,} users, {gen['models']} models, "
        f"{gen['completed'] / events:.1%} completed, "
        f"{gen['continued'] / events:.1%} continue a response, "
        f"{gen['non_default_tier'] / events:.1%} flex/priority/null tier, "
        f"{gen['queued']:,} queued; {gen['first'][:16]} .. {gen['last'][:16]}"
    )

    limit = ("--memory-limit", args.memory_limit or "none")
    full_run = spawn("full", db, *limit)
    full, full_rss = full_run.result, full_run.peak_mb
    full_s = float(full["seconds"])
    print(
        f"\nfull         {full_s:.2f} s ({full['cpu_s']:.1f} CPU-s)  "
        f"rows in {full['rows_in']:,}  rows out "
        f"{full['rows_out']:,}  days {full['days']}  ({_rate(full['rows_in'], full_s)}); "
        f"file {full['db_bytes'] / 2**30:.2f} GiB"
    )
    print("             " + ", ".join(f"{t} {n:,}" for t, n in full["tables"].items()))
    print(
        "             with status as counts instead of a key: "
        + ", ".join(
            f"{t} {n:,} rows ({100 * (1 - n / full['tables'][t]):.1f}% fewer)"
            for t, n in full["without_status"].items()
        )
    )
    print("    where the time goes:")
    _print_profile(full["profile"], full_s)

    base_run = spawn("baseline", db, *limit)
    base = base_run.result
    base_s = float(base["seconds"])
    job_rate = full["rows_in"] / full_s
    base_rate = base["events"] / base_s
    print(
        f"\nbaseline SQL {base_s:.2f} s ({base['cpu_s']:.1f} CPU-s, "
        f"{_rate(base['events'], base_s)}), "
        f"{base['rows_out']:,} rows (day x user x model x tier x status)"
    )
    print(
        f"             polars job {_rate(full['rows_in'], full_s)} vs SQL "
        f"{_rate(base['events'], base_s)}: the SQL is {base_rate / job_rate:.1f}x faster "
        "(the job also writes hourly, tags and conversations)"
    )
    print(
        f"             cost: SQL {_usd(base['cost_pico'])} ({base['unpriced']:,} unpriced; "
        f"current default-tier prices, no image tokens), job {_usd(base['job_cost_pico'])} "
        f"({base['job_unpriced']:,} unpriced; prices in force per tier)"
    )

    sql_run = spawn("sql_rollups", db, *limit)
    sql = sql_run.result
    sql_s = float(sql["seconds"])
    same_grain = all(ours == job for ours, job in sql["rows"].values())
    print(
        f"\nSQL rollups  {sql_s:.2f} s ({sql['cpu_s']:.1f} CPU-s): the same usage rollups in plain "
        f"DuckDB SQL, written as tables (every table but the conversations'; simpler prices)"
    )
    print(
        "             "
        + ", ".join(
            f"{t} {sql['tables'][t]:.1f} s ({n:,} rows)" for t, (n, _) in sql["rows"].items()
        )
    )
    print(
        f"             same rows as the job's tables: {'OK' if same_grain else 'WRONG'}; "
        f"the job (conversations too) takes {full_s / sql_s:.2f}x this (target "
        f"{FULL_RATIO}x)"
    )

    floor_run = spawn("floor", db, *limit)
    floor = floor_run.result
    floor_s = float(floor["seconds"])
    print(
        f"\nwrite floor  {floor_s:.2f} s ({floor['cpu_s']:.1f} CPU-s): DuckDB copying the "
        f"{floor['rows']:,} rows the rebuild wrote, table to table, nothing else"
    )
    read_s = float(floor["read_s"])
    print(
        f"read floor   {read_s:.2f} s ({floor['read_cpu_s']:.1f} CPU-s): DuckDB reading the "
        f"{floor['read_rows']:,} events' columns the job reads into Arrow, nothing else"
    )
    print(
        f"             together {floor_s + read_s:.2f} s: the full rebuild takes "
        f"{full_s / (floor_s + read_s):.1f}x that; the SQL rollups "
        f"{sql_s / (floor_s + read_s):.1f}x"
    )

    inc_run = spawn("incremental", db, "--new-events", str(args.new_events), *limit)
    inc, inc_rss = inc_run.result, inc_run.peak_mb
    inc_s = float(inc["seconds"])
    print(
        f"\nincremental  inserted {inc['inserted']:,} events ({inc['late']:,} dated days "
        f"earlier) and completed {inc['completed_queued']:,} queued rows in "
        f"{inc['insert_s']:.2f} s"
    )
    print(
        f"             run {inc_s:.3f} s ({inc['cpu_s']:.2f} CPU-s, {inc['mode']})  "
        f"rows in {inc['rows_in']:,}  "
        f"rows out {inc['rows_out']:,}  days with new sums {inc['days']}, recomputed whole: "
        f"{', '.join(inc['recomputed']) or 'none'}"
    )
    warm_s = float(inc["warm_seconds"])
    print(
        f"             then, as in a server that has run the job before (same process and "
        f"job, DuckDB's buffers warm), {inc['warm_inserted']:,} more events "
        f"({inc['warm_late']:,} late, no background completions): run {warm_s:.3f} s "
        f"({inc['warm_cpu_s']:.2f} CPU-s, {inc['warm_mode']}), rows in "
        f"{inc['warm_rows_in']:,}, days recomputed whole: {inc['warm_recomputed']}"
    )
    days_ok = (
        inc["days"] == len(inc["expected"])
        and not inc["recomputed"]
        and inc["mode"] == "incremental"
    )
    print(
        f"             expected: {len(inc['expected'])} days ({', '.join(inc['expected'])}), "
        f"none recomputed whole  {'OK' if days_ok else 'WRONG'}"
    )
    print("    where the time goes:")
    _print_profile(inc["profile"], inc_s)
    warm_cpu_us = 1e6 * inc["warm_cpu_s"] / max(1, inc["warm_inserted"])
    print(f"    warm: {warm_cpu_us:.1f} µs of CPU per new event; where the time goes:")
    _print_profile(inc["warm_profile"], warm_s)

    comp_run = spawn("compaction", db, *limit)
    comp = comp_run.result
    compact_ok = comp["compact_s"] < comp["rebuild_day_s"] and comp["same_rows"]
    print(
        f"\ncompaction   {comp['day']}: {comp['events']:,} events as {comp['parts']:,} minute "
        f"parts ({comp['part_rows']:,} rows, appended in {comp['parts_s']:.1f} s)\n"
        f"             folded in {comp['compact_s']:.2f} s ({comp['compact_cpu_s']:.2f} CPU-s) "
        f"into {comp['rows_after']:,} rows; the day rebuilt from its events: "
        f"{comp['rebuild_day_s']:.2f} s ({comp['rebuild_day_cpu_s']:.2f} CPU-s): "
        f"{comp['compact_s'] / comp['rebuild_day_s']:.2f}x; the same rows: "
        f"{'yes' if comp['same_rows'] else 'NO'}"
    )

    print(
        "\nper phase: wall time, peak RSS (wait4 ru_maxrss; VmHWM in the child), CPU used by"
        " other processes meanwhile, warehouse code imported"
    )
    phases = (
        ("generate", gen_run),
        ("full", full_run),
        ("baseline", base_run),
        ("sql_rollups", sql_run),
        ("floor", floor_run),
        ("incremental", inc_run),
        ("compaction", comp_run),
    )
    cpus = os.cpu_count() or 1
    for name, run in phases:
        print(
            f"    {name:<12} {run.wall_s:7.1f} s  {_mb(run.peak_mb):>9} "
            f"({_mb(run.result['vm_hwm_kb'] / 1024)})  others {run.foreign_cpu_s:6.1f} CPU-s  "
            f"code {run.result['code']}"
        )
    noisy = [n for n, run in phases if run.foreign_cpu_s > 0.05 * run.wall_s * cpus]
    if noisy:
        print(
            f"    WARNING: other processes used over 5% of the CPUs during {', '.join(noisy)}:"
            " those timings are inflated"
        )
    if len({run.result["code"] for _, run in phases} | {CODE_AT_IMPORT}) > 1:
        print(
            "    WARNING: the warehouse code changed during the run (phases imported "
            "different versions): the figures do not describe one version"
        )

    print("\nchecks")
    checks = check_sums(db)
    checks.append(
        (
            "job cost = SQL cost (default tier, no image tool, no fine-tune)",
            base["subset_sql_pico"] == base["subset_job_pico"],
            f"{_usd(base['subset_job_pico'])} vs {_usd(base['subset_sql_pico'])}",
        )
    )
    checks.append(
        (
            "SQL rollups: the job's row count in every table, every event counted",
            same_grain and sql["requests"] == base["events"],
            f"{sql['requests']:,} requests",
        )
    )
    checks.append(("incremental added to the changed days only, recomputed none", days_ok, ""))
    checks.append(
        (
            "the warm run was incremental and recomputed no day",
            inc["warm_mode"] == "incremental" and inc["warm_recomputed"] == 0,
            "",
        )
    )
    checks.append(
        ("compaction left the rows the day's rebuild leaves", comp["same_rows"], comp["day"])
    )
    for label, ok, detail in checks:
        print(f"    {'OK  ' if ok else 'FAIL'} {label}  {detail}")

    full_gb = full_rss / 1024
    targets = [
        (
            "full rebuild / SQL",
            f"<= {FULL_RATIO}x",
            f"{full_s / sql_s:.2f}x",
            full_s <= FULL_RATIO * sql_s,
        ),
        ("incremental run", f"<= {FIRST_S} s", f"{inc_s:.3f} s", inc_s <= FIRST_S),
        (
            "incremental, warm",
            f"< {INCREMENTAL_S:.0f} s",
            f"{warm_s:.3f} s",
            warm_s < INCREMENTAL_S,
        ),
        ("peak RSS, full rebuild", f"< {PEAK_GB:.0f} GB", _mb(full_rss), full_gb < PEAK_GB),
        (
            "incremental CPU/event",
            f"<= {CPU_PER_EVENT_US:.0f} µs",
            f"{warm_cpu_us:.1f} µs",
            warm_cpu_us <= CPU_PER_EVENT_US,
        ),
        (
            f"compact {comp['parts']:,} parts",
            "< rebuild",
            f"{comp['compact_s'] / comp['rebuild_day_s']:.2f}x",
            compact_ok,
        ),
    ]
    print("\ntargets")
    for label, target, value, ok in targets:
        print(f"    {label:<24} {target:<8} {value:>10}  {verdict(ok)}")

    print("\nmarkdown\n")
    rows = [
        ["events generated (SQL)", f"{events:,}", f"{gen['generate_s']:.1f} s", "", ""],
        [
            "full rebuild (`run(full=True)`)",
            f"{full['rows_in']:,} in, {full['rows_out']:,} out, {full['days']} days",
            f"{full_s:.2f} s ({_rate(full['rows_in'], full_s)}): {full_s / sql_s:.2f}x the SQL",
            f"<= {FULL_RATIO}x the SQL",
            verdict(full_s <= FULL_RATIO * sql_s),
        ],
        [
            "same daily aggregation, plain DuckDB SQL",
            f"{base['events']:,} in, {base['rows_out']:,} out",
            f"{base_s:.2f} s ({_rate(base['events'], base_s)})",
            "",
            "",
        ],
        [
            "the same usage rollups, plain DuckDB SQL (no conversations)",
            f"{base['events']:,} in, {sum(n for n, _ in sql['rows'].values()):,} out",
            f"{sql_s:.2f} s ({_rate(base['events'], sql_s)})",
            "",
            "",
        ],
        [
            "the rebuild's rows copied table to table (write floor)",
            f"{floor['rows']:,}",
            f"{floor_s:.2f} s",
            "",
            "",
        ],
        [
            "the events' columns read into Arrow (read floor)",
            f"{floor['read_rows']:,}",
            f"{read_s:.2f} s",
            "",
            "",
        ],
        [
            "incremental run",
            f"{inc['inserted']:,} new ({inc['late']} late), {inc['days']} days",
            f"{inc_s:.3f} s",
            f"<= {FIRST_S} s",
            verdict(inc_s <= FIRST_S),
        ],
        [
            "incremental run, warm (the job ran before in this process)",
            f"{inc['warm_inserted']:,} new",
            f"{warm_s:.3f} s",
            f"< {INCREMENTAL_S:.0f} s",
            verdict(warm_s < INCREMENTAL_S),
        ],
        [
            "peak RSS, full rebuild",
            "",
            _mb(full_rss),
            f"< {PEAK_GB:.0f} GB",
            verdict(full_gb < PEAK_GB),
        ],
        ["peak RSS, incremental", "", _mb(inc_rss), "", ""],
    ]
    print(markdown_table(["Figure", "Work", "Result", "Target", ""], rows))
    if not all(ok for _, ok, _ in checks):
        raise BenchError("a correctness check failed (see checks above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
