"""Conversations in the rollups: which conversation each response belongs to (its root, by
`previous_response_id`), and how an incremental run keeps `conversation_links`,
`conversation_days` and `conversations` exact when responses arrive in any order.

- A response continuing another is linked to its parent's root (`update_links`); a parent
  that arrives after its children makes their conversation continue its own (the old
  root is *dissolved*), a response that gains a child becomes a *new root*.
- Events counted before in no conversation, or in a dissolved one, are moved into their
  conversation from now on (`moved_into_conversations`).
- Partial sums are merged into `conversation_days`; where a conversation's user cannot be
  told from the sums alone, that conversation day is recomputed from its events
  (`merge_conversations`). Conversations' totals are then added up again from their days
  (`refresh_conversations`).

The pipelines are in `rollups` (pure); this module reads and writes through the `Run`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import duckdb
import polars as pl

from tokentill.warehouse import rollups
from tokentill.warehouse.db import query_frame
from tokentill.warehouse.prices import CatalogCache
from tokentill.warehouse.rollup_run import EVENT_COLUMNS, LINKS_SCHEMA, Run, day_frame
from tokentill.warehouse.spend import priced_events


class Links:
    """Conversation links before and after an incremental run's new pairs."""

    def __init__(self, known: pl.DataFrame, changes: pl.DataFrame) -> None:
        self.known = known
        self.changes = changes
        after = pl.concat([known, changes]).unique("response_id", keep="last")
        self._root = after.select("response_id", "root_id")
        roots_after = set(after["root_id"].to_list())
        roots_before = set(known["root_id"].to_list())
        linked = set(after["response_id"].to_list())
        self.dissolved: set[str] = roots_before - roots_after
        self.new_roots: set[str] = roots_after - roots_before - linked
        self._roots = pl.DataFrame(
            {"response_id": sorted(roots_after - linked)}, schema={"response_id": pl.String}
        )

    def root_of(self, response_id: pl.Expr) -> pl.Expr:
        """The conversation of each response from now on (of those this run touches)."""
        roots = self._root.rename({"response_id": "_rid", "root_id": "_root"})
        ids = self._roots["response_id"].implode()
        return (
            response_id.replace_strict(roots["_rid"], roots["_root"], default=None)
            .fill_null(pl.when(response_id.is_in(ids)).then(response_id))
            .alias("conversation_root")
        )

    def moved_roots(self) -> pl.DataFrame:
        """response -> root for every response whose conversation this run changed."""
        return pl.concat(
            [
                self.changes.select("response_id", "root_id"),
                pl.DataFrame(
                    {"response_id": sorted(self.new_roots), "root_id": sorted(self.new_roots)},
                    schema={"response_id": pl.String, "root_id": pl.String},
                ),
            ]
        )


def all_links(run: Run) -> pl.DataFrame:
    """Every conversation link, from every (response, previous response) pair (a
    function of its own so that the pairs are freed before the days are rolled up)."""
    pairs = run.read(
        """SELECT response_id, previous_response_id FROM usage_events
           WHERE previous_response_id IS NOT NULL AND response_id IS NOT NULL
             AND ingest_seq <= ?""",
        [run.watermark],
    )
    return rollups.link_roots(pl.DataFrame(schema=LINKS_SCHEMA), pairs)


def totals_in_parts(run: Run) -> int:
    """Each conversation's totals, from its days as stored, a share of the roots at a
    time (holding every day's rows until the end was what set a rebuild's peak of
    memory). Returns the rows written."""
    parts, written = run.config.conversation_parts, 0
    for part in range(parts):
        days = run.read(
            "SELECT * FROM conversation_days WHERE hash(root_id) % ? = ?", [parts, part]
        )
        totals = run.compute(rollups.conversations(days.lazy()))
        del days
        run.insert("conversations", totals)
        written += totals.height
    return written


def update_links(run: Run, changed: pl.DataFrame) -> Links:
    pairs = changed.filter(
        pl.col("previous_response_id").is_not_null() & pl.col("response_id").is_not_null()
    ).select("response_id", "previous_response_id")
    ids = changed.select("response_id").drop_nulls()
    if not ids.height:
        return Links(pl.DataFrame(schema=LINKS_SCHEMA), pl.DataFrame(schema=LINKS_SCHEMA))
    # Only the stored links these rows can touch: their parents' (and the other
    # responses of their parents' conversations), and those that end at one of them
    # (a parent that arrived after its children, or a root seen again). One set of
    # ids for both columns: a few more links than needed, one scan.
    wanted = pl.concat(
        [ids, pairs.select(pl.col("previous_response_id").alias("response_id"))]
    ).unique()
    with run.registered("_wanted", wanted):
        stored = run.read(
            """SELECT rowid AS _rowid, response_id, root_id, depth FROM conversation_links
               WHERE response_id IN (SELECT response_id FROM _wanted)
                  OR root_id IN (SELECT response_id FROM _wanted)"""
        )
    known = stored.drop("_rowid").cast(LINKS_SCHEMA)  # type: ignore[arg-type]
    changes = rollups.link_roots(known, pairs) if pairs.height else known.clear()
    if changes.height:
        # Every stored link of a changed response is among those read (its id is
        # wanted, or its root is): deleted by rowid, not by another scan of the ids.
        replaced = stored.join(changes.select("response_id"), on="response_id", how="semi")
        run.delete_in("conversation_links", "rowid", replaced.select("_rowid"))
        run.insert("conversation_links", changes)
    return Links(known, changes)


def moved_into_conversations(run: Run, links: Links, changed: pl.DataFrame) -> pl.DataFrame:
    """Events counted before in no conversation or in one that now continues another
    (not written again since): priced, each with its conversation from now on."""
    skip = changed.select("response_id").drop_nulls()
    parts: list[pl.DataFrame] = []
    # Members of conversations whose root now has a parent: their stored days say
    # where to look.
    dissolved = pl.DataFrame({"root_id": sorted(links.dissolved)}, schema={"root_id": pl.String})
    if dissolved.height:
        with run.registered("_dissolved", dissolved):
            days = run.column(
                """SELECT DISTINCT bucket FROM conversation_days
                   WHERE root_id IN (SELECT root_id FROM _dissolved)"""
            )
        members = pl.concat(
            [
                links.known.filter(pl.col("root_id").is_in(dissolved["root_id"].implode())).select(
                    "response_id"
                ),
                dissolved.rename({"root_id": "response_id"}),
            ]
        ).join(skip, on="response_id", how="anti")
        if days and members.height:
            parts.append(events_by_id(run, members, days=days))
    # Roots of new conversations: found among recent days first (a response comes
    # before those that continue it), then anywhere.
    roots = pl.DataFrame(
        {"response_id": sorted(links.new_roots)}, schema={"response_id": pl.String}
    ).join(skip, on="response_id", how="anti")
    if roots.height:
        children = changed.filter(pl.col("conversation_root").is_in(roots["response_id"].implode()))
        since = children["created_at"].min() if children.height else None
        found = events_by_id(
            run, roots, since=since - timedelta(days=1) if isinstance(since, datetime) else None
        )
        missing = roots.join(found.select("response_id"), on="response_id", how="anti")
        if since is not None and missing.height:
            found = pl.concat([found, events_by_id(run, missing)])
        parts.append(found)
    if not parts:
        return run.compute(run.price(changed.clear()))
    events = pl.concat(parts).with_columns(links.root_of(pl.col("response_id")))
    return run.compute(run.price(events))


def events_by_id(
    run: Run,
    ids: pl.DataFrame,
    *,
    days: list[datetime] | None = None,
    since: datetime | None = None,
) -> pl.DataFrame:
    where, params = "e.response_id IN (SELECT response_id FROM _ids)", list[object]()
    if since is not None:
        where += " AND e.created_at >= ?"
        params.append(since)
    columns = run.select(EVENT_COLUMNS, tags=True)
    with run.registered("_ids", ids):
        if days is not None:
            with run.registered("_days", day_frame(days)):
                return run.read(
                    f"""SELECT {columns} FROM usage_events AS e
                        WHERE {where} AND e.created_at >= ? AND e.created_at < ?
                          AND date_trunc('day', e.created_at) IN (SELECT day FROM _days)""",
                    [*params, min(days), max(days) + timedelta(days=1)],
                )
        return run.read(f"SELECT {columns} FROM usage_events AS e WHERE {where}", params)


def merge_conversations(
    run: Run, new: pl.DataFrame, old: pl.DataFrame, moved: pl.DataFrame, links: Links
) -> tuple[set[str], int]:
    """Add to `conversation_days` the responses entering a conversation and the changed
    sums of those already in one; returns the roots touched and the rows written."""
    gone = pl.Series(sorted(links.dissolved), dtype=pl.String).implode()
    if links.dissolved:
        dissolved = pl.DataFrame({"root_id": sorted(links.dissolved)})
        run.delete_in("conversation_days", "root_id", dissolved)
    # Rows written again that stay in the conversation they were counted in.
    before = old.filter(
        pl.col("conversation_root").is_not_null() & ~pl.col("conversation_root").is_in(gone)
    )
    staying = new.join(
        before.select("event_id", pl.col("conversation_root").alias("_was")),
        on="event_id",
        how="left",
    )
    again = pl.col("_was").is_not_null() & (pl.col("_was") == pl.col("conversation_root"))
    entering = [staying.filter(~again).drop("_was")]
    if moved.height:
        entering.append(moved.select(new.columns))
    entering_rows = pl.concat(entering, how="vertical_relaxed")
    delta = run.compute(
        rollups.conversation_delta(
            rollups.conversation_days_named(entering_rows.lazy()),
            [
                rollups.conversation_days(staying.filter(again).drop("_was").lazy()),
                rollups.negate(
                    rollups.conversation_days(before.lazy()), rollups.CONVERSATION_MEASURES
                ),
            ],
        )
    )
    if not delta.height:
        return set(), 0
    stored = run.stored_rows("conversation_days", delta, ("root_id", "bucket"))
    merged = run.compute(
        rollups.merge_conversation_days(stored.drop("_rowid").lazy(), delta.lazy())
    )
    ambiguous = merged.filter("ambiguous").select("root_id", "bucket")
    merged = merged.filter(~pl.col("ambiguous")).drop("ambiguous")
    run.delete_in("conversation_days", "rowid", stored.select("_rowid"))
    run.insert("conversation_days", merged)
    if ambiguous.height:
        run.insert("conversation_days", _conversation_days_of(run, ambiguous))
    return set(delta["root_id"].unique().to_list()), merged.height + ambiguous.height


def _conversation_days_of(run: Run, wanted: pl.DataFrame) -> pl.DataFrame:
    """`conversation_days` rows (root, day) recomputed from their events."""
    roots = wanted.select("root_id").unique()
    with run.registered("_roots", roots):
        members = run.read(
            """SELECT response_id, root_id FROM conversation_links
               WHERE root_id IN (SELECT root_id FROM _roots)
               UNION ALL SELECT root_id, root_id FROM _roots"""
        )
    days = sorted(set(wanted["bucket"].to_list()))
    events = events_by_id(run, members.select("response_id"), days=days).join(
        members.rename({"root_id": "conversation_root"}), on="response_id"
    )
    conv = run.compute(rollups.conversation_days(run.price(events)))
    return conv.join(wanted, on=["root_id", "bucket"], how="semi")


def refresh_conversations(run: Run, roots: set[str], dissolved: set[str]) -> int:
    """The totals of `roots` added up again from their days (a dissolved root's gone)."""
    everything = sorted(roots | dissolved)
    if not everything:
        return 0
    frame = pl.DataFrame({"root_id": everything}, schema={"root_id": pl.String})
    with run.registered("_roots", frame):
        days = run.read(
            "SELECT * FROM conversation_days WHERE root_id IN (SELECT root_id FROM _roots)"
        )
        run.execute("DELETE FROM conversations WHERE root_id IN (SELECT root_id FROM _roots)")
    totals = run.compute(rollups.conversations(days.lazy()))
    run.insert("conversations", totals)
    return totals.height


# -- reading conversations (the admin API) ------------------------------------------------


def conversation_page(
    conn: duckdb.DuckDBPyConnection,
    start: datetime,
    end: datetime,
    user: str | None,
    limit: int,
    offset: int,
) -> tuple[int, pl.DataFrame]:
    """Conversations active in [start, end), most expensive first, one page; and how
    many there are."""
    where = "last_at >= ? AND first_at < ?"
    args: list[object] = [start, end]
    if user is not None:
        where += " AND user_id = ?"
        args.append(user)
    frame = query_frame(
        conn,
        f"""SELECT *, count(*) OVER () AS total FROM conversations WHERE {where}
            ORDER BY cost_pico DESC, root_id LIMIT ? OFFSET ?""",
        [*args, limit, offset],
    )
    return (int(frame["total"][0]) if frame.height else 0), frame


def conversation_detail(
    conn: duckdb.DuckDBPyConnection, root_id: str, *, image_model: str, catalog: CatalogCache
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """One conversation: its totals (no row when there is none), its days, and its first
    500 turns, each priced as the rollups price it."""
    head = query_frame(conn, "SELECT * FROM conversations WHERE root_id = ?", [root_id])
    days = query_frame(
        conn, "SELECT * FROM conversation_days WHERE root_id = ? ORDER BY bucket", [root_id]
    )
    turns = priced_events(
        conn,
        """(response_id = ? OR response_id IN (
               SELECT response_id FROM conversation_links WHERE root_id = ?))""",
        [root_id, root_id],
        image_model=image_model,
        catalog=catalog,
        order="ORDER BY created_at, response_id LIMIT 500",
    ).sort("created_at", "response_id")
    return head, days, turns
