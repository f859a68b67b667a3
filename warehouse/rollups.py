"""Rollups of priced usage events: pure functions from polars frame to frame.

Costs are summed as DECIMAL(38, 0) pico-dollars (an Int64 sum could overflow past
9.2 million USD); a bucket's `cost_pico` counts the priced events only, and `unpriced`
counts the rest, so a report can say how much it does not know.
"""

from __future__ import annotations

import polars as pl

_MONEY = pl.Decimal(38, 0)
HOURLY_KEYS = ("bucket", "user_id", "model", "service_tier", "status", "endpoint")
_TOKENS = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
    "web_search_calls",
)


def _measures() -> list[pl.Expr]:
    return [
        pl.len().cast(pl.Int64).alias("requests"),
        *(pl.col(c).fill_null(0).sum().cast(pl.Int64).alias(c) for c in _TOKENS),
        pl.col("cost_pico").cast(_MONEY).sum().alias("cost_pico"),
        (pl.col("status") == "error").sum().cast(pl.Int64).alias("errors"),
        (pl.col("status") == "incomplete").sum().cast(pl.Int64).alias("incomplete"),
        (pl.col("status") == "failed").sum().cast(pl.Int64).alias("failed"),
        pl.col("unpriced").sum().cast(pl.Int64).alias("unpriced"),
    ]


def hourly(priced: pl.LazyFrame) -> pl.LazyFrame:
    """Per hour x end user x model x service tier x status x endpoint."""
    return (
        priced.with_columns(pl.col("created_at").dt.truncate("1h").alias("bucket"))
        .group_by(HOURLY_KEYS)
        .agg(_measures())
    )


def daily(hourly_rows: pl.LazyFrame) -> pl.LazyFrame:
    """The same, per day (UTC), summed from the hourly buckets."""
    return (
        hourly_rows.with_columns(pl.col("bucket").dt.truncate("1d"))
        .group_by(HOURLY_KEYS)
        .agg(
            pl.col("requests").sum(),
            *(pl.col(c).sum() for c in _TOKENS),
            pl.col("cost_pico").sum(),
            *(pl.col(c).sum() for c in ("errors", "incomplete", "failed", "unpriced")),
        )
    )


def daily_tags(priced: pl.LazyFrame, keys: list[str]) -> pl.LazyFrame:
    """Per day x metadata key x value x model, for the configured keys (spend by team,
    feature, customer...). `tag_values` holds each event's value for each key, in the
    order of `keys`. Not per end user as well: with thousands of users that grain is as
    large as the events themselves, and per-user questions go to `usage_daily`."""
    if not keys:
        return pl.LazyFrame(schema=_TAG_SCHEMA)
    base = priced.with_columns(pl.col("created_at").dt.truncate("1d").alias("bucket"))
    per_key = [
        base.with_columns(
            pl.lit(key).alias("tag_key"), pl.col("tag_values").list.get(i).alias("tag_value")
        )
        .filter(pl.col("tag_value").is_not_null())
        .group_by("bucket", "tag_key", "tag_value", "model")
        .agg(
            pl.len().cast(pl.Int64).alias("requests"),
            *(
                pl.col(c).fill_null(0).sum().cast(pl.Int64).alias(c)
                for c in ("input_tokens", "output_tokens", "total_tokens")
            ),
            pl.col("cost_pico").cast(_MONEY).sum().alias("cost_pico"),
            pl.col("unpriced").sum().cast(pl.Int64).alias("unpriced"),
        )
        for i, key in enumerate(keys)
    ]
    return pl.concat(per_key).select(list(_TAG_SCHEMA))


_TAG_SCHEMA: dict[str, pl.DataType] = {
    "bucket": pl.Datetime("us", "UTC"),
    "tag_key": pl.String(),
    "tag_value": pl.String(),
    "model": pl.String(),
    "requests": pl.Int64(),
    "input_tokens": pl.Int64(),
    "output_tokens": pl.Int64(),
    "total_tokens": pl.Int64(),
    "cost_pico": _MONEY,
    "unpriced": pl.Int64(),
}


def link_roots(known: pl.DataFrame, new: pl.DataFrame) -> pl.DataFrame:
    """Map responses to the first response of their conversation (their root).

    `known`: links already stored (response_id, root_id, depth). `new`: newly seen
    (response_id, previous_response_id) pairs. Returns the links to store: one for each
    new response, and a changed one for each known response whose root turned out to
    have a parent of its own (a parent that arrived after its child). Applied to no
    known links and every pair at once, it is the full rebuild: same result.
    """
    new = new.filter(pl.col("previous_response_id").is_not_null()).unique(
        "response_id", keep="last", maintain_order=True
    )
    new_ids = new["response_id"].implode()
    relevant = known.filter(
        pl.col("response_id").is_in(new["previous_response_id"].implode())
        | pl.col("root_id").is_in(new_ids)
    )
    pointers = pl.concat(
        [
            relevant.select("response_id", pl.col("root_id").alias("parent"), "depth"),
            new.select(
                "response_id",
                pl.col("previous_response_id").alias("parent"),
                pl.lit(1, pl.Int32).alias("depth"),
            ),
        ]
    ).unique("response_id", keep="last")
    # Pointer jumping: each round doubles how far back every response points.
    for _ in range(64):
        step = pointers.join(
            pointers.select(
                pl.col("response_id").alias("parent"),
                pl.col("parent").alias("_grand"),
                pl.col("depth").alias("_more"),
            ),
            on="parent",
            how="left",
        )
        if step["_grand"].null_count() == step.height:
            break
        pointers = step.select(
            "response_id",
            pl.coalesce("_grand", "parent").alias("parent"),
            (pl.col("depth") + pl.col("_more").fill_null(0)).cast(pl.Int32).alias("depth"),
        )
    linked = pointers.rename({"parent": "root_id"})
    return linked.join(known, on=["response_id", "root_id", "depth"], how="anti")


def conversation_days(priced: pl.LazyFrame) -> pl.LazyFrame:
    """Per conversation root x day: the partial sums `conversations` adds up.
    `conversation_root` is the conversation a response continues or starts (null if
    it is in none)."""
    both = priced.filter(pl.col("conversation_root").is_not_null()).with_columns(
        pl.col("conversation_root").alias("root_id")
    )
    return (
        both.with_columns(pl.col("created_at").dt.truncate("1d").alias("bucket"))
        .group_by("root_id", "bucket")
        .agg(
            # The conversation's user: the first one named, in time order (deterministic).
            pl.col("user_id").sort_by("created_at", "response_id").drop_nulls().first(),
            pl.col("created_at").min().alias("first_at"),
            pl.col("created_at").max().alias("last_at"),
            pl.len().cast(pl.Int64).alias("responses"),
            *(
                pl.col(c).fill_null(0).sum().cast(pl.Int64).alias(c)
                for c in ("input_tokens", "output_tokens", "total_tokens")
            ),
            pl.col("cost_pico").cast(_MONEY).sum().alias("cost_pico"),
            pl.col("unpriced").sum().cast(pl.Int64).alias("unpriced"),
        )
    )


def conversations(days: pl.LazyFrame) -> pl.LazyFrame:
    """What each conversation cost as it grew: its days added up."""
    return days.group_by("root_id").agg(
        pl.col("user_id").sort_by("first_at", "bucket").drop_nulls().first(),
        pl.col("first_at").min(),
        pl.col("last_at").max(),
        *(pl.col(c).sum() for c in ("responses", "input_tokens", "output_tokens", "total_tokens")),
        pl.col("cost_pico").sum(),
        pl.col("unpriced").sum(),
    )
