"""Rollups: sums equal raw sums to the pico-dollar, incremental runs equal a full rebuild,
late events and late prices land where they belong, and the server runs the job."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import httpx
import orjson
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Running
from tokentill.ingest.journal import Journal
from tokentill.warehouse import rollup_rebuild, rollups
from tokentill.warehouse.catalog import EPOCH, PriceRow
from tokentill.warehouse.db import open_warehouse, query_frame
from tokentill.warehouse.duckdb_file import DuckDBEvents, DuckDBFile
from tokentill.warehouse.events import UsageEvent
from tokentill.warehouse.finance import FinanceQuery, finance_report
from tokentill.warehouse.jobs import RollupConfig, RollupJob
from tokentill.warehouse.migrate import migrate
from tokentill.warehouse.prices import CatalogCache, insert_rows, price_table
from tokentill.warehouse.pricing import effective_intervals, model_map, price_events
from tokentill.warehouse.reconcile import read_ours
from tokentill.warehouse.rollup_run import Phases, shares
from tokentill.warehouse.spend import Filters, SpendQuery, choose_source, list_users, spend, spent
from tokentill.warehouse.storage import EventSink
from tokentill.warehouse.writer import Writer

DAY0 = datetime(2026, 5, 1, tzinfo=UTC)
MODELS = ["gpt-4o", "gpt-4o-2024-08-06", "o4-mini", "mystery-model"]
PRICES = [
    PriceRow(
        "gpt-4o",
        "default",
        EPOCH,
        None,
        {
            "input_per_mtok": Decimal("2.5"),
            "cached_input_per_mtok": Decimal("1.25"),
            "output_per_mtok": Decimal("10"),
        },
        "test",
    ),
    PriceRow(
        "gpt-4o",
        "flex",
        EPOCH,
        None,
        {"input_per_mtok": Decimal("1.25"), "output_per_mtok": Decimal("5")},
        "test",
    ),
    PriceRow(
        "o4-mini",
        "default",
        EPOCH,
        None,
        {
            "input_per_mtok": Decimal("1.1"),
            "cached_input_per_mtok": Decimal("0.275"),
            "output_per_mtok": Decimal("4.4"),
        },
        "test",
    ),
]
TABLES = {
    "usage_hourly": ("bucket", "user_id", "model", "service_tier", "status", "endpoint"),
    "usage_daily": ("bucket", "user_id", "model", "service_tier", "status", "endpoint"),
    "usage_daily_tags": ("bucket", "tag_key", "tag_value", "model"),
    "conversation_links": ("response_id",),
    "conversation_days": ("root_id", "bucket"),
    "conversations": ("root_id",),
    "usage_daily_users": ("bucket", "user_id"),
    "usage_daily_models": ("bucket", "model", "service_tier", "status", "endpoint"),
    "rollup_pending": ("event_id",),  # what the job counted pending: the same either way
}
# Report groupings the appended parts must answer as a rebuild does.
GROUPINGS: list[tuple[str, ...]] = [
    (),
    ("model",),
    ("user",),
    ("status",),
    ("model", "user", "service_tier", "status", "endpoint"),
    ("tag:team",),
    ("tag:customer", "model"),
]
FAR = datetime(2100, 1, 1, tzinfo=UTC)
CATALOG = CatalogCache()


class Warehouse:
    """A real DuckDB file fed through the real journal and writer."""

    def __init__(self, root: Path) -> None:
        self.conn = open_warehouse(root / "w.duckdb")
        self.readers = self.conn.cursor()
        self.start(root, DuckDBEvents(self.conn), self.readers.cursor)

    def start(
        self, root: Path, sink: EventSink, session: Callable[[], duckdb.DuckDBPyConnection]
    ) -> None:
        """The prices, the journal and its writer into `sink`, the job on `session`."""
        insert_rows(self.conn, PRICES)
        self.journal = Journal(root / "journal", segment_bytes=1 << 20, fsync_interval=1)
        self.journal.lock()
        self.writer = Writer(sink, self.journal, batch_max=10_000, flush_interval=0.01)
        self.writer.recover()
        self.journal.start(self.writer.submit)
        self.writer.start()
        self.session = session
        self.job = RollupJob(self.session, RollupConfig(tag_keys=("team", "customer")))

    def ingest(self, events: list[UsageEvent]) -> None:
        for event in events:
            self.journal.append(event)
        assert self.writer.flush(10)

    def compact(self) -> None:
        """Fold every part (the usage tables hold appended partial sums)."""
        result = self.job.compact(max_parts=0, older_than=FAR)
        assert result.error is None, result.error

    def answers(self) -> dict[str, Any]:
        """What the report queries answer, read through their own code: the contract of
        the appended parts is that these equal a full rebuild's at every moment."""
        conn = self.session()
        try:
            f = Filters(DAY0 - timedelta(days=1), DAY0 + timedelta(days=10))
            out: dict[str, Any] = {}
            for group_by in GROUPINGS:
                for bucket in (None, "day", "hour"):
                    query = SpendQuery(f, group_by, bucket)  # type: ignore[arg-type]
                    frame = spend(conn, query, image_model="gpt-image-1", catalog=CATALOG)
                    out[f"spend {group_by} {bucket} {choose_source(query)}"] = sorted(
                        frame.rows(), key=lambda r: tuple(str(v) for v in r)
                    )
            for status in ("queued", "completed", "interrupted"):
                only = Filters(f.start, f.end, statuses=(status,))
                out[f"users {status}"] = list_users(conn, only, "cost", "desc", 100, 0)
            out["users"] = list_users(conn, f, "requests", "asc", 100, 0)
            out["spent"] = spent(conn, f.start, f.end)
            out["ours"] = read_ours(conn, f.start.date(), f.end.date()).sort("day", "model").rows()
            out["finance"] = sorted(
                finance_report(conn, FinanceQuery(f.start.date(), f.end.date(), "team")).rows(),
                key=lambda r: tuple(str(v) for v in r),
            )
            return out
        finally:
            conn.close()

    def snapshot(self, *, compact: bool = True) -> dict[str, list[tuple[Any, ...]]]:
        """Every rollup table, sorted; compacted first (one row per key, as a rebuild
        writes them), unless asked not to."""
        if compact:
            self.compact()
        out = {}
        for table, keys in TABLES.items():
            frame = query_frame(self.conn, f"SELECT * FROM {table}")
            out[table] = sorted(frame.rows(), key=lambda r: tuple(str(v) for v in r))
            assert frame.height == frame.unique(subset=list(keys)).height, table
        return out

    def close(self) -> None:
        assert self.writer.stop()
        self.journal.close()
        self.readers.close()
        self.conn.close()


def make_event(i: int, day: int, hour: int, **fields: Any) -> UsageEvent:
    at = int((DAY0 + timedelta(days=day, hours=hour)).timestamp() * 1_000_000) + i
    values: dict[str, Any] = {
        "kind": "create",
        "event_id": f"resp_{i}",
        "response_id": f"resp_{i}",
        "endpoint": "responses",
        "status": "completed",
        "created_at_us": at,
        "request_started_at_us": at,
        "recorded_at_us": at,
        "model": MODELS[i % len(MODELS)],
        "user_id": f"user-{i % 5}",
        "metadata": orjson.dumps({"team": f"t{i % 3}", "customer": f"c{i % 2}"}).decode(),
        "input_tokens": 1000 + i,
        "cached_input_tokens": i % 300,
        "cache_write_tokens": 0,
        "output_tokens": 200 + i % 50,
        "reasoning_tokens": 0,
        "total_tokens": 1200 + i + i % 50,
        "service_tier": "flex" if i % 7 == 0 else "default",
    }
    values.update(fields)
    return UsageEvent(**values)


def status_fields(i: int, status: str, user: str | None) -> dict[str, Any]:
    """An event's fields for its status: an error has no response, a queued one no usage."""
    fields: dict[str, Any] = {"status": status, "user_id": user}
    if status == "error":
        fields.update(
            response_id=None,
            event_id=f"evt_{i}",
            input_tokens=None,
            output_tokens=None,
            total_tokens=None,
        )
    if status == "queued":
        fields.update(input_tokens=None, output_tokens=None, total_tokens=None)
    return fields


event_spec = st.tuples(
    st.integers(0, 4),  # day
    st.integers(0, 23),  # hour
    st.sampled_from(["completed", "incomplete", "failed", "error", "queued", "interrupted"]),
    st.integers(-1, 30),  # previous response (index), -1: none
    st.sampled_from([None, "ana", "bo"]),  # end user (a conversation may have several)
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(event_spec, min_size=1, max_size=60),
    cuts=st.lists(st.integers(0, 90), max_size=6),
    late_price_at=st.one_of(st.none(), st.integers(0, 90)),
    compactions=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 6)), max_size=6),
    data=st.data(),
)
def test_incremental_runs_equal_a_full_rebuild(
    specs: list[tuple[int, int, str, int, str | None]],
    cuts: list[int],
    late_price_at: int | None,
    compactions: list[tuple[int, int]],
    data: st.DataObject,
) -> None:
    """Random event streams, rolled up by incremental runs at random points, with
    compactions of some days between them: every report query answers what it answers
    after a full rebuild, at every step, and once compacted the tables are the rebuild's.
    Late events, parents after their children, replays, pending rows written again (still
    pending, then final, with another model and tier), a late price."""
    order = data.draw(st.permutations(range(len(specs))))
    check_incremental_equals_full(specs, cuts, late_price_at, order, compactions)


def test_a_conversation_stream_hypothesis_once_broke() -> None:
    """Found by the test above against the day-recompute job: incremental runs counted
    three responses in resp_0's conversation where a full rebuild counted one."""
    specs = [
        (0, 0, "completed", 19),
        (0, 0, "completed", 5),
        (0, 0, "completed", 2),
        (0, 14, "completed", 5),
        (0, 0, "completed", 1),
        (0, 16, "completed", 1),
        (0, 0, "completed", 22),
        (0, 0, "completed", 16),
        (0, 22, "completed", 15),
        (0, 22, "completed", 15),
        (0, 0, "completed", 28),
        *[(0, 0, "completed", 0)] * 17,
        (0, 0, "completed", 24),
        (0, 0, "completed", 0),
        (0, 0, "completed", 0),
    ]
    order = [25, 16, 6, 28, 18, 0, 13, 7, 29, 5, 4, 30, 17, 2, 23, 12, 3, 11, 9, 10, 27]
    order += [15, 14, 26, 21, 22, 20, 8, 1, 19, 24]
    check_incremental_equals_full(
        [(*spec, "user-0") for spec in specs], cuts=[21], late_price_at=None, order=order
    )


def check_incremental_equals_full(
    specs: list[tuple[int, int, str, int, str | None]],
    cuts: list[int],
    late_price_at: int | None,
    order: list[int],
    compactions: list[tuple[int, int]] = (),  # type: ignore[assignment]
) -> None:
    """`compactions`: after the run at cut k, fold the days with more than `max_parts`
    parts or before day `before` (pairs (max_parts, before), taken in turn)."""
    folds = list(compactions)
    with tempfile.TemporaryDirectory() as directory:
        warehouse = Warehouse(Path(directory))
        try:
            events = []
            for i, (day, hour, status, previous, user) in enumerate(specs):
                fields = status_fields(i, status, user)
                if 0 <= previous < i:  # a previous response is an earlier one
                    fields["previous_response_id"] = f"resp_{previous}"
                events.append(make_event(i, day, hour, **fields))
            # ...but it may reach the warehouse after its successors.
            events = [events[k] for k in order]
            # Pending responses written again: still pending with some usage, then final
            # (another model and tier for some), hours later.
            pending = [i for i, spec in enumerate(specs) if spec[2] in ("queued", "interrupted")]
            progress = [
                make_event(i, specs[i][0], specs[i][1], kind="update", status="in_progress")
                for i in pending
                if i % 2 == 0
            ]
            completions = [
                make_event(
                    i,
                    specs[i][0],
                    specs[i][1],
                    kind="update",
                    status="completed",
                    model=MODELS[(i + 1) % len(MODELS)] if i % 3 == 0 else MODELS[i % len(MODELS)],
                    service_tier="flex" if i % 3 == 1 else "default",
                )
                for i in pending
            ]
            stream: list[UsageEvent | str] = [
                *events,
                *progress,
                *events[: len(events) // 3],
                *completions,
            ]
            if late_price_at is not None:
                stream.insert(min(late_price_at, len(stream)), "price")
            boundaries = sorted({min(c, len(stream)) for c in cuts} | {len(stream)})
            start = 0
            for end in boundaries:
                for item in stream[start:end]:
                    if item == "price":
                        insert_rows(
                            warehouse.conn,
                            [
                                PriceRow(
                                    "mystery-model",
                                    "default",
                                    DAY0 + timedelta(days=1),
                                    None,
                                    {
                                        "input_per_mtok": Decimal("3"),
                                        "output_per_mtok": Decimal("12"),
                                    },
                                    "late",
                                    100,
                                )
                            ],
                        )
                    else:
                        assert isinstance(item, UsageEvent)
                        warehouse.ingest([item])
                result = warehouse.job.run()
                assert result.error is None, result.error
                if folds:
                    max_parts, before = folds.pop(0)
                    # Between runs, the reports answer the same with parts or without.
                    answered = warehouse.answers()
                    folded = warehouse.job.compact(
                        max_parts=max_parts, older_than=DAY0 + timedelta(days=before)
                    )
                    assert folded.error is None, folded.error
                    assert warehouse.answers() == answered
                start = end
            answered = warehouse.answers()  # with every part still apart
            incremental = warehouse.snapshot()  # compacted
            assert warehouse.answers() == answered
            again = warehouse.job.run()
            assert again.error is None and again.days == 0  # nothing changed: nothing to do
            assert warehouse.snapshot() == incremental
            full = warehouse.job.run(full=True)
            assert full.error is None, full.error
            assert warehouse.snapshot() == incremental
            assert warehouse.answers() == answered
        finally:
            warehouse.close()


def test_conversations_follow_late_parents_and_new_roots(tmp_path: Path) -> None:
    """The conversation paths of an incremental run, step by step, each checked against
    a full rebuild: parents arriving after their children (a conversation merged into an
    older one), a stored response becoming the root of a new conversation, a pending
    response written again after its conversation moved, and a user that cannot be told
    from the stored sums (a response named earlier than the stored one)."""
    warehouse = Warehouse(tmp_path)

    def event(i: int, hour: int, previous: int | None = None, **fields: Any) -> UsageEvent:
        if previous is not None:
            fields["previous_response_id"] = f"resp_{previous}"
        return make_event(i, 1, hour, **fields)

    steps: list[list[UsageEvent]] = [
        # A conversation whose root has not arrived; a lone response; a conversation
        # named late; a pending response in a conversation whose root is missing.
        [
            event(2, 2, 1),
            event(3, 3, 2),
            event(10, 1),
            event(20, 1, user_id=None),
            event(21, 5, 20, user_id="bo"),
            event(31, 6, 30, status="queued", input_tokens=None, output_tokens=None),
        ],
        # The missing parents arrive, with parents of their own; the lone response gets a
        # follower; a response named before the stored one joins.
        [
            event(1, 1, 0),
            event(11, 2, 10),
            event(22, 3, 20, user_id="ana"),
            event(30, 5, 29),
        ],
        # The first responses arrive; the pending one completes.
        [
            event(0, 0),
            event(29, 4, user_id=None),
            event(31, 6, 30, kind="update", status="completed", model="o4-mini"),
        ],
    ]
    try:
        for step in steps:
            warehouse.ingest(step)
            assert warehouse.job.run().error is None
        incremental = warehouse.snapshot()
        assert warehouse.job.run(full=True).error is None
        assert warehouse.snapshot() == incremental
        conversations = {
            row[0]: (row[1], row[2])
            for row in warehouse.conn.execute(
                "SELECT root_id, user_id, responses FROM conversations"
            ).fetchall()
        }
        assert conversations == {
            "resp_0": ("user-0", 4),
            "resp_10": ("user-0", 2),
            "resp_20": ("ana", 3),
            "resp_29": ("user-0", 3),
        }
    finally:
        warehouse.close()


def test_a_warehouse_rolled_up_before_rollup_pending_rebuilds_in_full(tmp_path: Path) -> None:
    """Migration 0003 on a warehouse the job already ran on: the next run is full (pending
    events were counted before `rollup_pending` kept them)."""
    conn = open_warehouse(tmp_path / "old.duckdb")
    conn.execute("DROP TABLE rollup_pending")
    conn.execute("DELETE FROM schema_migrations WHERE version = 3")
    conn.execute(
        """INSERT INTO job_runs (job, mode, started_at, finished_at, watermark, price_mark)
           VALUES ('rollup', 'incremental', now(), now(), 0, 0)"""
    )
    assert migrate(conn) == [3]
    result = RollupJob(conn.cursor, RollupConfig()).run()
    assert result.mode == "full" and result.error is None
    conn.close()


def test_rollup_sums_equal_raw_sums(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path)
    try:
        warehouse.ingest([make_event(i, i % 4, i % 24) for i in range(500)])
        assert warehouse.job.run().error is None
        raw = query_frame(warehouse.conn, "SELECT * FROM usage_events")
        prices = price_table(warehouse.conn)
        priced = price_events(
            raw.with_columns(pl.lit(None, pl.List(pl.String)).alias("tag_values")).lazy(),
            model_map(raw["model"].to_list(), prices["model"].to_list()).lazy(),
            effective_intervals(prices).lazy(),
            "gpt-image-1",
        ).collect()
        expected_cost = int(priced["cost_pico"].drop_nulls().sum())
        sums = query_frame(
            warehouse.conn,
            """SELECT (SELECT sum(cost_pico) FROM usage_hourly) AS hourly,
                      (SELECT sum(cost_pico) FROM usage_daily) AS daily,
                      (SELECT sum(cost_pico) FROM usage_daily_tags WHERE tag_key = 'team') AS team,
                      (SELECT sum(input_tokens) FROM usage_daily) AS input,
                      (SELECT sum(unpriced) FROM usage_daily) AS unpriced,
                      (SELECT sum(requests) FROM usage_daily) AS requests""",
        ).row(0, named=True)
        assert sums["hourly"] == sums["daily"] == sums["team"] == Decimal(expected_cost)
        assert sums["input"] == raw["input_tokens"].sum()
        assert sums["requests"] == 500
        # Unpriced, counted, never priced at 0: the model with no price (every fourth event),
        # and o4-mini on the flex tier, which has no flex price here.
        o4_mini_flex = sum(1 for i in range(500) if i % 4 == 2 and i % 7 == 0)
        assert sums["unpriced"] == 125 + o4_mini_flex
    finally:
        warehouse.close()


def test_late_price_reprices_what_it_covers_and_nothing_else(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path)
    try:
        warehouse.ingest(
            [
                make_event(i, i % 4, 1, model="mystery-model", service_tier="default")
                for i in range(40)
            ]
        )
        assert warehouse.job.run().error is None

        def by_day() -> dict[datetime, tuple[int, Decimal]]:
            frame = query_frame(
                warehouse.conn,
                "SELECT bucket, sum(unpriced) u, sum(cost_pico) c FROM usage_daily GROUP BY 1",
            )
            return {r[0]: (int(r[1]), r[2]) for r in frame.rows()}

        before = by_day()
        assert all(unpriced == 10 and cost == 0 for unpriced, cost in before.values())
        # The model's price arrives late, effective from day 2 on.
        insert_rows(
            warehouse.conn,
            [
                PriceRow(
                    "mystery-model",
                    "default",
                    DAY0 + timedelta(days=2),
                    None,
                    {"input_per_mtok": Decimal("1"), "output_per_mtok": Decimal("2")},
                    "late",
                    100,
                )
            ],
        )
        result = warehouse.job.run()
        assert result.error is None and result.days == 2
        after = by_day()
        for day, (unpriced, cost) in after.items():
            if day < DAY0 + timedelta(days=2):
                assert (unpriced, cost) == before[day]  # costs already incurred stay as they were
            else:
                assert unpriced == 0 and cost > 0
    finally:
        warehouse.close()


def test_prices_added_at_once_commit_in_the_order_of_their_ids(tmp_path: Path) -> None:
    # The job takes the prices above the highest id it has seen as new: a price whose
    # lower id committed after a higher one would never re-price what it covers. While
    # one writer holds its price uncommitted, another waits.
    conn = open_warehouse(tmp_path / "w.duckdb")
    first, second, observer = conn.cursor(), conn.cursor(), conn.cursor()
    holding, release = threading.Event(), threading.Event()
    catalog = CatalogCache()  # the process's one: the API adds prices through it

    def price(model: str) -> list[PriceRow]:
        rates = {"input_per_mtok": Decimal("1"), "output_per_mtok": Decimal("2")}
        return [PriceRow(model, "default", DAY0, None, rates, "api:test", 100)]

    def slow() -> None:
        with catalog.adding(first):
            insert_rows(first, price("model-a"))
            holding.set()
            release.wait(30)

    def fast() -> None:
        with catalog.adding(second):
            insert_rows(second, price("model-b"))

    a = threading.Thread(target=slow)
    a.start()
    try:
        assert holding.wait(30)
        b = threading.Thread(target=fast)
        b.start()
        b.join(0.5)
        assert b.is_alive(), "the second writer did not wait"
        assert observer.execute("SELECT count(*) FROM prices").fetchall() == [(0,)]
    finally:
        release.set()
        a.join(30)
    b.join(30)
    rows = observer.execute("SELECT model, price_id FROM prices ORDER BY price_id").fetchall()
    assert [model for model, _ in rows] == ["model-a", "model-b"]
    for cursor in (first, second, observer):
        cursor.close()
    conn.close()


def test_server_runs_the_job_and_records_it(make_tokentill: Callable[..., Running]) -> None:
    tokentill = make_tokentill(rollup_interval=0.3)
    client = tokentill.client()
    first = client.responses.create(
        model="gpt-4o", input="hi", user="ana", metadata={"team": "search"}
    )
    client.responses.create(model="gpt-4o", input="more", user="ana", previous_response_id=first.id)

    def rolled_up() -> bool:
        runs = httpx.get(tokentill.url + "/api/jobs").json()
        newest = max(run["watermark"] or 0 for run in runs) if runs else 0
        return newest >= max(row["ingest_seq"] for row in tokentill.rows())

    # Each run is recorded, and a run soon covers everything written.
    tokentill.wait_for(rolled_up, 20)
    runs = httpx.get(tokentill.url + "/api/jobs").json()
    assert runs[-1]["mode"] == "full"  # the very first run has nothing to be incremental from
    assert all(run["error"] is None for run in runs if run["finished_at"])
    with duckdb.connect(str(tokentill.db)) as conn:
        daily = conn.execute(
            "SELECT sum(requests), sum(cost_pico) FROM usage_daily WHERE user_id = 'ana'"
        ).fetchall()
        conversation = conn.execute("SELECT root_id, responses FROM conversations").fetchall()
    assert daily[0][0] == 2 and daily[0][1] > 0
    assert conversation == [(first.id, 2)]
    ran = httpx.post(tokentill.url + "/api/jobs/rollup/run", params={"full": "true"}, timeout=60)
    assert ran.status_code == 200 and ran.json()["mode"] == "full"
    assert ran.json()["error"] is None


def test_admin_token_guards_the_api(make_tokentill: Callable[..., Running]) -> None:
    tokentill = make_tokentill(admin_token="s3cret-token-for-tests")
    assert httpx.get(tokentill.url + "/api/jobs").status_code == 401
    wrong = httpx.get(tokentill.url + "/api/jobs", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "detail" in wrong.json()
    good = httpx.get(
        tokentill.url + "/api/jobs", headers={"Authorization": "Bearer s3cret-token-for-tests"}
    )
    assert good.status_code == 200


def test_cli_rollup_alone_and_through_the_server(
    tmp_path: Path, make_tokentill: Callable[..., Running]
) -> None:
    db = tmp_path / "cli.duckdb"
    conn = open_warehouse(db)
    conn.close()
    alone = subprocess.run(
        [sys.executable, "-m", "tokentill", "rollup", "--db", str(db), "--full"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert alone.returncode == 0, alone.stderr
    assert "rollup (full)" in alone.stdout

    tokentill = make_tokentill(db=tmp_path / "served.duckdb", rollup_interval=3600)
    tokentill.client().responses.create(model="gpt-4o", input="hi", user="cli")
    tokentill.flush()
    port = tokentill.url.rsplit(":", 1)[1]
    through = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokentill",
            "rollup",
            "--db",
            str(tokentill.db),
            "--port",
            port,
            "--full",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    # The server (in this test's process) holds the file: the CLI must go through its API.
    assert through.returncode == 0, through.stdout + through.stderr
    assert "held by the running server" in through.stdout
    assert '"mode": "full"' in through.stdout and '"rows_in": 1' in through.stdout


@pytest.mark.parametrize("read_rows", [1, 24, 36])
def test_reading_days_together_or_apart_gives_the_same_rollups(
    tmp_path: Path, read_rows: int
) -> None:
    # A rebuild reads runs of consecutive days of up to `read_rows` events at once and
    # rolls each day up on its own. Days 0-2 and 5-6 (a gap), 12 events a day, two of
    # them at exactly midnight: 1 reads a day at a time, 24 reads [0, 1], [2], [5, 6]
    # (a run split at the limit), 36 reads [0, 1, 2], [5, 6].
    midnight = {1: DAY0 + timedelta(days=1), 2: DAY0 + timedelta(days=2)}
    events = []
    for day in (0, 1, 2, 5, 6):
        for i in range(day * 12, day * 12 + 12):
            event = make_event(i, day, i % 24)
            if day in midnight and i % 12 == 0:
                at = int(midnight[day].timestamp() * 1_000_000)
                event = make_event(i, day, 0, created_at_us=at, request_started_at_us=at)
            events.append(event)
    warehouse = Warehouse(tmp_path)
    try:
        warehouse.ingest(events)
        keys = ("team", "customer")
        every_run = RollupConfig(tag_keys=keys, read_rows=10**9)  # each run of days at once
        assert RollupJob(warehouse.readers.cursor, every_run).run(full=True).error is None
        together = warehouse.snapshot()
        per_day: dict[datetime, int] = {}
        for row in together["usage_daily"]:
            per_day[row[0]] = per_day.get(row[0], 0) + row[6]
        # Each midnight event is counted on the day it opens, once.
        assert list(per_day.values()) == [12] * 5
        apart = RollupConfig(tag_keys=keys, read_rows=read_rows)
        assert RollupJob(warehouse.readers.cursor, apart).run(full=True).error is None
        assert warehouse.snapshot() == together
    finally:
        warehouse.close()


def before_each_day(monkeypatch: pytest.MonkeyPatch, hook: Callable[[int], None]) -> list[int]:
    """Call `hook(n)` before the job rolls up its n-th day (1, 2...): where a fault or a
    slow disk is injected. Returns the days counted."""
    calls: list[int] = []
    roll_day = rollup_rebuild._roll_day

    def wrapped(*args: Any) -> Any:
        calls.append(1)
        hook(len(calls))
        return roll_day(*args)

    monkeypatch.setattr(rollup_rebuild, "_roll_day", wrapped)
    return calls


def fail_on_second_day(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rollup of the second day fails (a full disk, say)."""

    def fail(n: int) -> None:
        if n == 2:
            raise RuntimeError("disk full")

    return before_each_day(monkeypatch, fail)


def test_a_full_rebuild_that_fails_part_way_is_finished_by_the_next_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rebuild reads a few days at a time and commits every so many rows: here it
    # reads one day at a time and commits after each.
    day_by_day = RollupConfig(tag_keys=("team", "customer"), read_rows=1, batch_rows=1)
    warehouse = Warehouse(tmp_path)
    try:
        warehouse.ingest([make_event(i, i % 4, i % 24) for i in range(200)])
        assert warehouse.job.run().error is None
        before = warehouse.snapshot()
        calls = fail_on_second_day(monkeypatch)
        failed = RollupJob(warehouse.readers.cursor, day_by_day).run(full=True)
        assert failed.error == "RuntimeError: disk full" and len(calls) == 2
        monkeypatch.undo()
        # The first day was rebuilt and committed, the rest not: incomplete tables...
        half = warehouse.snapshot()
        assert half != before
        assert 0 < sum(row[6] for row in half["usage_daily"]) < 200
        # ...so the next run, although asked for an incremental one, rebuilds in full.
        repaired = warehouse.job.run()
        assert repaired.mode == "full" and repaired.error is None
        assert warehouse.snapshot() == before
    finally:
        warehouse.close()


@settings(max_examples=50, deadline=None)
@given(
    parents=st.lists(st.integers(-1, 40), min_size=1, max_size=40),
    known_cut=st.integers(0, 40),
)
def test_conversation_roots_are_the_same_on_hashes_and_on_ids(
    parents: list[int], known_cut: int
) -> None:
    """Links are computed on 64-bit hashes of the ids (unless two ids share one): the
    result is the one the ids themselves give, in a full pass and an incremental one."""
    pairs = pl.DataFrame(
        {
            "response_id": [f"resp_{i}" for i, p in enumerate(parents) if 0 <= p != i],
            "previous_response_id": [f"resp_{p}" for i, p in enumerate(parents) if 0 <= p != i],
        },
        schema={"response_id": pl.String, "previous_response_id": pl.String},
    )
    none = pl.DataFrame(schema={"response_id": pl.String, "root_id": pl.String, "depth": pl.Int32})
    early, late = pairs.head(known_cut), pairs.slice(known_cut)
    results = []
    for distinct in (True, False):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(rollups, "hashes_distinct", lambda ids, distinct=distinct: distinct)
            known = rollups.link_roots(none, early)
            changes = rollups.link_roots(known, late)
            after = pl.concat([known, changes]).unique("response_id", keep="last")
            results.append((rollups.link_roots(none, pairs).sort("response_id"), after))
    (full_hashed, incremental_hashed), (full_ids, incremental_ids) = results
    assert full_hashed.equals(full_ids)
    assert incremental_hashed.sort("response_id").equals(incremental_ids.sort("response_id"))
    # Every root has no parent of its own, and depth counts the hops to it; with no
    # cycle (ids cannot form one: a response continues an earlier one), links added a
    # part at a time equal links made at once.
    parent_of = dict(zip(pairs["response_id"], pairs["previous_response_id"], strict=True))
    cycle = False
    for response, root, depth in full_ids.iter_rows():
        hops, at = 0, response
        while at in parent_of and hops <= len(parents):
            at, hops = parent_of[at], hops + 1
        cycle |= hops > len(parents)
        assert (root, depth) == (at, hops) or cycle
    if not cycle:
        assert incremental_ids.sort("response_id").equals(full_ids)


def test_a_run_times_its_steps_by_reading_computing_and_writing(tmp_path: Path) -> None:
    """The job times itself (no wrapping of its methods): every step's seconds split
    into read, compute, write and other, exclusive, adding up to at most the run's."""
    warehouse = Warehouse(tmp_path)
    try:
        warehouse.ingest([make_event(i, i % 3, i % 24) for i in range(120)])
        full = warehouse.job.run(full=True)
        assert full.error is None and full.recomputed == []
        for label in ("rebuild/read", "rebuild/compute", "rebuild/write", "conversations/read"):
            assert full.phases[label] > 0, label
        assert 0 < sum(full.phases.values()) <= full.seconds
        warehouse.ingest([make_event(i, 1, 5) for i in range(1000, 1010)])
        incremental = warehouse.job.run()
        assert incremental.mode == "incremental"
        assert {"changed/read", "append_usage/compute", "append_usage/write"} <= set(
            incremental.phases
        )
        assert not any(label.startswith("rebuild/") for label in incremental.phases)
        by_kind = shares(incremental.phases)
        assert by_kind["read"] > 0 and by_kind["compute"] > 0 and by_kind["write"] > 0
        assert sum(by_kind.values()) == pytest.approx(sum(incremental.phases.values()))
    finally:
        warehouse.close()


def test_phases_count_nested_time_once() -> None:
    phases = Phases()
    with phases.step("outer"):
        with phases.kind("read"), phases.kind("compute"):  # a kind inside a kind: read
            time.sleep(0.002)
        with phases.step("inner"), phases.kind("write"):
            time.sleep(0.002)
    seconds = phases.finish()
    assert set(seconds) >= {"outer/read", "inner/write", "outer/other", "inner/other"}
    assert "outer/compute" not in seconds and "outer/write" not in seconds
    assert seconds["outer/read"] >= 0.002 and seconds["inner/write"] >= 0.002


def test_stop_waits_for_a_run_someone_else_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown stops a run the API started (in a thread of its own) before the warehouse
    closes under it: the run ends after its current day, recorded as failed, and the next
    start finishes the rebuild."""
    warehouse = Warehouse(tmp_path)
    try:
        warehouse.ingest([make_event(i, i % 20, i % 24) for i in range(400)])
        days = before_each_day(monkeypatch, lambda _: time.sleep(0.05))  # a slow disk
        job = RollupJob(warehouse.readers.cursor, RollupConfig(read_rows=1, batch_rows=1))
        results: list[Any] = []
        runner = threading.Thread(target=lambda: results.append(job.run(full=True)))
        runner.start()
        while not days:
            time.sleep(0.005)
        assert job.stop(timeout=10)
        assert not runner.is_alive() or (runner.join(1) or not runner.is_alive())
        (result,) = results
        assert result.error is not None and result.error.startswith("JobCancelledError")
        assert 0 < len(days) < 20
        assert job.run().error is not None  # a stopped job runs no more
        monkeypatch.undo()
        assert warehouse.job.run().mode == "full"  # the next start rebuilds in full
    finally:
        warehouse.close()


def test_closing_the_warehouse_interrupts_a_query_still_running(tmp_path: Path) -> None:
    """A request's thread cut off by the shutdown may still be querying when the
    warehouse closes: its query is interrupted (an error in that thread), never a crash
    of the process."""
    storage = DuckDBFile(tmp_path / "w.duckdb")
    session = storage.session()
    errors: list[BaseException] = []

    def long_query() -> None:
        try:
            session.execute("SELECT count(*) FROM range(20_000_000_000) AS t(i) WHERE i % 7 = 3")
        except BaseException as exc:  # the thread reports whatever it got
            errors.append(exc)

    worker = threading.Thread(target=long_query)
    worker.start()
    time.sleep(0.3)  # the query is running
    storage.close()
    worker.join(30)
    assert not worker.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], duckdb.Error)


def test_incremental_runs_append_parts_and_compaction_folds_them(tmp_path: Path) -> None:
    """An incremental run rewrites no stored usage row: it appends its partial sums (a key
    may then have several rows) and lists them in `rollup_parts`; compaction folds a day
    into one row per key, once it has more than `max_parts` parts or is old enough, and
    `job_runs` records what each run did."""
    warehouse = Warehouse(tmp_path)
    try:
        warehouse.ingest([make_event(i, i % 2, 3, user_id="ana") for i in range(40)])
        assert warehouse.job.run().mode == "full"
        conn = warehouse.readers
        for batch in range(3):  # three more runs, each adding to day 1's same hour and user
            warehouse.ingest(
                [make_event(100 + 10 * batch + i, 1, 3, user_id="ana") for i in range(5)]
            )
            ran = warehouse.job.run()
            assert ran.mode == "incremental" and ran.parts_written > 0
        parts = conn.execute("SELECT day, count(*) FROM rollup_parts GROUP BY day").fetchall()
        assert [(str(d), n) for d, n in parts] == [("2026-05-02", 3)]
        duplicated = conn.execute(
            """SELECT count(*) FROM (SELECT bucket, user_id, model, service_tier, status,
               endpoint FROM usage_hourly GROUP BY ALL HAVING count(*) > 1)"""
        ).fetchone()
        assert duplicated is not None and duplicated[0] > 0  # parts, not rewritten rows
        before = warehouse.answers()

        # Three parts are not more than 3: nothing to do; more than 2: folded.
        assert warehouse.job.compact(max_parts=3, older_than=DAY0).days == 0
        folded = warehouse.job.compact(max_parts=2, older_than=DAY0)
        assert (folded.error, folded.days, folded.parts_compacted) == (None, 1, 3)
        assert conn.execute("SELECT count(*) FROM rollup_parts").fetchone() == (0,)
        assert warehouse.answers() == before
        compacted = warehouse.snapshot(compact=False)  # one row per key (it checks)
        recorded = conn.execute(
            """SELECT job, parts_written, parts_compacted, phases FROM job_runs
               ORDER BY run_id DESC LIMIT 2"""
        ).fetchall()
        assert [r[:3] for r in recorded] == [("compact", 0, 3), ("compact", 0, 0)]
        assert "compact/write" in orjson.loads(recorded[0][3])
        assert warehouse.job.run(full=True).error is None
        assert warehouse.snapshot(compact=False) == compacted  # the rebuild's tables
    finally:
        warehouse.close()
