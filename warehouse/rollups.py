"""Rollups of priced usage events: pure functions from polars frame to frame.

Costs are summed as DECIMAL(38, 0) pico-dollars (an Int64 sum could overflow past
9.2 million USD); a bucket's `cost_pico` counts the priced events only, and `unpriced`
counts the rest, so a report can say how much it does not know.
"""

from __future__ import annotations

import polars as pl

_MONEY = pl.Decimal(38, 0)
HOURLY_KEYS = ("bucket", "user_id", "model", "service_tier", "status", "endpoint")
# A response's token counts, as the Responses API names them: cached tokens are part of
# input tokens, reasoning tokens part of output tokens.
TOKEN_COUNTS = (
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
        *(pl.col(c).fill_null(0).sum().cast(pl.Int64).alias(c) for c in TOKEN_COUNTS),
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
            *(pl.col(c).sum() for c in TOKEN_COUNTS),
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
            *(
                pl.col(c).fill_null(0).sum().cast(pl.Int64).alias(c)
                for c in ("cached_input_tokens", "reasoning_tokens")
            ),
            *(
                (pl.col("status") == status).sum().cast(pl.Int64).alias(name)
                for name, status in (
                    ("errors", "error"),
                    ("incomplete", "incomplete"),
                    ("failed", "failed"),
                )
            ),
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
    "cached_input_tokens": pl.Int64(),
    "reasoning_tokens": pl.Int64(),
    "errors": pl.Int64(),
    "incomplete": pl.Int64(),
    "failed": pl.Int64(),
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
    relevant = (
        known.filter(
            pl.col("response_id").is_in(new["previous_response_id"].implode())
            | pl.col("root_id").is_in(new["response_id"].implode())
        )
        if known.height
        else known
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
    # The pointers jump on 64-bit hashes of the ids: joins of millions of strings take
    # several times the memory and time. A second hash checks that no two ids share the
    # first (then the strings themselves are used).
    ids = pl.concat([pointers["response_id"], pointers["parent"]])
    key = (lambda c: pl.col(c).hash(1)) if hashes_distinct(ids) else pl.col
    jumped = _jump(
        pointers.select(key("response_id").alias("node"), key("parent").alias("parent"), "depth")
    )
    # Every root is the parent of some response: its name is there.
    names = pointers.select(key("parent").alias("parent"), pl.col("parent").alias("root_id"))
    names = names.filter(pl.col("parent").is_first_distinct())
    linked = pl.concat(
        [
            pointers.select("response_id"),
            jumped.join(names, on="parent", how="left", maintain_order="left"),
        ],
        how="horizontal",
    ).select("response_id", "root_id", "depth")
    if not known.height:
        return linked
    return linked.join(known, on=["response_id", "root_id", "depth"], how="anti")


def hashes_distinct(ids: pl.Series) -> bool:
    """Whether no two of these ids share a 64-bit hash (as far as a second hash can
    tell: two that collide in the first would have to collide in the second too)."""
    hashed = ids.to_frame("id").select(
        pl.col("id").hash(1).n_unique().alias("h1"), pl.col("id").hash(2).n_unique().alias("h2")
    )
    return bool(hashed.item(0, "h1") == hashed.item(0, "h2"))


def _jump(pointers: pl.DataFrame) -> pl.DataFrame:
    """Pointer jumping over (node, parent, depth): each round doubles how far back every
    node points, until every one points at a node with no parent (its root). Rows keep
    their order."""
    for _ in range(64):
        step = pointers.join(
            pointers.select(
                pl.col("node").alias("parent"),
                pl.col("parent").alias("_grand"),
                pl.col("depth").alias("_more"),
            ),
            on="parent",
            how="left",
            maintain_order="left",
        )
        if step["_grand"].null_count() == step.height:
            break
        pointers = step.select(
            "node",
            pl.coalesce("_grand", "parent").alias("parent"),
            (pl.col("depth") + pl.col("_more").fill_null(0)).cast(pl.Int32).alias("depth"),
        )
    return pointers


def conversation_days(priced: pl.LazyFrame) -> pl.LazyFrame:
    """Per conversation root x day: the partial sums `conversations` adds up.
    `conversation_root` is the conversation a response continues or starts (null if
    it is in none)."""
    return conversation_days_named(priced).drop("named_at")


def conversation_days_named(priced: pl.LazyFrame) -> pl.LazyFrame:
    """`conversation_days`, plus `named_at`: when the response naming `user_id` was
    created (what `merge_conversation_days` needs to add two partial sums exactly)."""
    both = priced.filter(pl.col("conversation_root").is_not_null()).with_columns(
        pl.col("conversation_root").alias("root_id")
    )
    named = pl.col("user_id").is_not_null()
    return (
        both.with_columns(pl.col("created_at").dt.truncate("1d").alias("bucket"))
        .group_by("root_id", "bucket")
        .agg(
            # The conversation's user: the first one named, in time order (deterministic).
            pl.col("user_id").sort_by("created_at", "response_id").drop_nulls().first(),
            pl.col("created_at").filter(named).min().alias("named_at"),
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


# -- adding partial sums (incremental runs) ------------------------------------------------

USAGE_MEASURES = (
    "requests",
    *TOKEN_COUNTS,
    "cost_pico",
    "errors",
    "incomplete",
    "failed",
    "unpriced",
)
TAG_KEYS = ("bucket", "tag_key", "tag_value", "model")
TAG_MEASURES = tuple(c for c in _TAG_SCHEMA if c not in TAG_KEYS)
CONVERSATION_MEASURES = (
    "responses",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cost_pico",
    "unpriced",
)


def negate(rows: pl.LazyFrame, measures: tuple[str, ...]) -> pl.LazyFrame:
    """Partial sums to take away (the rows of events as they were counted before)."""
    return rows.with_columns(-pl.col(c) for c in measures)


def add_up(
    parts: list[pl.LazyFrame],
    keys: tuple[str, ...],
    measures: tuple[str, ...],
    count: str | None = None,
) -> pl.LazyFrame:
    """Partial sums of the same grain added up by key. With `count`, a bucket left with
    no event (every event it held moved to another bucket) is dropped, as a full rebuild
    would never make it."""
    columns = [*keys, *measures]
    summed = (
        pl.concat([p.select(columns) for p in parts], how="vertical_relaxed")
        .group_by(keys)
        .agg(pl.col(c).sum() for c in measures)
    )
    if count is not None:
        summed = summed.filter(pl.col(count) != 0)
    return summed.select(columns)


def conversation_delta(entering: pl.LazyFrame, changed: list[pl.LazyFrame]) -> pl.LazyFrame:
    """What to add to `conversation_days`: `entering` (`conversation_days_named` of the
    responses counted in a conversation for the first time) and `changed` (partial sums
    of responses already counted there whose usage changed: their new sums and their old
    ones negated; their times and user stay as they were)."""
    keep = ["root_id", "bucket", *CONVERSATION_MEASURES]
    parts = [
        entering,
        *(
            part.select(keep).with_columns(
                pl.lit(None, pl.String).alias("user_id"),
                *(
                    pl.lit(None, pl.Datetime("us", "UTC")).alias(c)
                    for c in ("named_at", "first_at", "last_at")
                ),
            )
            for part in changed
        ),
    ]
    columns = ["root_id", "bucket", "user_id", "named_at", "first_at", "last_at"]
    return (
        pl.concat(
            [p.select(*columns, *CONVERSATION_MEASURES) for p in parts], how="vertical_relaxed"
        )
        .group_by("root_id", "bucket")
        .agg(
            pl.col("user_id").drop_nulls().first(),
            pl.col("named_at").min(),
            pl.col("first_at").min(),
            pl.col("last_at").max(),
            *(pl.col(c).sum() for c in CONVERSATION_MEASURES),
        )
    )


def merge_conversation_days(stored: pl.LazyFrame, added: pl.LazyFrame) -> pl.LazyFrame:
    """Stored `conversation_days` rows plus the partial sums of responses added to them
    (`conversation_days_named` of the new events, with the sums of events taken away
    already netted in). The user stays exact: it is the stored one unless no stored
    response named one or the added one was named before all stored responses, and
    `ambiguous` marks the rows where it cannot be told from the sums (recompute them)."""
    both = stored.join(added, on=["root_id", "bucket"], how="full", coalesce=True, suffix="_add")
    stored_user, added_user = pl.col("user_id"), pl.col("user_id_add")
    first_at = pl.min_horizontal("first_at", "first_at_add")
    last_at = pl.max_horizontal("last_at", "last_at_add")
    return both.select(
        "root_id",
        "bucket",
        pl.when(stored_user.is_null())
        .then(added_user)
        .when(added_user.is_null() | (pl.col("named_at") > pl.col("last_at")))
        .then(stored_user)
        .otherwise(added_user)
        .alias("user_id"),
        first_at.alias("first_at"),
        last_at.alias("last_at"),
        *(
            (pl.col(c).fill_null(0) + pl.col(f"{c}_add").fill_null(0)).alias(c)
            for c in CONVERSATION_MEASURES
        ),
        (
            stored_user.is_not_null()
            & added_user.is_not_null()
            & (pl.col("named_at") <= pl.col("last_at"))
            & (pl.col("named_at") >= pl.col("first_at"))
        ).alias("ambiguous"),
    )
