"""Summaries of the rollups for the questions asked most: spend per day x end user
(with the first and last hour the user was seen), and per day x model (x tier, status,
endpoint). With 10,000 users, 90 days of usage_daily hold millions of rows; these hold a
user-day or a model-day each, so reports over months read thousands of rows.

They are sums of the hourly rollup and nothing else: pure polars functions of its rows,
applied by the rollup job to the days it recomputes, and to the partial sums an
incremental run adds.
"""

from __future__ import annotations

import polars as pl

from tokentill.warehouse.rollups import USAGE_MEASURES

USER_KEYS = ("bucket", "user_id")
MODEL_KEYS = ("bucket", "model", "service_tier", "status", "endpoint")


def users(hourly: pl.LazyFrame) -> pl.LazyFrame:
    """Per day x end user, from `usage_hourly` rows: the sums, and the user's first and
    last hour with usage that day. In day order: zone maps then skip the days outside a
    report's range."""
    return users_delta(hourly).sort("bucket", "user_id", nulls_last=True)


def models(hourly: pl.LazyFrame) -> pl.LazyFrame:
    """Per day x model x service tier x status x endpoint, from `usage_hourly` rows."""
    return (
        hourly.with_columns(pl.col("bucket").dt.truncate("1d"))
        .group_by(MODEL_KEYS)
        .agg(pl.col(c).sum() for c in USAGE_MEASURES)
        .sort("bucket")
    )


def users_delta(hourly: pl.LazyFrame) -> pl.LazyFrame:
    """`users`, unsorted, of stored hourly rows or of their partial sums (an incremental
    run's delta): the first and last hour are those of the rows adding requests, which
    are in the rollup afterwards (every stored row holds some)."""
    added = pl.col("requests") > 0
    return (
        hourly.group_by(pl.col("bucket").dt.truncate("1d").alias("day"), "user_id")
        .agg(
            *(pl.col(c).sum() for c in USAGE_MEASURES),
            pl.col("bucket").filter(added).min().alias("first_hour"),
            pl.col("bucket").filter(added).max().alias("last_hour"),
        )
        .rename({"day": "bucket"})
    )
