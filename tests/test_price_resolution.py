"""Which price prices an event: resolved at the event's time, never rewritten by a price
that starts after it, and corrections that replace exactly what they correct.

The oracle below states the rules plainly, one event at a time; `price_events` (the
warehouse) and `PriceBook` (the proxy) must agree with it on random catalogs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokentill.warehouse.events import UsageEvent
from tokentill.warehouse.live_prices import PriceBook
from tokentill.warehouse.pricing import effective_intervals, model_map, price_events

T0 = datetime(2026, 1, 1, tzinfo=UTC)
# Catalog names of one family: the family, a snapshot with its own price, a prefix.
NAMES = ("gpt-x", "gpt-x-2025-05-01", "ft:gpt-x-2025-05-01:*", "gpt-y")
# Models events name: each catalog name's own, a snapshot priced by its family, fine-tunes.
MODELS = ("gpt-x", "gpt-x-2025-05-01", "gpt-x-2024-01-01", "ft:gpt-x-2025-05-01:acme::1", "gpt-y")


@dataclass(frozen=True)
class Price:
    model: str
    tier: str
    start: int  # days after T0
    end: int | None
    priority: int
    input: int  # USD per 1M tokens, whole
    output: int


prices_strategy = st.builds(
    Price,
    model=st.sampled_from(NAMES),
    tier=st.sampled_from(("default", "flex")),
    start=st.integers(0, 30),
    end=st.one_of(st.none(), st.integers(1, 40)),
    priority=st.sampled_from((0, 100)),
    input=st.integers(1, 9),
    output=st.integers(1, 9),
).filter(lambda p: p.end is None or p.end > p.start)


def _day(n: int) -> datetime:
    return T0 + timedelta(days=n)


def catalog(prices: list[Price]) -> pl.DataFrame:
    """Rows as the `prices` table holds them, recorded in list order."""
    return pl.DataFrame(
        [
            {
                "price_id": i + 1,
                "model": p.model,
                "service_tier": p.tier,
                "effective_from": _day(p.start),
                "effective_to": None if p.end is None else _day(p.end),
                "priority": p.priority,
                "recorded_at": T0 + timedelta(seconds=i),
                "input_per_mtok": p.input,
                "output_per_mtok": p.output,
            }
            for i, p in enumerate(prices)
        ],
        schema_overrides={
            "effective_from": pl.Datetime("us", "UTC"),
            "effective_to": pl.Datetime("us", "UTC"),
            "recorded_at": pl.Datetime("us", "UTC"),
        },
    )


def oracle(prices: list[Price], model: str, tier: str, at: datetime) -> int | None:
    """The rules, plainly: the most specific name with a row in force at `at`; a row is
    in force from its start to its end, or without one until the next start of a row of
    at least its priority (same name and tier); the highest priority wins, then the
    latest recorded. Cost of 1000 input and 100 output tokens, pico-dollars."""
    snapshot_family = {"gpt-x-2025-05-01": "gpt-x", "gpt-x-2024-01-01": "gpt-x"}
    names = [model] if model in NAMES else []
    names += [n for n in NAMES if n.endswith("*") and model.startswith(n[:-1])]
    if model in snapshot_family:
        names.append(snapshot_family[model])
    for name in names:
        rows = [(i, p) for i, p in enumerate(prices) if p.model == name and p.tier == tier]
        live = []
        for i, p in rows:
            end = p.end
            if end is None:
                later = [q.start for _, q in rows if q.start > p.start and q.priority >= p.priority]
                end = min(later, default=None)
            if _day(p.start) <= at and (end is None or at < _day(end)):
                live.append((p.priority, i, p))
        if live:
            best = max(live)[2]
            return (1000 * best.input + 100 * best.output) * 1_000_000
    return None


def warehouse_costs(
    prices: list[Price], events: list[tuple[str, str, datetime]]
) -> list[int | None]:
    frame = pl.DataFrame(
        [
            {
                "i": i,
                "model": m,
                "service_tier": t,
                "created_at": at,
                "input_tokens": 1000,
                "output_tokens": 100,
            }
            for i, (m, t, at) in enumerate(events)
        ],
        schema_overrides={"created_at": pl.Datetime("us", "UTC")},
    )
    table = catalog(prices)
    priced = price_events(
        frame.lazy(),
        model_map(frame["model"].to_list(), table["model"].unique().to_list()).lazy(),
        effective_intervals(table).lazy(),
        "gpt-image-1",
    ).collect()
    assert priced.height == frame.height  # one row per event, whatever the catalog
    return priced.sort("i")["cost_pico"].to_list()


events_strategy = st.lists(
    st.tuples(
        st.sampled_from(MODELS),
        st.sampled_from(("default", "flex")),
        st.integers(0, 45 * 24).map(lambda h: T0 + timedelta(hours=h)),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(prices_strategy, min_size=1, max_size=8), events_strategy)
def test_the_warehouse_prices_each_event_by_the_prices_in_force_at_its_time(
    prices: list[Price], events: list[tuple[str, str, datetime]]
) -> None:
    assert warehouse_costs(prices, events) == [oracle(prices, m, t, at) for m, t, at in events]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(prices_strategy, min_size=1, max_size=8), events_strategy, prices_strategy)
def test_a_price_that_starts_later_never_changes_a_cost(
    prices: list[Price], events: list[tuple[str, str, datetime]], late: Price
) -> None:
    before = warehouse_costs(prices, events)
    after = warehouse_costs([*prices, late], events)
    for (_, _, at), old, new in zip(events, before, after, strict=True):
        if _day(late.start) > at:
            assert new == old


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(prices_strategy, min_size=1, max_size=8), st.integers(0, 45 * 24))
def test_the_proxy_resolves_prices_as_the_warehouse_does(prices: list[Price], hour: int) -> None:
    at = T0 + timedelta(hours=hour)
    book = PriceBook.build(catalog(prices), "gpt-image-1", at=at)
    for model in MODELS:
        for tier in ("default", "flex"):
            event = UsageEvent(
                kind="create",
                event_id="e",
                endpoint="responses",
                status="completed",
                created_at_us=0,
                request_started_at_us=0,
                recorded_at_us=0,
                model=model,
                service_tier=tier,
                input_tokens=1000,
                output_tokens=100,
            )
            assert book.cost(event) == oracle(prices, model, tier, at), (model, tier)


def test_a_correction_replaces_exactly_the_interval_it_corrects() -> None:
    today, later = 10, 20
    prices = [
        Price("gpt-x", "default", 0, None, 0, 1, 1),
        Price("gpt-x", "default", today, None, 0, 4, 16),
        Price("gpt-x", "default", later, None, 0, 6, 20),
        # The correction: today's price again, recorded last.
        Price("gpt-x", "default", today, None, 0, 3, 12),
    ]
    hour = timedelta(hours=1)
    events = [("gpt-x", "default", _day(d) + hour) for d in (0, today, later)]
    assert warehouse_costs(prices, events) == [
        (1000 * 1 + 100 * 1) * 10**6,
        (1000 * 3 + 100 * 12) * 10**6,  # corrected
        (1000 * 6 + 100 * 20) * 10**6,  # the later price stands
    ]
