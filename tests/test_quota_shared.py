"""The shared quota counters' scripts against a real Redis, two `SharedCounters` standing
for two proxies, on a clock the test moves: exact money past a double's precision, one
charge per event whoever settles it, reservations that lapse when their proxy dies,
windows read from the lake once and then kept live, threshold alerts raised once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.services import Redis, redis_server
from tests.test_rollups import DAY0, Warehouse, make_event
from tokentill.warehouse.alerts import Alert
from tokentill.warehouse.events import UsageEvent
from tokentill.warehouse.live_prices import PriceBook
from tokentill.warehouse.quota_book import (
    QuotaBook,
    QuotaConfig,
    QuotaExceededError,
    Reservation,
    Usage,
)
from tokentill.warehouse.quota_rules import Limit, Subject, user_subject
from tokentill.warehouse.quota_shared import NeedsSeedError, SharedCounters
from tokentill.warehouse.quota_store import used_before
from tokentill.warehouse.unsettled import unsettled

DAY_US = 86_400_000_000
# Noon tomorrow: the test's clock runs ahead of Redis's own, which expires window keys.
_TODAY = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
T0 = int(_TODAY.timestamp() * 1_000_000) + DAY_US
ALICE = user_subject("alice")


@pytest.fixture(scope="module")
def store() -> Iterator[Redis]:
    with redis_server() as server:
        yield server


class Proxy:
    """One proxy's book and counters, on the test's clock."""

    def __init__(self, client: aioredis.Redis, clock: list[int], open_for: float = 900.0):
        self.alerts: list[Alert] = []
        self.book = QuotaBook(
            QuotaConfig(), PriceBook({}, "gpt-image-1"), self.alerts.append, lambda: clock[0]
        )
        self.counters = SharedCounters(
            client,
            self.book,
            instance_id="p",
            open_for_seconds=open_for,
            pending_max_seconds=3600,
            clock=lambda: clock[0],
        )
        self.book.shared = self.counters
        self.clock = clock

    def limit(self, subject: Subject, *limits: Limit) -> None:
        self.book.set_limits(subject, limits)

    def reservation(self, subject: Subject, pico: int = 0, tokens: int = 0) -> Reservation:
        return Reservation((subject,), (subject,), self.clock[0], pico, tokens, False, True)

    async def admit(self, reservation: Reservation, seed: Usage | None = None) -> None:
        """Admit, seeding a window from `seed` (what 'the lake' holds) when asked."""
        for _ in range(3):
            try:
                await self.counters.admit(reservation)
                return
            except NeedsSeedError as needed:
                for found in needed.windows:
                    await self.counters.seed(needed.gen, found, seed or Usage())
        raise AssertionError("still unseeded")

    async def settle(self, reservation: Reservation, cost: int, event_id: str) -> None:
        event = UsageEvent(
            kind="create",
            event_id=event_id,
            response_id=event_id,
            endpoint="responses",
            status="completed",
            created_at_us=reservation.started_us,
            request_started_at_us=reservation.started_us,
            recorded_at_us=self.clock[0],
        )
        self.counters.charge(reservation, cost, 10, False, event)
        await self.flush()

    async def flush(self) -> None:
        runner = asyncio.create_task(self.counters.run())
        try:
            assert await self.counters.drain(10)
        finally:
            runner.cancel()

    async def used(self, subject: Subject) -> tuple[int, int]:
        meter = await self.counters.meter(subject, self.book.limits_of(subject)[0])
        return meter.windows["day"].used.pico, meter.reserved.pico


def _run(test: Callable[[aioredis.Redis], Awaitable[None]], store: Redis) -> None:
    async def main() -> None:
        client = aioredis.from_url(store.url)
        await client.flushdb()
        try:
            await test(client)
        finally:
            await client.aclose()

    asyncio.run(main())


def test_money_past_a_doubles_precision_is_compared_exactly(store: Redis) -> None:
    """$20,000 in pico-dollars is past 2^53: Lua's doubles would round $0.000000000001."""
    limit = 20_000 * 10**12

    async def test(client: aioredis.Redis) -> None:
        clock = [T0]
        proxy = Proxy(client, clock)
        proxy.limit(ALICE, Limit("usd", "day", limit))
        almost = Usage(pico=limit - 2, requests=1)
        await proxy.admit(proxy.reservation(ALICE, pico=1), seed=almost)
        await proxy.admit(proxy.reservation(ALICE, pico=1))  # exactly at the limit
        with pytest.raises(QuotaExceededError) as over:
            await proxy.admit(proxy.reservation(ALICE, pico=1))
        assert "$20000.00 per day, $20000.00 used or reserved" in str(over.value)
        assert await proxy.used(ALICE) == (limit - 2, 2)

    _run(test, store)


def test_an_event_is_charged_once_whoever_settles_it(store: Redis) -> None:
    async def test(client: aioredis.Redis) -> None:
        clock = [T0]
        a, b = Proxy(client, clock), Proxy(client, clock)
        for proxy in (a, b):
            proxy.limit(ALICE, Limit("usd", "day", 10**12))
        held = a.reservation(ALICE, pico=500)
        await a.admit(held)
        assert await a.used(ALICE) == (0, 500)
        await a.settle(held, 300, "resp_1")
        # The same response settled again elsewhere (a sweep that adopted it): once.
        await b.settle(b.reservation(ALICE), 300, "resp_1")
        assert await b.used(ALICE) == (300, 0)

    _run(test, store)


def test_reservations_of_a_proxy_that_died_lapse(store: Redis) -> None:
    async def test(client: aioredis.Redis) -> None:
        clock = [T0]
        dead = Proxy(client, clock, open_for=60)
        alive = Proxy(client, clock)
        for proxy in (dead, alive):
            proxy.limit(ALICE, Limit("usd", "day", 1000))
        await dead.admit(dead.reservation(ALICE, pico=900))
        with pytest.raises(QuotaExceededError):
            await alive.admit(alive.reservation(ALICE, pico=200))
        clock[0] += 61_000_000  # the dead proxy's reservation lapses, charging nothing
        await alive.admit(alive.reservation(ALICE, pico=200))
        assert await alive.used(ALICE) == (0, 200)

    _run(test, store)


def test_a_window_is_read_from_the_lake_once_then_counted_live(store: Redis) -> None:
    async def test(client: aioredis.Redis) -> None:
        clock = [T0]
        proxy = Proxy(client, clock)
        proxy.limit(ALICE, Limit("usd", "day", 10**12))
        seeds: list[Any] = []
        counters = proxy.counters

        async def admit() -> None:
            try:
                await counters.admit(proxy.reservation(ALICE))
            except NeedsSeedError as needed:
                seeds.extend(needed.windows)
                for found in needed.windows:
                    await counters.seed(needed.gen, found, Usage(pico=40, requests=1))
                await counters.admit(proxy.reservation(ALICE))

        await admit()
        assert len(seeds) == 1 and seeds[0].since == T0
        held = proxy.reservation(ALICE)
        await counters.admit(held)
        await proxy.settle(held, 2, "resp_2")
        assert (await proxy.used(ALICE))[0] == 42
        # Days later, after days idle: the new day opens counted live, with no read.
        clock[0] += 3 * DAY_US
        await admit()
        assert len(seeds) == 1
        assert (await proxy.used(ALICE))[0] == 0
        # A limit change forgets it: the next admission reads the lake again.
        await counters.forget(ALICE)
        await admit()
        assert len(seeds) == 2

    _run(test, store)


def test_a_threshold_alert_is_raised_once_across_proxies(store: Redis) -> None:
    async def test(client: aioredis.Redis) -> None:
        clock = [T0]
        a, b = Proxy(client, clock), Proxy(client, clock)
        for proxy in (a, b):
            proxy.limit(ALICE, Limit("usd", "day", 100, "soft"))
        await a.admit(a.reservation(ALICE))
        for n, proxy in enumerate((a, b, a, b)):
            held = proxy.reservation(ALICE)
            await proxy.counters.admit(held)
            await proxy.settle(held, 30, f"resp_{n}")
        rules = sorted(alert.rule for alert in a.alerts + b.alerts)
        assert rules == ["usd/day 100%", "usd/day 50%", "usd/day 80%"]

    _run(test, store)


def test_a_windows_read_leaves_out_what_is_counted_live(tmp_path: Path) -> None:
    """The lake's side of a window opened at T: responses whose outcome was recorded
    before T. One settled after T (a background response, a stream journaled at its
    start) or still pending is the live side's, whenever it began: never both."""
    at = int((DAY0 + timedelta(hours=12)).timestamp() * 1_000_000)
    second = 1_000_000

    def event(i: int, recorded: int, **fields: Any) -> UsageEvent:
        values = {"user_id": "ana", "recorded_at_us": recorded, **fields}
        made = make_event(i, 0, 0, **values)
        made.created_at_us = made.request_started_at_us = at - 60 * second + i
        return made

    warehouse = Warehouse(tmp_path)
    try:
        warehouse.ingest(
            [
                event(1, at - 10 * second),  # whole before T: the lake's
                event(2, at - 10 * second, status="queued"),  # settled after T: live
                event(3, at - 10 * second, status="queued"),  # still pending: live, later
                event(4, at - 10 * second, status="queued"),  # settled before T: the lake's
                event(5, at + second),  # after T: live
            ]
        )
        warehouse.ingest(
            [
                event(2, at + 5 * second, kind="update"),
                event(4, at - 5 * second, kind="update"),
            ]
        )

        def requests(settled: bool) -> int:
            found = used_before(
                warehouse.conn,
                recorded_before=datetime.fromtimestamp(at / 1e6, UTC),
                window_start=DAY0,
                image_model="gpt-image-1",
                users=["ana"],
                settled=settled,
            )
            return found[0].requests

        assert requests(settled=True) == 2  # 1 and 4
        assert requests(settled=False) == 4  # one process counts from its start: 1 to 4
    finally:
        warehouse.close()


def test_a_soft_limits_window_is_read_from_the_lake_too(store: Redis) -> None:
    """Only hard limits refuse, but a soft limit's window counts from the lake's history
    as well (its alerts, the API): admission opens and reads every limit's window."""

    async def test(client: aioredis.Redis) -> None:
        clock = [T0]
        proxy = Proxy(client, clock)
        proxy.limit(ALICE, Limit("usd", "day", 10**12), Limit("tokens", "month", 10, "soft"))
        with pytest.raises(NeedsSeedError) as needed:
            await proxy.counters.admit(proxy.reservation(ALICE, tokens=1_000))
        assert sorted(w.period for w in needed.value.windows) == ["day", "month"]
        for found in needed.value.windows:
            await proxy.counters.seed(needed.value.gen, found, Usage(tokens=50, requests=1))
        await proxy.counters.admit(proxy.reservation(ALICE, tokens=1_000))  # soft: served
        meter = await proxy.counters.meter(ALICE, proxy.book.limits_of(ALICE)[0])
        assert meter.windows["month"].used.tokens == 50

    _run(test, store)


def test_an_outcome_settled_by_another_proxy_is_charged_to_its_user(store: Redis) -> None:
    """A background response parked on a proxy that died: the sweep elsewhere polls it
    and records its outcome, carrying the user it found in the warehouse; that proxy's
    book charges it (once) with no reservation of its own."""

    async def test(client: aioredis.Redis) -> None:
        clock = [T0]
        proxy = Proxy(client, clock)
        proxy.limit(ALICE, Limit("usd", "day", 10**12))
        await proxy.admit(proxy.reservation(ALICE))  # the window, read
        outcome = make_event(
            7, 0, 0, kind="update", user_id="alice", recorded_at_us=clock[0], created_at_us=T0
        )
        outcome.event_id = outcome.response_id = "resp_orphan"
        proxy.book.prices = _PricesOf(123)
        proxy.book.settle(outcome, None)
        proxy.book.settle(outcome, None)  # a second sweep's: not again
        await proxy.flush()
        assert await proxy.used(ALICE) == (123, 0)

    _run(test, store)


class _PricesOf(PriceBook):
    """Every event costs `pico` (the book's pricing is not what is tested here)."""

    def __init__(self, pico: int) -> None:
        super().__init__({}, "gpt-image-1")
        self._pico = pico

    def cost(self, event: UsageEvent) -> int | None:
        return self._pico


def test_a_young_stream_is_left_to_its_own_proxy(tmp_path: Path) -> None:
    """The sweep's query: pending responses with whom they count for; a stream pending
    for less than the grace is its own proxy's to record."""
    now = DAY0 + timedelta(hours=12)
    at = int(now.timestamp() * 1_000_000)
    warehouse = Warehouse(tmp_path)
    try:
        events = []
        for i, (minutes, streamed) in enumerate([(30, True), (2, True), (2, False)]):
            made = make_event(i, 0, 0, status="in_progress", streamed=streamed, user_id="ana")
            made.created_at_us = made.request_started_at_us = at - minutes * 60_000_000
            made.recorded_at_us = made.created_at_us
            events.append(made)
        warehouse.ingest(events)

        def found(streams_before: datetime | None) -> list[tuple[str, str | None]]:
            rows = unsettled(
                warehouse.conn,
                since=now - timedelta(days=1),
                before=now,
                streams_before=streams_before,
            )
            return sorted((r.response_id, r.user_id) for r in rows)

        everything = [("resp_0", "ana"), ("resp_1", "ana"), ("resp_2", "ana")]
        assert found(None) == everything
        assert found(now - timedelta(minutes=15)) == [("resp_0", "ana"), ("resp_2", "ana")]
    finally:
        warehouse.close()
