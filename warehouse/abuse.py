"""Abuse monitoring: a scheduled job that scores every user active in the last window
against their own history and against the other active users, and raises flags.

Pure polars pipelines (`features`, `baselines`, `flags`), reading and writing only at the
job's edges. The scored window is the trailing `window_seconds` (an hour by default); a
user's history is their activity in the `history_days` before it, in windows of the same
length (only windows where they were active: "a typical active hour").

Rules, each flag with its evidence (the numbers, the baseline and the window):

- `spend_spike`, `token_spike`: the window's cost / tokens has a robust z-score >= 6
  over the user's own history (>= 10: critical);
- `new_user_spike`, `new_user_spend_spike`: a user with fewer than three past windows
  (a new account: where abuse starts) is scored against the users active in the same
  window (at least `min_population` of them): tokens / cost with a robust z >= 6 over
  theirs and at least `new_user_factor` (10) times their median (z >= 10: critical);
- `population_outlier`: log tokens with a robust z >= 6 over the active users (at least
  `min_population` of them): info (warning >= 10);
- `request_burst`: peak requests in one minute >= `burst_floor` and a robust z >= 6 over
  the user's own per-minute peaks (the population's, without history): warning;
- `error_rate`: errors and failed responses >= 50% of >= `min_requests` (>= 90%: critical);
- `content_filter_rate`: responses stopped by the content filter >= 20% of >=
  `min_requests` (>= 50%: critical);
- `many_api_keys`: >= `max_keys` distinct API key fingerprints (twice that: critical);
- `metadata_churn`: >= `max_metadata` distinct metadata objects, nearly one per request: info;
- `long_outputs`: p95 output tokens >= `long_output_floor` and a robust z >= 6 over the
  active users: info.

Robust z-score: (x - median) / (1.4826 x MAD), with the scale floored at a quarter of the
median (and at 1), so that a perfectly steady user (MAD 0) is not flagged for a small wobble.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import polars as pl

from tokentill.warehouse import pricing
from tokentill.warehouse.alerts import Alert, Severity
from tokentill.warehouse.db import query_frame, start_run
from tokentill.warehouse.prices import price_table

log = logging.getLogger(__name__)

ABUSE = "abuse"
MAD_SCALE = 1.4826


@dataclass(frozen=True)
class AbuseConfig:
    window_seconds: int = 3600
    history_days: int = 14
    z_warning: float = 6.0
    z_critical: float = 10.0
    min_requests: int = 10
    burst_floor: int = 30
    max_keys: int = 5
    max_metadata: int = 50
    long_output_floor: int = 4_000
    min_population: int = 5
    # A user without history is flagged at this multiple of the active users' median.
    new_user_factor: float = 10.0
    image_model: str = "gpt-image-1"


# -- pure pipelines ----------------------------------------------------------------------------


def with_window(events: pl.LazyFrame, now: datetime, config: AbuseConfig) -> pl.LazyFrame:
    """Number each event's window: 0 is the scored one, 1 the one before it, and so on."""
    size_us = config.window_seconds * 1_000_000
    age = (
        pl.lit(now).cast(pl.Datetime("us", "UTC")) - pl.col("created_at")
    ).dt.total_microseconds()
    return events.with_columns((age // size_us).cast(pl.Int64).alias("window"))


def _robust_z(value: pl.Expr, median: pl.Expr, mad: pl.Expr) -> pl.Expr:
    scale = pl.max_horizontal(mad * MAD_SCALE, median.abs() * 0.25, pl.lit(1.0))
    return (value - median) / scale


def features(events: pl.LazyFrame) -> pl.LazyFrame:
    """Per user and window: volumes, outcomes, keys, metadata, output sizes, peak minute."""
    per_minute = (
        events.group_by("user_id", "window", pl.col("created_at").dt.truncate("1m"))
        .agg(pl.len().alias("in_minute"))
        .group_by("user_id", "window")
        .agg(pl.col("in_minute").max().alias("peak_rpm"))
    )
    totals = events.group_by("user_id", "window").agg(
        pl.len().alias("requests"),
        pl.col("total_tokens").fill_null(0).sum().alias("tokens"),
        pl.col("cost_pico").fill_null(0).sum().alias("cost_pico"),
        pl.col("status").is_in(["error", "failed"]).sum().alias("errors"),
        (pl.col("incomplete_reason") == "content_filter").sum().alias("content_filtered"),
        pl.col("key_fingerprint").drop_nulls().n_unique().alias("keys"),
        pl.col("metadata").drop_nulls().n_unique().alias("metadata_values"),
        pl.col("output_tokens").fill_null(0).quantile(0.95).alias("output_p95"),
        pl.col("output_tokens").fill_null(0).max().alias("output_max"),
    )
    return totals.join(per_minute, on=["user_id", "window"], how="left")


def baselines(per_window: pl.LazyFrame) -> pl.LazyFrame:
    """Per user, the median and MAD of their past windows (window > 0)."""
    past = per_window.filter(pl.col("window") > 0)
    stats = []
    for name in ("cost_pico", "tokens", "peak_rpm"):
        column = pl.col(name).cast(pl.Float64)
        stats += [
            column.median().alias(f"{name}_median"),
            (column - column.median()).abs().median().alias(f"{name}_mad"),
        ]
    return past.group_by("user_id").agg(pl.len().alias("history_windows"), *stats)


def population(current: pl.LazyFrame) -> pl.LazyFrame:
    """Across the users active in the scored window: medians and MADs (one row)."""
    stats = [pl.len().alias("active_users")]
    for name, column in (
        ("log_tokens", pl.col("tokens").cast(pl.Float64).log1p()),
        ("tokens", pl.col("tokens").cast(pl.Float64)),
        ("cost_pico", pl.col("cost_pico").cast(pl.Float64)),
        ("peak_rpm", pl.col("peak_rpm").cast(pl.Float64)),
        ("output_p95", pl.col("output_p95").cast(pl.Float64)),
    ):
        stats += [
            column.median().alias(f"pop_{name}_median"),
            (column - column.median()).abs().median().alias(f"pop_{name}_mad"),
        ]
    return current.select(stats)


def flags(per_window: pl.LazyFrame, config: AbuseConfig) -> pl.DataFrame:
    """One row per flag: user_id, rule, severity, value, baseline, z, and the counts."""
    current = per_window.filter(pl.col("window") == 0)
    scored = (
        current.join(baselines(per_window), on="user_id", how="left")
        .join(population(current), how="cross")
        .with_columns(
            _robust_z(
                pl.col("cost_pico").cast(pl.Float64),
                pl.col("cost_pico_median"),
                pl.col("cost_pico_mad"),
            ).alias("z_cost"),
            _robust_z(
                pl.col("tokens").cast(pl.Float64), pl.col("tokens_median"), pl.col("tokens_mad")
            ).alias("z_tokens"),
            _robust_z(
                pl.col("peak_rpm").cast(pl.Float64),
                pl.coalesce(pl.col("peak_rpm_median"), pl.col("pop_peak_rpm_median")),
                pl.coalesce(pl.col("peak_rpm_mad"), pl.col("pop_peak_rpm_mad")),
            ).alias("z_burst"),
            _robust_z(
                pl.col("tokens").cast(pl.Float64).log1p(),
                pl.col("pop_log_tokens_median"),
                pl.col("pop_log_tokens_mad"),
            ).alias("z_population"),
            _robust_z(
                pl.col("tokens").cast(pl.Float64),
                pl.col("pop_tokens_median"),
                pl.col("pop_tokens_mad"),
            ).alias("z_new_tokens"),
            _robust_z(
                pl.col("cost_pico").cast(pl.Float64),
                pl.col("pop_cost_pico_median"),
                pl.col("pop_cost_pico_mad"),
            ).alias("z_new_cost"),
            _robust_z(
                pl.col("output_p95").cast(pl.Float64),
                pl.col("pop_output_p95_median"),
                pl.col("pop_output_p95_mad"),
            ).alias("z_output"),
            (pl.col("errors") / pl.col("requests")).alias("error_rate"),
            (pl.col("content_filtered") / pl.col("requests")).alias("content_filter_rate"),
        )
        .collect()
    )
    zw, zc = config.z_warning, config.z_critical
    enough = pl.col("requests") >= config.min_requests
    has_history = pl.col("history_windows").fill_null(0) >= 3
    populous = pl.col("active_users") >= config.min_population

    def rule(
        name: str, fires: pl.Expr, critical: pl.Expr, value: str, z: str | None
    ) -> pl.DataFrame:
        return scored.filter(fires).select(
            "user_id",
            pl.lit(name).alias("rule"),
            pl.when(critical)
            .then(pl.lit("critical"))
            .otherwise(pl.lit("warning"))
            .alias("severity"),
            pl.col(value).cast(pl.Float64).alias("value"),
            (pl.col(z) if z else pl.lit(None, pl.Float64)).alias("z"),
            "requests",
            "tokens",
            "cost_pico",
            "errors",
            "content_filtered",
            "keys",
            "metadata_values",
            "peak_rpm",
            "output_p95",
            "history_windows",
            "cost_pico_median",
            "tokens_median",
            "active_users",
            "pop_tokens_median",
            "pop_cost_pico_median",
        )

    found = [
        rule("spend_spike", has_history & (pl.col("z_cost") >= zw) & (pl.col("cost_pico") > 0),
             pl.col("z_cost") >= zc, "cost_pico", "z_cost"),
        rule("token_spike", has_history & (pl.col("z_tokens") >= zw), pl.col("z_tokens") >= zc,
             "tokens", "z_tokens"),
        # No history of its own (a new account, or one back after weeks): scored against
        # the users active in the same window, on tokens and on spend.
        rule("new_user_spike",
             ~has_history & populous & (pl.col("z_new_tokens") >= zw)
             & (pl.col("tokens") >= config.new_user_factor * pl.col("pop_tokens_median")),
             pl.col("z_new_tokens") >= zc, "tokens", "z_new_tokens"),
        rule("new_user_spend_spike",
             ~has_history & populous & (pl.col("z_new_cost") >= zw) & (pl.col("cost_pico") > 0)
             & (pl.col("cost_pico") >= config.new_user_factor * pl.col("pop_cost_pico_median")),
             pl.col("z_new_cost") >= zc, "cost_pico", "z_new_cost"),
        rule("population_outlier", populous & (pl.col("z_population") >= zw), pl.lit(False),
             "tokens", "z_population").with_columns(
            pl.when(pl.col("z") >= zc).then(pl.lit("warning")).otherwise(pl.lit("info"))
            .alias("severity")
        ),
        rule("request_burst",
             (pl.col("peak_rpm") >= config.burst_floor) & (pl.col("z_burst") >= zw)
             & (has_history | populous),
             pl.lit(False), "peak_rpm", "z_burst"),
        rule("error_rate", enough & (pl.col("error_rate") >= 0.5), pl.col("error_rate") >= 0.9,
             "error_rate", None),
        rule("content_filter_rate", enough & (pl.col("content_filter_rate") >= 0.2),
             pl.col("content_filter_rate") >= 0.5, "content_filter_rate", None),
        rule("many_api_keys", pl.col("keys") >= config.max_keys,
             pl.col("keys") >= 2 * config.max_keys, "keys", None),
        rule("metadata_churn",
             (pl.col("metadata_values") >= config.max_metadata)
             & (pl.col("metadata_values") >= 0.8 * pl.col("requests")),
             pl.lit(False), "metadata_values", None,
             ).with_columns(pl.lit("info").alias("severity")),
        rule("long_outputs",
             populous & (pl.col("output_p95") >= config.long_output_floor)
             & (pl.col("z_output") >= zw),
             pl.lit(False), "output_p95", "z_output",
             ).with_columns(pl.lit("info").alias("severity")),
    ]  # fmt: skip
    return pl.concat(found, how="vertical_relaxed").sort("user_id", "rule")


# -- the job --------------------------------------------------------------------------------


_COLUMNS = ", ".join(
    (
        "user_id",
        "created_at",
        "model",
        "service_tier",
        "status",
        "incomplete_reason",
        "key_fingerprint",
        "CAST(metadata AS VARCHAR) AS metadata",
        "total_tokens",
        *pricing.PRICED_FIELDS,
    )
)


def read_events(
    conn: duckdb.DuckDBPyConnection, now: datetime, config: AbuseConfig
) -> pl.DataFrame:
    """The edge: users' events of the scored window and their history (one read)."""
    since = now - timedelta(days=config.history_days, seconds=config.window_seconds)
    return query_frame(
        conn,
        f"""SELECT {_COLUMNS} FROM usage_events
            WHERE user_id IS NOT NULL AND created_at >= ? AND created_at < ?
              AND user_id IN (SELECT DISTINCT user_id FROM usage_events
                              WHERE created_at >= ? AND created_at < ?)""",
        [since, now, now - timedelta(seconds=config.window_seconds), now],
    )


def score(
    events: pl.DataFrame, prices: pl.DataFrame, now: datetime, config: AbuseConfig
) -> pl.DataFrame:
    """Events (as read) -> flags. Pure, for the tests and the job alike."""
    if events.height == 0:
        return flags(pl.LazyFrame(schema=_FEATURE_SCHEMA), config)
    models = pricing.model_map(
        events["model"].unique().to_list(), prices["model"].unique().to_list()
    )
    priced = pricing.price_events(
        events.lazy(), models.lazy(), pricing.effective_intervals(prices).lazy(), config.image_model
    )
    return flags(priced.pipe(with_window, now, config).pipe(features), config)


_FEATURE_SCHEMA = {
    "user_id": pl.String,
    "window": pl.Int64,
    "requests": pl.UInt32,
    "tokens": pl.Int64,
    "cost_pico": pl.Int64,
    "errors": pl.UInt32,
    "content_filtered": pl.UInt32,
    "keys": pl.UInt32,
    "metadata_values": pl.UInt32,
    "output_p95": pl.Float64,
    "output_max": pl.Int64,
    "peak_rpm": pl.UInt32,
}


def to_alerts(found: pl.DataFrame, now: datetime, config: AbuseConfig) -> list[Alert]:
    """Flags -> alerts, one per rule and user per window (the dedupe key names both)."""
    start = now - timedelta(seconds=config.window_seconds)
    bucket = int(now.timestamp()) // config.window_seconds
    alerts = []
    for row in found.to_dicts():
        evidence: dict[str, Any] = {
            k: (round(v, 4) if isinstance(v, float) else v)
            for k, v in row.items()
            if k not in ("user_id", "rule", "severity") and v is not None
        }
        evidence["window_seconds"] = config.window_seconds
        severity: Severity = row["severity"]
        alerts.append(
            Alert(
                dedupe_key=f"abuse:{row['rule']}:{row['user_id']}:{bucket}",
                kind="abuse",
                rule=row["rule"],
                severity=severity,
                message=_message(row, config),
                user_id=row["user_id"],
                subject=f"user:{row['user_id']}",
                window_start=start,
                window_end=now,
                evidence=evidence,
            )
        )
    return alerts


def _message(row: dict[str, Any], config: AbuseConfig) -> str:
    who, minutes = row["user_id"], config.window_seconds // 60
    z = f" (robust z {row['z']:.1f})" if row.get("z") is not None else ""
    value = row["value"]
    texts = {
        "spend_spike": f"spent ${value / 1e12:.4f} in {minutes} min, against a typical "
        f"${(row.get('cost_pico_median') or 0) / 1e12:.4f}{z}",
        "token_spike": f"used {value:,.0f} tokens in {minutes} min, against a typical "
        f"{row.get('tokens_median') or 0:,.0f}{z}",
        "population_outlier": f"used {value:,.0f} tokens in {minutes} min, far above the "
        f"{row['active_users']} active users{z}",
        "new_user_spike": f"has no history and used {value:,.0f} tokens in {minutes} min, "
        f"against the {row['active_users']} active users' median of "
        f"{row.get('pop_tokens_median') or 0:,.0f}{z}",
        "new_user_spend_spike": f"has no history and spent ${value / 1e12:.4f} in {minutes} "
        f"min, against the {row['active_users']} active users' median of "
        f"${(row.get('pop_cost_pico_median') or 0) / 1e12:.4f}{z}",
        "request_burst": f"sent {value:,.0f} requests in one minute{z}",
        "error_rate": f"{value:.0%} of {row['requests']} requests failed or were refused",
        "content_filter_rate": f"{value:.0%} of {row['requests']} responses were stopped by "
        "the content filter",
        "many_api_keys": f"used {value:,.0f} different API keys in {minutes} min",
        "metadata_churn": f"sent {value:,.0f} different metadata objects in "
        f"{row['requests']} requests",
        "long_outputs": f"95th percentile output of {value:,.0f} tokens{z}",
    }
    return f"user {who}: {texts.get(row['rule'], row['rule'])}"


class AbuseJob:
    """Runs the scoring, records the run in `job_runs`, hands new alerts on."""

    def __init__(
        self,
        connect: Callable[[], duckdb.DuckDBPyConnection],
        config: AbuseConfig,
        store: Callable[[list[Alert]], list[Alert]],
    ) -> None:
        """`store` keeps a run's alerts and returns once they are committed, with the new
        ones (a flag raised again in its window is a repeat, stored once)."""
        self._connect = connect
        self._config = config
        self._store = store

    def run(self, now: datetime | None = None) -> AbuseRun:
        moment = now or datetime.now(UTC)
        conn = self._connect()
        clock = time.perf_counter()
        try:
            run_id = start_run(conn, ABUSE, "scheduled")
            error, events, alerts = None, pl.DataFrame(), []
            try:
                events = read_events(conn, moment, self._config)
                found = score(events, price_table(conn), moment, self._config)
                alerts = to_alerts(found, moment, self._config)
            except Exception as exc:
                log.exception("abuse run failed")
                error = f"{type(exc).__name__}: {exc}"
            conn.execute(
                """UPDATE job_runs SET finished_at = ?, rows_in = ?, rows_out = ?, error = ?
                   WHERE run_id = ?""",
                [datetime.now(UTC), events.height, len(alerts), error, run_id],
            )
        finally:
            conn.close()
        fresh = self._store(alerts)
        seconds = time.perf_counter() - clock
        log.info("abuse run: %d flags (%d new) in %.2f s", len(alerts), len(fresh), seconds)
        return AbuseRun(alerts, fresh, error, seconds)


@dataclass(frozen=True)
class AbuseRun:
    flags: list[Alert]  # everything the run found
    new: list[Alert]  # of them, those not raised before in their window
    error: str | None
    seconds: float
