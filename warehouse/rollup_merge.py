"""An incremental run: what changed since the last run's watermark, added to the stored
rollups as partial sums.

- Events written since (new, late, replayed after a crash: a replay writes nothing) are
  priced, and their sums appended to the usage tables as a part (`rollup_compact`: no
  stored row is rewritten; readers add rows up by key) and merged into their
  conversations' buckets.
- Events written again since (the writer only rewrites rows still pending: background
  responses completed hours later, interrupted streams) have their old sums taken away
  and their new ones added: `rollup_pending` keeps every pending event as it was counted.
- Responses whose conversation changed move their sums to the new root
  (`conversations`).
- Days holding events of a model whose price was added or corrected since the last run
  (`prices.price_id`) are recomputed whole from the raw events (`rollup_rebuild`): late
  prices re-price what they cover, with no manual backfill.

Partial sums are exact (integers, DECIMAL pico-dollars), so every report answers after an
incremental run what it answers after a full rebuild, and the tables are a rebuild's once
compacted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import polars as pl

from tokentill.warehouse import conversations, pricing, rollup_compact, rollups, summaries
from tokentill.warehouse.events import PENDING_STATUSES
from tokentill.warehouse.rollup_rebuild import events_per_day, recompute
from tokentill.warehouse.rollup_run import COUNTED_COLUMNS, DAY, EVENT_COLUMNS, Run


@dataclass
class Increment:
    rows_in: int = 0
    rows_out: int = 0
    days: int = 0
    recomputed: list[datetime] = field(default_factory=list)
    parts_written: int = 0


def increment(
    run: Run, last_watermark: int, last_price_mark: int, prices: pl.DataFrame
) -> Increment:
    """Add what changed in (last_watermark, run.watermark] to the stored rollups;
    recompute the days a price added since `last_price_mark` may cover."""
    out = Increment()
    with run.phases.step("repriced_days"):
        dirty = sorted(set(_repriced_days(run, last_price_mark, prices)))
    with run.phases.step("changed"):
        changed = run.read(
            f"""SELECT {run.select(EVENT_COLUMNS, tags=True)}, e.previous_response_id
                FROM usage_events AS e WHERE e.ingest_seq > ? AND e.ingest_seq <= ?""",
            [last_watermark, run.watermark],
        )
    with run.phases.step("links"):
        links = conversations.update_links(run, changed)
        changed = changed.drop("previous_response_id").with_columns(
            links.root_of(pl.col("response_id"))
        )
    # As counted before: the rows being written again (pending until now).
    with run.phases.step("changed"), run.registered("_changed", changed.select("event_id")):
        counted = run.read(
            """SELECT * FROM rollup_pending
               WHERE event_id IN (SELECT event_id FROM _changed)"""
        )
    with run.phases.step("moved"):
        moved = conversations.moved_into_conversations(run, links, changed)

    with run.phases.step("append_usage"):
        clean = ~DAY.is_in(pl.Series(dirty, dtype=pl.Datetime("us", "UTC")).implode())
        new = run.compute(run.price(changed.filter(clean)))
        old = counted.filter(clean)
        moved = moved.filter(clean)
        touched_days = set(new.select(DAY.unique())["created_at"]) | set(
            old.select(DAY.unique())["created_at"]
        )
        rows_out = append_usage(run, new.lazy(), old.lazy())
        out.parts_written = rows_out
    with run.phases.step("merge_conversations"):
        roots, conv_rows = conversations.merge_conversations(run, new, old, moved, links)
        rows_out += conv_rows
    with run.phases.step("pending"):
        # Pending events, as counted from now on.
        run.delete_in("rollup_pending", "event_id", changed.select("event_id"))
        run.insert(
            "rollup_pending",
            new.filter(pl.col("status").is_in(list(PENDING_STATUSES))).select(COUNTED_COLUMNS),
        )
        moved_roots = links.moved_roots()
        if moved_roots.height:
            with run.registered("_moved", moved_roots):
                run.execute(
                    """UPDATE rollup_pending AS p SET conversation_root = m.root_id
                       FROM _moved AS m WHERE p.response_id = m.response_id"""
                )

    if dirty:
        with run.phases.step("recompute"):
            rows_in, written, recomputed_roots = recompute(
                run, events_per_day(run, dirty), replace=True
            )
        out.rows_in += rows_in
        rows_out += written
        roots |= recomputed_roots
    with run.phases.step("refresh_conversations"):
        rows_out += conversations.refresh_conversations(run, roots, links.dissolved)
    out.rows_in += changed.height + moved.height
    out.rows_out += rows_out
    out.days = len(touched_days | set(dirty))
    out.recomputed = dirty
    return out


def _repriced_days(run: Run, last_price_mark: int, prices: pl.DataFrame) -> list[datetime]:
    """Days holding events that a price added since the last run may cover."""
    new_prices = prices.filter(pl.col("price_id") > last_price_mark)
    if not new_prices.height:
        return []
    start = new_prices["effective_from"].min()
    models = run.column("SELECT DISTINCT model FROM usage_events WHERE created_at >= ?", [start])
    model_map = pricing.model_map([str(m) for m in models], prices["model"].unique().to_list())
    affected = model_map.filter(pl.col("price_model").is_in(new_prices["model"].implode()))
    if not affected.height:
        return []
    with run.registered("_affected_models", affected):
        return run.column(
            """SELECT DISTINCT date_trunc('day', created_at) FROM usage_events
               WHERE model IN (SELECT model FROM _affected_models) AND created_at >= ?""",
            [start],
        )


def append_usage(run: Run, new: pl.LazyFrame, old: pl.LazyFrame) -> int:
    """The usage tables' partial sums (new sums less the old ones), appended as a part."""
    return rollup_compact.append(run, usage_deltas(run, new, old))


def usage_deltas(run: Run, new: pl.LazyFrame, old: pl.LazyFrame) -> dict[str, pl.DataFrame]:
    """Each usage table's partial sums: the sums of `new` less those of `old`."""
    keys = list(run.config.tag_keys)
    usage = rollups.USAGE_MEASURES
    hourly = rollups.add_up(
        [rollups.hourly(new), rollups.negate(rollups.hourly(old), usage)],
        rollups.HOURLY_KEYS,
        usage,
    )
    tags = rollups.add_up(
        [
            rollups.daily_tags(new, keys),
            rollups.negate(rollups.daily_tags(old, keys), rollups.TAG_MEASURES),
        ],
        rollups.TAG_KEYS,
        rollups.TAG_MEASURES,
    )
    hourly_delta, tags_delta = run.compute_all([hourly, tags])
    daily_delta, users_delta, models_delta = run.compute_all(
        [
            rollups.daily(hourly_delta.lazy()),
            summaries.users_delta(hourly_delta.lazy()),
            summaries.models(hourly_delta.lazy()),
        ]
    )
    return {
        "usage_hourly": hourly_delta,
        "usage_daily": daily_delta,
        "usage_daily_tags": tags_delta,
        "usage_daily_users": users_delta,
        "usage_daily_models": models_delta,
    }
