"""Quotas in the server: the book (warehouse/quota_book.py) with its limits loaded, its counters
seeded from the warehouse, its price snapshot kept fresh, and changes from the admin API
stored and applied.

Start: the journal is replayed into DuckDB first, then `boot_us` is taken; counters are
seeded with what the warehouse holds from before `boot_us` and count live from then on.
A limit set later (API) is applied first (live counting from that moment), then the
writer is flushed and the subject's counters are replaced by what the warehouse holds
from before that moment. Idle counters are dropped on the price refresh's schedule.
Threads: DuckDB reads run in worker threads; the book is only touched on the event loop.

Shared (a lake's instances, `redis_url`): the book keeps the policy, and its counters live
in Redis (warehouse/quota_shared.py). Nothing is seeded at start: a window's first
admission reads what the lake holds from before it opened. Every instance reloads the
limits when their version in Redis moves, and applies the blocks Redis holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import duckdb
from redis.exceptions import RedisError

from tokentill.warehouse.alerts import Alert, open_quota_alert_keys
from tokentill.warehouse.events import now_us
from tokentill.warehouse.live_prices import PriceBook
from tokentill.warehouse.prices import CatalogCache
from tokentill.warehouse.quota_book import QuotaBook, QuotaConfig, QuotaRequest, Reservation, Usage
from tokentill.warehouse.quota_rules import (
    PERIODS,
    UNITS,
    Limit,
    Period,
    Subject,
    tag_subject,
    user_subject,
    window,
)
from tokentill.warehouse.quota_shared import (
    NeedsSeedError,
    QuotaStoreUnavailableError,
    SharedCounters,
    Unseeded,
)
from tokentill.warehouse.quota_store import (
    StoredLimit,
    UsedBefore,
    load_limits,
    replace_limits,
    used_before,
)
from tokentill.warehouse.storage import StorageUnavailableError

log = logging.getLogger(__name__)


class HeldRequest(QuotaRequest, Protocol):
    """A request admission may hold a reservation on (`hold`, carried to its events)."""

    hold: Any


Scope = tuple[str, str, str]  # (scope, subject_key, subject_value) as stored


def scope_of(subject: Subject | None) -> Scope:
    if subject is None:
        return ("default", "", "")
    return (subject[0], subject[1], subject[2])


class QuotaService:
    def __init__(
        self,
        config: QuotaConfig,
        *,
        image_gen_model: str,
        block_seconds: int,
        price_refresh: float,
        connect: Callable[[], duckdb.DuckDBPyConnection],
        alert: Callable[[Alert], None],
        flush: Callable[[], bool],
        catalog: CatalogCache,
    ) -> None:
        self._image_gen_model = image_gen_model
        self._block_seconds = block_seconds
        self._price_refresh = price_refresh
        self._connect = connect
        self._flush = flush
        self._catalog = catalog
        self.book = QuotaBook(config, PriceBook({}, image_gen_model), alert)
        self.boot_us = 0
        self._price_mark: tuple[int, int] | None = None  # (rows, max price_id) last read
        self._lock = asyncio.Lock()  # one limit change (store + seed + apply) at a time
        self._tasks: set[asyncio.Task[None]] = set()
        self._warming: dict[Subject, asyncio.Future[None]] = {}  # spilled subjects being read back
        self.reseeds = 0
        self.shared: SharedCounters | None = None
        self._shared_options: SharedOptions | None = None
        self._seeding: dict[tuple[str, Unseeded], asyncio.Future[None]] = {}
        self._limits_version = -1
        self.unchecked = 0  # admitted unchecked while Redis was away (outage: serve)
        self.seeds = 0

    @property
    def limits_version(self) -> int:
        """The version of the shared limits this instance holds (-1: not read yet)."""
        return self._limits_version

    def share(self, counters: SharedCounters, options: SharedOptions) -> None:
        """Keep the counters in Redis (before `start`)."""
        self.shared = counters
        self._shared_options = options
        self.book.shared = counters

    # -- start ----------------------------------------------------------------------------

    def start(self) -> None:
        """At start, before the proxy serves (the warehouse holds every journaled event)."""
        self.boot_us = now_us()
        conn = self._connect()
        try:
            self.book.prices = self._price_book(conn)
            limits = _grouped(load_limits(conn))
            for subject, found in limits.items():
                self.book.set_limits(subject, found)
            if self.shared is None:
                for subject, found in limits.items():
                    self._apply(subject, self._read_seed(conn, subject, found, self.boot_us))
            self.book.note_fired(open_quota_alert_keys(conn))
        finally:
            conn.close()
        log.info(
            "quotas: %d subjects with limits, default: %s",
            len(limits),
            bool(self.book.default_limits),
        )

    def admit(
        self, facts: HeldRequest, parsed: dict[str, Any] | None, body: bytes
    ) -> Awaitable[None] | None:
        """The proxy's admission hook: in memory (None) for every subject whose counters
        are here; an awaitable when one of them was spilled and must be read back from
        the warehouse first (a worker thread does the read; the loop never waits), or
        when the counters are shared and the request is held to a limit."""
        if self.shared is not None:
            reservation = self.book.plan(facts, parsed, body)
            if not reservation.held:
                facts.hold = reservation  # no limits: counted nowhere, nothing to check
                return None
            return self._admit_shared(facts, reservation)
        if self._warming or self.book.has_spilled:
            subjects = self.book.subjects_of(facts, parsed)
            cold = [s for s in subjects if s in self._warming] + self.book.spilled(subjects)
            if cold:
                return self._admit_after_reading(cold, facts, parsed, body)
        facts.hold = self.book.admit(facts, parsed, body)
        return None

    async def _admit_after_reading(
        self,
        cold: list[Subject],
        facts: HeldRequest,
        parsed: dict[str, Any] | None,
        body: bytes,
    ) -> None:
        for subject in dict.fromkeys(cold):
            await self._read_back(subject)
        facts.hold = self.book.admit(facts, parsed, body)

    async def _admit_shared(self, facts: HeldRequest, reservation: Reservation) -> None:
        try:
            if not await self._opened(reservation):
                raise RuntimeError("quota windows kept changing while being read from the lake")
            facts.hold = reservation
        except (RedisError, StorageUnavailableError, duckdb.Error) as exc:
            # Redis away, or the lake a window is read from: the operator's choice.
            if not isinstance(exc, RedisError):
                log.warning("quota: a window could not be read from the lake: %s", exc)
            options = self._shared_options
            if options is None or options.outage == "refuse":
                raise QuotaStoreUnavailableError() from None
            # Served unchecked: still counted when Redis is back (its settlement waits).
            self.unchecked += 1
            reservation.held, reservation.key = (), ""
            facts.hold = reservation

    async def _opened(self, reservation: Reservation, *, probe: bool = False) -> bool:
        """Admit `reservation` (or with `probe`, only open its windows), reading from the
        lake the windows that need it first. False: they kept needing it (5 rounds)."""
        shared = self.shared
        assert shared is not None
        for _ in range(5):
            try:
                await shared.admit(reservation, probe=probe)
                return True
            except NeedsSeedError as needed:
                await self._seed(needed)
        return False

    async def _seed(self, needed: NeedsSeedError) -> None:
        """Read the windows' use from before they opened from the lake. Once per process
        (concurrent admissions of the same windows share the read), and once across
        processes (one claims a window in Redis; the others wait for it to be seeded):
        a subject's windows in one lake session, subjects at once."""
        mine: list[Unseeded] = []
        waits: list[asyncio.Future[None]] = []
        for found in needed.windows:
            pending = self._seeding.get((needed.gen, found))
            if pending is not None:
                waits.append(pending)
            else:
                mine.append(found)
                future = asyncio.get_running_loop().create_future()
                self._seeding[(needed.gen, found)] = future
        try:
            by_subject: dict[Subject, list[Unseeded]] = {}
            for found in mine:
                by_subject.setdefault(found.subject, []).append(found)
            await asyncio.gather(
                *(self._seed_subject(needed.gen, found) for found in by_subject.values())
            )
        finally:
            for found in mine:
                done = self._seeding.pop((needed.gen, found))
                done.set_result(None)
        for pending in waits:
            await asyncio.shield(pending)

    async def _seed_subject(self, gen: str, windows: list[Unseeded]) -> None:
        shared, options = self.shared, self._shared_options
        assert shared is not None and options is not None
        claimed = [found for found in windows if await shared.claim_seed(gen, found)]
        if claimed:
            since = max(found.since for found in claimed)
            deadline = time.monotonic() + options.seed_wait
            while not await shared.writers_past(since):
                if time.monotonic() > deadline:
                    log.warning(
                        "quota seed of %s: a proxy's writer has not committed past the "
                        "window's opening after %.0f s (the lake away?); its use may be "
                        "undercounted",
                        claimed[0].subject,
                        options.seed_wait,
                    )
                    break
                await asyncio.sleep(0.02)
            try:
                used = await asyncio.to_thread(self._read_windows, claimed)
                for found, usage in zip(claimed, used, strict=True):
                    await shared.seed(gen, found, usage)
            except BaseException:
                for found in claimed:
                    with contextlib.suppress(RedisError):
                        await shared.unclaim_seed(gen, found)
                raise
            self.seeds += len(claimed)
        # Those another process claimed: its seed lands shortly (or its claim lapses).
        for found in windows:
            if found not in claimed:
                await shared.wait_seeded(gen, found, options.seed_wait + 30)

    def _read_windows(self, windows: list[Unseeded]) -> list[Usage]:
        conn = self._connect()
        try:
            return [self._read_window(conn, found) for found in windows]
        finally:
            conn.close()

    def _read_window(self, conn: duckdb.DuckDBPyConnection, found: Unseeded) -> Usage:
        common: dict[str, Any] = {
            "recorded_before": datetime.fromtimestamp(found.since / 1e6, UTC),
            "window_start": datetime.fromtimestamp(found.window_start / 1e6, UTC),
            "image_model": self._image_gen_model,
            # A response settled after `since` (or still pending) is counted live when
            # its outcome is recorded: not here too.
            "settled": True,
        }
        rows = _used_of(conn, found.subject, **common)
        return _usage(rows[0]) if rows else Usage()

    async def current(self, subjects: Sequence[Subject]) -> None:
        """Read back any of `subjects` whose counters were spilled (before showing them);
        with shared counters, take a snapshot of each from Redis."""
        if self.shared is not None:
            await self._snapshot(subjects)
            return
        for subject in subjects:
            if subject in self._warming or self.book.spilled([subject]):
                await self._read_back(subject)

    async def _read_back(self, subject: Subject) -> None:
        """A spilled subject's counters again: live from now, plus what the warehouse holds
        from before now (one read, shared by the requests that arrive meanwhile)."""
        pending = self._warming.get(subject)
        if pending is not None:
            await asyncio.shield(pending)
            return
        if not self.book.spilled([subject]):
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._warming[subject] = done
        try:
            before = self.book.revive(subject)
            limits, _ = self.book.limits_of(subject)
            seeds = await asyncio.to_thread(self._flush_and_read, subject, limits, before)
            self._apply(subject, seeds)
            self.reseeds += 1
        except Exception:
            # Its counters run live from now; what came before is not in them.
            log.exception("quota: reading %s back from the warehouse failed", subject)
        finally:
            done.set_result(None)
            del self._warming[subject]

    async def _snapshot(self, subjects: Sequence[Subject]) -> None:
        shared = self.shared
        assert shared is not None
        for subject in subjects:
            limits, _ = self.book.limits_of(subject)
            if not limits:
                continue
            probe = Reservation((subject,), (subject,), now_us(), 0, 0, False, False)
            await self._opened(probe, probe=True)  # shown as counted, if still unread
            self.book.show(subject, await shared.meter(subject, limits))

    def on_alert(self, alert: Alert) -> None:
        """A new alert (event loop): a critical abuse flag may block its user for a while
        (on every proxy, when the counters are shared)."""
        seconds = self._block_seconds
        if seconds and alert.kind == "abuse" and alert.severity == "critical" and alert.user_id:
            until = now_us() + seconds * 1_000_000
            self.book.block(alert.user_id, until)
            log.warning("user %r blocked for %d s: %s", alert.user_id, seconds, alert.message)
            if self.shared is not None:
                task = asyncio.get_running_loop().create_task(
                    self.shared.block(alert.user_id, until)
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def unblock(self, user_id: str) -> bool:
        """Lift a user's block (everywhere, when shared)."""
        lifted = self.book.unblock(user_id)
        if self.shared is not None:
            lifted = await self.shared.unblock(user_id) or lifted
        return lifted

    async def follow_forever(self, mark: Callable[[], int] | None) -> None:
        """Shared counters: publish this proxy's writer mark (`mark`), and follow the limits'
        version and the blocks in Redis, every `poll` seconds."""
        shared, options = self.shared, self._shared_options
        assert shared is not None and options is not None
        reload_every = max(1, int(30 / options.poll))
        rounds = 0
        while True:
            try:
                if mark is not None:
                    await shared.publish_mark(mark())
                version = await shared.limits_version()
                if version != self._limits_version or rounds % reload_every == 0:
                    await self._reload_limits()
                    self._limits_version = version
                self.book.replace_blocks(await shared.blocks())
                if rounds % reload_every == 0:
                    await shared.prune_blocks(now_us())
            except RedisError:
                pass  # counted and logged by the counters; tried again next round
            except Exception:
                log.exception("quota: following the shared limits failed")
            rounds += 1
            await asyncio.sleep(options.poll)

    async def _reload_limits(self) -> None:
        found = _grouped(await asyncio.to_thread(self._load_limits))
        for subject in [None, *self.book.subjects_with_limits()]:
            if subject not in found:
                self.book.set_limits(subject, ())
        for subject, value in found.items():
            self.book.set_limits(subject, value)

    def _load_limits(self) -> list[StoredLimit]:
        conn = self._connect()
        try:
            return load_limits(conn)
        finally:
            conn.close()

    async def refresh_forever(self) -> None:
        """Keep the price snapshot fresh; charge pending responses that never ended."""
        while True:
            await asyncio.sleep(self._price_refresh)
            try:
                fresh = await asyncio.to_thread(self._read_prices_if_changed)
                if fresh is not None:
                    self.book.prices = fresh
            except Exception:
                log.exception("quota price refresh failed; keeping the previous prices")
            expired = self.book.expire_parked()
            if expired:
                log.warning("%d pending responses never ended: charged their worst case", expired)
            self.book.evict_idle()

    # -- changes from the API -------------------------------------------------------------

    async def replace(self, subject: Subject | None, limits: Sequence[Limit]) -> bool:
        """Store and apply a subject's limits (None: the default). True if it had some."""
        async with self._lock:
            scope = scope_of(subject)
            rows: list[tuple[str, str, str, int]] = [
                (lim.unit, lim.period, lim.mode, lim.amount) for lim in limits
            ]
            had = await asyncio.to_thread(self._store, scope, rows)
            if self.shared is not None:
                # Every instance reloads the limits, and the subject's windows are read
                # from the lake again on their next admission.
                self.book.set_limits(subject, limits)
                await self.shared.forget(subject)
                return had
            # From this moment each of its settled events counts live; what was recorded
            # before comes from the warehouse, once the writer has it all.
            set_at = now_us()
            self.book.set_limits(subject, limits)
            if limits:
                self.book.reset_usage(subject)
                seeds = await asyncio.to_thread(self._flush_and_read, subject, limits, set_at)
                self._apply(subject, seeds)
            return had

    def _apply(
        self, subject: Subject | None, seeds: list[tuple[Period, int, list[tuple[Subject, Usage]]]]
    ) -> None:
        """Add seeds to the counters. The default's reach only the users it holds: one
        with limits of its own is seeded by its own."""
        for period, start, used in seeds:
            for key, usage in used:
                if subject is None and self.book.limits_of(key)[1] == "own":
                    continue
                self.book.seed(key, period, start, usage)

    # -- internals ------------------------------------------------------------------------

    def _store(self, scope: Scope, rows: list[tuple[str, str, str, int]]) -> bool:
        conn = self._connect()
        try:
            return replace_limits(conn, *scope, rows)
        finally:
            conn.close()

    def _flush_and_read(
        self, subject: Subject | None, limits: Sequence[Limit], before_us: int
    ) -> list[tuple[Period, int, list[tuple[Subject, Usage]]]]:
        if not self._flush():
            log.warning("quota seed: the writer did not catch up; usage may be undercounted")
        conn = self._connect()
        try:
            return self._read_seed(conn, subject, limits, before_us)
        finally:
            conn.close()

    def _read_seed(
        self,
        conn: duckdb.DuckDBPyConnection,
        subject: Subject | None,
        limits: Sequence[Limit],
        before_us: int,
    ) -> list[tuple[Period, int, list[tuple[Subject, Usage]]]]:
        """What the warehouse holds recorded before `before_us`, per period of `limits`
        (the default reads every user)."""
        out = []
        recorded_before = datetime.fromtimestamp(before_us / 1e6, UTC)
        for period in PERIODS:
            if not any(limit.period == period for limit in limits):
                continue
            start, _ = window(period, before_us)
            since = datetime.fromtimestamp(start / 1e6, UTC)
            common: dict[str, Any] = {
                "recorded_before": recorded_before,
                "window_start": since,
                "image_model": self._image_gen_model,
            }
            if subject is None:
                found = used_before(conn, users=None, **common)
                used = [(user_subject(u.subject_key), _usage(u)) for u in found]
            else:
                used = [(subject, _usage(u)) for u in _used_of(conn, subject, **common)]
            out.append((period, start, used))
        return out

    def _read_prices_if_changed(self) -> PriceBook | None:
        """A new book when the catalog changed (rows are only added) or a price has
        started or ended since the last one was built; else None (a cheap check)."""
        conn = self._connect()
        try:
            changes_at = self.book.prices.changes_at
            due = changes_at is not None and datetime.now(UTC) >= changes_at
            catalog = self._catalog.read(conn)
            if catalog.mark == self._price_mark and not due:
                return None
            return self._price_book(conn)
        finally:
            conn.close()

    def _price_book(self, conn: duckdb.DuckDBPyConnection) -> PriceBook:
        catalog = self._catalog.read(conn)
        self._price_mark = catalog.mark
        return PriceBook.build(catalog.prices, self._image_gen_model)


@dataclass(frozen=True)
class SharedOptions:
    outage: Literal["refuse", "serve"] = "refuse"
    poll: float = 0.25  # limits' version, blocks, this proxy's writer mark
    seed_wait: float = 10.0  # for the proxies' writers to commit past a window's opening


def _grouped(rows: Sequence[StoredLimit]) -> dict[Subject | None, tuple[Limit, ...]]:
    """Stored limits by the subject they hold (None: the default)."""
    limits: dict[Scope, list[Limit]] = {}
    for row in rows:
        limit = Limit(row.unit, row.period, row.amount, row.mode)  # type: ignore[arg-type]
        limits.setdefault((row.scope, row.subject_key, row.subject_value), []).append(limit)
    return {_subject(scope): tuple(found) for scope, found in limits.items()}


def _used_of(conn: duckdb.DuckDBPyConnection, subject: Subject, **common: Any) -> list[UsedBefore]:
    """`used_before` for one user or one tag value."""
    if subject[0] == "user":
        return used_before(conn, users=[subject[1]], **common)
    return used_before(conn, tag_key=subject[1], tag_values=[subject[2]], **common)


def _subject(scope: Scope) -> Subject | None:
    kind, key, value = scope
    if kind == "default":
        return None
    return user_subject(key) if kind == "user" else tag_subject(key, value)


def _usage(found: Any) -> Usage:
    return Usage(found.pico, found.tokens, found.requests, found.unpriced)


__all__ = ["UNITS", "QuotaService"]
