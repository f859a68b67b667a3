"""Billing sinks: the worker's job that pushes metered usage to billing systems.

Each configured sink (`TOKENTILL_BILLING_SINKS`) is a job of its own on the schedule,
run by the one active worker, never on the proxy's path: a sink that fails only falls
behind. A run reads the events committed after the sink's mark a page at a time
(`warehouse/billing_usage.py`), sends each page's records (`billing_targets.py`), then
moves the mark past the page, in one transaction with the events the receiver rejected.

Exactly once: the mark moves only after the receiver answered for the whole page, so
nothing is skipped; a page sent and then lost to a crash before its mark moved is sent
again under the same ids, which the receiver already holds (OpenMeter deduplicates on
the CloudEvent's source and id, Stripe on the identifier), so nothing is counted twice.

A failed run is retried after the interval, then twice that, up to five minutes. The
sink's lag (the age of the oldest event it has not passed) is in /metrics and the
freshness report; past the sink's `lag_alert` a warning alert is raised, once per time
it falls behind.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import duckdb
import polars as pl
from prometheus_client import CollectorRegistry, Counter, Gauge

from tokentill.billing_targets import SinkUnavailableError, Target
from tokentill.settings import BillingSink
from tokentill.warehouse.alerts import Alert
from tokentill.warehouse.billing_usage import (
    Mark,
    Reject,
    behind,
    note_error,
    read_mark,
    read_page,
    save_mark,
    sink_records,
)
from tokentill.warehouse.db import newest_seq
from tokentill.warehouse.prices import Catalog, CatalogCache

log = logging.getLogger(__name__)

MAX_BACKOFF = 300.0
_MARKS = threading.Lock()


@dataclass
class SinkRun:
    """What one run did (tests and logs read it)."""

    sink: str
    delivered: int = 0
    skipped: int = 0
    rejected: int = 0
    pages: int = 0
    caught_up: bool = False
    lag_seconds: float = 0.0
    error: str | None = None


class SinkMetrics:
    """The sinks' figures in /metrics, labelled by sink."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lag = Gauge(
            "tokentill_billing_sink_lag_seconds",
            "Age of the oldest event a billing sink has not passed yet (0: caught up).",
            ["sink"],
            registry=registry,
        )
        self.backlog = Gauge(
            "tokentill_billing_sink_backlog",
            "Events committed after a billing sink's mark.",
            ["sink"],
            registry=registry,
        )
        self.sent = Counter(
            "tokentill_billing_sink_events",
            "Billable events a billing sink dealt with, by outcome "
            "(delivered, skipped: not its subject, rejected: refused by the receiver).",
            ["sink", "outcome"],
            registry=registry,
        )
        self.failures = Counter(
            "tokentill_billing_sink_failures",
            "Runs of a billing sink that stopped short (the receiver could not take events).",
            ["sink"],
            registry=registry,
        )


class BillingSinkJob:
    def __init__(
        self,
        sink: BillingSink,
        target: Target,
        connect: Callable[[], duckdb.DuckDBPyConnection],
        catalog: CatalogCache,
        *,
        image_model: str,
        alert: Callable[[list[Alert]], object],
        metrics: SinkMetrics,
        interval: float,
        page_rows: int = 2000,
        run_seconds: float = 5.0,
        leads: Callable[[], bool] | None = None,
    ) -> None:
        self.sink = sink
        self._target = target
        self._connect = connect
        self._catalog = catalog
        self._image_model = image_model
        self._alert = alert
        self._metrics = metrics
        self._interval = interval
        self._page_rows = page_rows
        # A run yields after this long (the next one goes on): shutdown never waits long.
        self._run_seconds = run_seconds
        self._failures = 0
        self._retry_at = 0.0
        self._stopping = threading.Event()
        self._leads = leads  # a lake's: whether this worker is still the active one

    def cancel(self) -> None:
        """Stop after the page being sent (shutdown)."""
        self._stopping.set()

    def close(self) -> None:
        self._target.close()

    def run(self) -> SinkRun | None:
        """One run (None: still backing off after a failure)."""
        if time.monotonic() < self._retry_at:
            return None
        conn = self._connect()
        try:
            done = self._run(conn)
        finally:
            conn.close()
        name = self.sink.name
        self._metrics.lag.labels(name).set(done.lag_seconds)
        for outcome in ("delivered", "skipped", "rejected"):
            self._metrics.sent.labels(name, outcome).inc(getattr(done, outcome))
        if done.error is None:
            self._failures = 0
            self._retry_at = 0.0
        else:
            self._failures += 1
            self._metrics.failures.labels(name).inc()
            wait = min(self._interval * 2 ** (self._failures - 1), MAX_BACKOFF)
            self._retry_at = time.monotonic() + wait
            log.warning("billing sink %s: %s (next try in %.0f s)", name, done.error, wait)
        return done

    def _run(self, conn: duckdb.DuckDBPyConnection) -> SinkRun:
        sink = self.sink
        done = SinkRun(sink.name)
        mark: Mark | None = None
        try:
            mark = read_mark(conn, sink.name)
            upto = newest_seq(conn)
            if mark is None:  # its first run: from the start, or from now
                now = datetime.now(UTC)
                mark = Mark(sink.name, 0 if sink.since is not None else upto, caught_up_at=now)
                self._save(conn, mark)
            prices = self._catalog.read(conn)  # one snapshot of the prices per run
            started = time.monotonic()
            # A worker that lost its lease to a standby stops at the next page.
            while not self._stopping.is_set() and (self._leads is None or self._leads()):
                page = read_page(conn, mark, upto, self._page_rows)
                if page.height == 0:
                    done.caught_up = True
                    mark = replace(mark, caught_up_at=datetime.now(UTC), last_error=None)
                    self._save(conn, mark)
                    break
                records, passed = self._records(page, prices)
                try:
                    rejects = (
                        self._target.deliver(records.to_dicts(), self._stopping)
                        if records.height
                        else []
                    )
                except SinkUnavailableError as exc:
                    # Keep what the receiver took before it failed: never resent, so a
                    # long outage of part of a page cannot outlast Stripe's 24 hours.
                    if 0 < exc.accepted < records.height:
                        taken = page.head(_position(page, records.row(exc.accepted, named=True)))
                        records, passed = self._records(taken, prices)
                        mark = self._moved(conn, mark, taken, records, passed, exc.rejects, done)
                    raise
                mark = self._moved(conn, mark, page, records, passed, rejects, done)
                if time.monotonic() - started > self._run_seconds:
                    break
        except SinkUnavailableError as exc:
            if not self._stopping.is_set():
                done.error = str(exc)
        except Exception as exc:  # the warehouse, a bug: say so, back off, keep the lag
            log.exception("billing sink %s failed", sink.name)
            done.error = f"{type(exc).__name__}: {exc}"
        if done.error is not None:
            # Only the error: the mark itself is never written from here (it may be older
            # than the one saved last, should that save have been followed by a failure).
            with contextlib.suppress(Exception), _MARKS:
                note_error(conn, sink.name, done.error[:1000])
        if mark is not None:
            with contextlib.suppress(Exception):
                late = behind(conn, mark)
                self._metrics.backlog.labels(sink.name).set(late.events)
                done.lag_seconds = late.lag_seconds(datetime.now(UTC))
            if done.lag_seconds > sink.lag_alert:
                self._say_behind(mark, done)
        return done

    def _save(
        self, conn: duckdb.DuckDBPyConnection, mark: Mark, rejects: list[Reject] | None = None
    ) -> None:
        # One sink's mark at a time: on a lake, two transactions writing `sink_marks` at
        # once conflict (DuckLake checks per table), and the loser's page would be sent
        # again. One process (the active worker) runs every sink.
        with _MARKS:
            save_mark(conn, mark, rejects or [])

    def _records(self, page: pl.DataFrame, prices: Catalog) -> tuple[pl.DataFrame, int]:
        sink = self.sink
        return sink_records(
            page,
            prices,
            image_model=self._image_model,
            subject=sink.subject,
            only=sink.only,
            since=sink.since,
        )

    def _moved(
        self,
        conn: duckdb.DuckDBPyConnection,
        mark: Mark,
        page: pl.DataFrame,
        records: pl.DataFrame,
        passed: int,
        rejects: list[Reject],
        done: SinkRun,
    ) -> Mark:
        """The mark past `page` (all of a page, or the part of one before the first record
        the receiver did not take), saved with the events set aside in it."""
        sent = records.height - len(rejects)
        moved = replace(
            mark.past(page),
            delivered=mark.delivered + sent,
            skipped=mark.skipped + passed,
            rejected=mark.rejected + len(rejects),
            last_error=None,
        )
        self._save(conn, moved, rejects)
        done.pages += 1
        done.delivered += sent
        done.skipped += passed
        done.rejected += len(rejects)
        if rejects:
            self._say_rejected(rejects)
        return moved

    def _raise(self, alerts: list[Alert]) -> None:
        try:
            self._alert(alerts)
        except Exception:  # an alert lost is logged; the sink's own work stands
            log.exception("billing sink %s: could not store its alert", self.sink.name)

    def _say_behind(self, mark: Mark, done: SinkRun) -> None:
        since = mark.caught_up_at.isoformat() if mark.caught_up_at else None
        self._raise(
            [
                Alert(
                    # One alert per time it falls behind: keyed by when it last caught up.
                    dedupe_key=f"billing_sink:{self.sink.name}:{since}",
                    kind="billing_sink",
                    rule="lag",
                    severity="warning",
                    message=(
                        f"billing sink {self.sink.name} is {done.lag_seconds:.0f} s behind "
                        f"(alert past {self.sink.lag_alert:.0f} s)"
                        + (f": {done.error}" if done.error else "")
                    ),
                    subject=f"sink:{self.sink.name}",
                    evidence={
                        "sink": self.sink.name,
                        "kind": self.sink.kind,
                        "lag_seconds": round(done.lag_seconds, 1),
                        "caught_up_at": since,
                        "last_error": done.error,
                    },
                )
            ]
        )

    def _say_rejected(self, rejects: list[Reject]) -> None:
        first = rejects[0]
        self._raise(
            [
                Alert(
                    dedupe_key=f"billing_sink_reject:{self.sink.name}:{first.event_id}",
                    kind="billing_sink",
                    rule="rejected",
                    severity="warning",
                    message=(
                        f"billing sink {self.sink.name}: the receiver refused "
                        f"{len(rejects)} events (set aside in sink_rejects): {first.reason}"
                    ),
                    subject=f"sink:{self.sink.name}",
                    evidence={
                        "sink": self.sink.name,
                        "events": [r.event_id for r in rejects[:20]],
                        "reasons": sorted({r.reason for r in rejects})[:5],
                    },
                )
            ]
        )


def _position(page: pl.DataFrame, record: dict[str, object]) -> int:
    """Where `record` sits in `page` (read in order): the rows before it are passed."""
    at = page.with_row_index("_at").filter(
        (pl.col("ingest_seq") == record["ingest_seq"]) & (pl.col("event_id") == record["event_id"])
    )
    return int(at["_at"][0])
