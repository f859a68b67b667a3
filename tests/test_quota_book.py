"""The quota book and the live price book, without a server: reservations, settlement,
the overshoot bound, and live costs equal to the warehouse's pricing."""

from __future__ import annotations

import contextlib
import random
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tokentill.ingest.capture import RequestFacts, now_us
from tokentill.warehouse.alerts import Alert
from tokentill.warehouse.db import open_warehouse
from tokentill.warehouse.events import MODALITY_COUNTS, UsageEvent
from tokentill.warehouse.live_prices import PriceBook
from tokentill.warehouse.prices import price_table, seed_published
from tokentill.warehouse.pricing import effective_intervals, model_map, price_events
from tokentill.warehouse.quota_book import QuotaBook, QuotaConfig, QuotaExceededError, Reservation
from tokentill.warehouse.quota_rules import Limit, user_subject, window

USD = 10**12


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> pl.DataFrame:
    path: Path = tmp_path_factory.mktemp("prices") / "p.duckdb"
    conn = open_warehouse(path)
    seed_published(conn)
    frame = price_table(conn)
    conn.close()
    return frame


def event(model: str, **fields: Any) -> UsageEvent:
    now = now_us()
    values: dict[str, Any] = {
        "kind": "create",
        "event_id": f"resp_{random.getrandbits(48):x}",
        "endpoint": "responses",
        "status": "completed",
        "created_at_us": now,
        "request_started_at_us": now,
        "recorded_at_us": now,
        "model": model,
    }
    values.update(fields)
    values.setdefault("response_id", values["event_id"])
    return UsageEvent(**values)


def test_live_cost_equals_the_warehouse_pricing(published: pl.DataFrame) -> None:
    book = PriceBook.build(published, "gpt-image-1")
    rng = random.Random(5)
    models = [
        "gpt-4o",
        "gpt-4o-2024-08-06",
        "gpt-4o-2024-05-13",
        "gpt-5-mini-2025-08-07",
        "gpt-5",
        "o4-mini",
        "gpt-4.1-nano",
        "ft:gpt-4o-mini-2024-07-18:acme::x1",
        "no-such-model",
        # Audio and image models: modality rates, per hour, per character.
        "gpt-realtime",
        "gpt-4o-audio-preview",
        "gpt-image-1",
        "gpt-image-1.5",
        "gpt-4o-transcribe",
        "whisper-1",
        "tts-1",
        "gpt-4o-mini-tts",
    ]
    events = []
    for _ in range(1200):
        inp = rng.choice([0, 10, 1000, 300_000])
        cached = rng.randint(0, inp)
        written = rng.randint(0, inp - cached)
        out = rng.choice([0, 5, 4000])
        image = rng.random() < 0.2
        media = rng.random() < 0.5
        audio_in = rng.randint(0, inp - cached - written) if media else None
        audio_cached = rng.randint(0, cached) if media else None
        image_in = rng.randint(0, inp - cached - written - (audio_in or 0)) if media else None
        audio_out = rng.randint(0, out) if media else None
        image_out = rng.randint(0, out - (audio_out or 0)) if media else None
        events.append(
            event(
                rng.choice(models),
                service_tier=rng.choice([None, "auto", "default", "flex", "priority"]),
                input_tokens=inp,
                cached_input_tokens=cached,
                cache_write_tokens=written,
                output_tokens=out,
                web_search_calls=rng.choice([None, 0, 2]),
                image_gen_input_tokens=50 if image else None,
                image_gen_input_image_tokens=20 if image else None,
                image_gen_cached_tokens=10 if image else None,
                image_gen_output_tokens=1056 if image else None,
                input_audio_tokens=audio_in,
                cached_audio_tokens=audio_cached,
                input_image_tokens=image_in,
                cached_image_tokens=rng.randint(0, cached - (audio_cached or 0)) if media else None,
                output_audio_tokens=audio_out,
                output_image_tokens=image_out,
                audio_ms=rng.choice([None, 0, 1, 12_345, 7_200_000]),
                input_characters=rng.choice([None, 0, 37, 4096]),
                usage_unreported=rng.random() < 0.05,
            )
        )
    now = datetime.now(UTC)
    frame = pl.DataFrame(
        [
            {
                "model": e.model,
                "service_tier": e.service_tier,
                "created_at": now,
                "i": i,
                **{
                    c: getattr(e, c)
                    for c in (
                        "input_tokens",
                        "cached_input_tokens",
                        "cache_write_tokens",
                        "output_tokens",
                        "web_search_calls",
                        "image_gen_input_tokens",
                        "image_gen_input_image_tokens",
                        "image_gen_cached_tokens",
                        "image_gen_output_tokens",
                        *MEDIA_FIELDS,
                    )
                },
            }
            for i, e in enumerate(events)
        ],
        schema_overrides={"created_at": pl.Datetime("us", "UTC")},
        infer_schema_length=None,
    )
    models_frame = model_map(frame["model"].to_list(), published["model"].unique().to_list())
    priced = (
        price_events(
            frame.lazy(),
            models_frame.lazy(),
            effective_intervals(published).lazy(),
            "gpt-image-1",
        )
        .collect()
        .sort("i")["cost_pico"]
        .to_list()
    )
    live = [book.cost(e) for e in events]
    for e, a, b in zip(events, live, priced, strict=True):
        assert a == b, (e, a, b)
    assert any(c is None for c in live) and any(c for c in live)
    assert all(c is None for e, c in zip(events, live, strict=True) if e.usage_unreported)
    # Units beyond tokens: $0.36 an hour of audio (rounded to the pico-dollar), $15 per
    # 1M characters; characters of a model priced by tokens measure nothing.
    assert book.cost(event("whisper-1", audio_ms=12_500)) == 1_250_000_000
    assert book.cost(event("whisper-1", audio_ms=1)) == 100_000
    assert book.cost(event("tts-1", input_characters=40)) == 40 * 15_000_000
    assert book.cost(event("gpt-4o-mini-tts", input_characters=40)) is None
    assert book.cost(event("gpt-4o-mini-tts", input_characters=40, input_tokens=10)) == 6_000_000
    # Audio tokens at the audio rates: gpt-realtime $32/M in, $0.40/M cached, $64/M out.
    realtime = event(
        "gpt-realtime",
        input_tokens=1000,
        input_audio_tokens=800,
        cached_input_tokens=300,
        cached_audio_tokens=200,
        output_tokens=500,
        output_audio_tokens=400,
    )
    assert book.cost(realtime) == (
        600 * 32_000_000 + 200 * 400_000  # audio in, its cached part
        + 100 * 4_000_000 + 100 * 400_000  # text in, its cached part
        + 400 * 64_000_000 + 100 * 16_000_000  # audio out, text out
    )  # fmt: skip
    # A model with no audio rate leaves audio tokens unpriced, never at the text rate.
    assert book.cost(event("gpt-4o-audio-preview", input_tokens=10, input_audio_tokens=5)) is None


MEDIA_FIELDS = (*MODALITY_COUNTS, "input_characters", "usage_unreported")


class Alerts(list[Alert]):
    def __call__(self, alert: Alert) -> None:
        self.append(alert)


def small_book(
    *, web_search: Decimal | None = None, clock: Any = None, **config: Any
) -> tuple[QuotaBook, Alerts]:
    rates = pl.DataFrame(
        {
            "price_id": [1],
            "model": ["m"],
            "service_tier": ["default"],
            "effective_from": [datetime(2020, 1, 1, tzinfo=UTC)],
            "effective_to": [None],
            "priority": [0],
            "recorded_at": [datetime(2020, 1, 1, tzinfo=UTC)],
            **{
                c: [None]
                for c in (
                    "cached_input_per_mtok",
                    "cache_write_per_mtok",
                    "tier_threshold",
                    "tier_input_per_mtok",
                    "tier_cached_input_per_mtok",
                    "tier_cache_write_per_mtok",
                    "tier_output_per_mtok",
                    "web_search_per_call",
                    "image_input_per_mtok",
                    "image_cached_input_per_mtok",
                    "image_output_per_mtok",
                )
            },
            # 1 and 10 pico-dollars per token: easy sums.
            "input_per_mtok": [Decimal("0.000001")],
            "output_per_mtok": [Decimal("0.000010")],
        },
        schema_overrides={"effective_to": pl.Datetime("us", "UTC")},
    )
    if web_search is not None:
        rates = rates.with_columns(pl.lit(web_search).alias("web_search_per_call"))
    alerts = Alerts()
    book = QuotaBook(
        QuotaConfig(**config), PriceBook.build(rates, "none"), alerts, clock=clock or now_us
    )
    return book, alerts


def facts(user: str | None = "u", **fields: Any) -> RequestFacts:
    fields.setdefault("endpoint", "responses")
    fields.setdefault("started_us", now_us())
    return RequestFacts(
        kind="create",
        started_perf=time.perf_counter(),
        requested_model="m",
        user_id=user,
        **fields,
    )


def test_reservation_is_body_bytes_plus_output_bound_at_the_models_price() -> None:
    book, _ = small_book(output_cap=1000)
    # Only subjects with limits hold counters (a soft one is enough).
    book.set_limits(user_subject("u"), [Limit("requests", "day", 100, "soft")])
    body = b'{"model":"m","input":"hello","max_output_tokens":50}'
    held = book.admit(facts(), {"model": "m", "max_output_tokens": 50}, body)
    assert (held.tokens, held.pico) == (len(body) + 50, len(body) * 1 + 50 * 10)
    no_bound = book.admit(facts(), {"model": "m"}, b"{}")
    assert (no_bound.tokens, no_bound.pico) == (2 + 1000, 2 + 1000 * 10)
    meter = book.meter(user_subject("u"))
    assert meter.reserved.requests == 2 and meter.reserved.pico == held.pico + no_bound.pico


def test_hard_limit_refuses_what_may_not_fit_and_settles_to_the_real_cost() -> None:
    book, alerts = small_book()
    book.set_limits(user_subject("u"), [Limit("usd", "day", 1000, "hard")])
    body = b'{"max_output_tokens":20}'  # worst case 24 + 200 = 224 pico
    parsed = {"max_output_tokens": 20}
    held = [book.admit(facts(), parsed, body) for _ in range(4)]  # 896 reserved
    with pytest.raises(QuotaExceededError) as refused:
        book.admit(facts(), parsed, body)
    assert refused.value.status == 429 and refused.value.code == "user_quota_exceeded"
    assert refused.value.type == "insufficient_quota"
    headers = dict(refused.value.headers or [])
    assert b"retry-after" in headers and b"x-tokentill-quota-reset" in headers
    # Each really cost 10 in + 5 out = 60: settling frees room.
    for reservation in held:
        book.settle(event("m", input_tokens=10, output_tokens=5, total_tokens=15), reservation)
    meter = book.meter(user_subject("u"))
    assert meter.reserved.pico == 0
    assert meter.current("day", now_us()).used.pico == 240
    assert [a.rule for a in alerts] == []  # 24% used
    book.admit(facts(), parsed, body)


def test_many_concurrent_requests_never_pass_a_hard_limit_when_outputs_are_bounded() -> None:
    book, _ = small_book()
    limit = 5_000
    book.set_limits(user_subject("u"), [Limit("usd", "total", limit, "hard")])
    rng = random.Random(1)
    admitted: list[tuple[Reservation, int, int]] = []
    for _ in range(100):  # all in flight at once: none settled before the last is admitted
        cap = rng.randint(16, 200)
        body = b'{"input":"' + b"x" * rng.randint(1, 300) + b'"}'
        try:
            reservation = book.admit(facts(), {"max_output_tokens": cap}, body)
        except QuotaExceededError:
            continue
        # The real usage: input tokens never exceed body bytes, output never exceeds cap.
        admitted.append((reservation, rng.randint(1, len(body) // 4), rng.randint(1, cap)))
    assert 0 < len(admitted) < 100
    for reservation, inp, out in admitted:
        book.settle(event("m", input_tokens=inp, output_tokens=out), reservation)
    spent = book.meter(user_subject("u")).current("total", now_us()).used.pico
    assert spent <= limit


def test_overshoot_is_bounded_by_what_exceeded_its_reservation() -> None:
    book, _ = small_book(output_cap=10)
    book.set_limits(user_subject("u"), [Limit("usd", "total", 2_000, "hard")])
    admitted = []
    for _ in range(100):
        with contextlib.suppress(QuotaExceededError):
            admitted.append(book.admit(facts(), {}, b"{}"))  # no bound: cap 10 reserved
    excess = 0
    for reservation in admitted:
        real = 2 * 1 + 50 * 10  # 50 output tokens: 40 past the cap
        excess += max(0, real - reservation.pico)
        book.settle(event("m", input_tokens=2, output_tokens=50), reservation)
    spent = book.meter(user_subject("u")).current("total", now_us()).used.pico
    assert spent > 2_000  # the cap was too low: the limit was passed...
    assert spent <= 2_000 + excess  # ...by no more than the documented bound


def test_pending_responses_keep_their_reservation_until_the_outcome() -> None:
    book, _ = small_book()
    subject = user_subject("u")
    book.set_limits(subject, [Limit("usd", "day", 10**9, "soft")])  # counters: limits only
    held = book.admit(facts(background=True), {"max_output_tokens": 20}, b"{}")
    queued = event("m", status="queued", response_id="resp_bg")
    book.settle(queued, held)
    book.release(held)  # the request handler ends: the parked reservation stays
    assert book.parked() == 1 and book.meter(subject).reserved.pico == held.pico
    done = event("m", kind="update", response_id="resp_bg", input_tokens=3, output_tokens=4)
    book.settle(done, None)
    assert book.parked() == 0 and book.meter(subject).reserved.pico == 0
    assert book.meter(subject).current("day", now_us()).used.pico == 43


def test_an_outcome_nobody_can_learn_is_charged_its_worst_case() -> None:
    book, _ = small_book(pending_max_seconds=0.0)
    subject = user_subject("u")
    book.set_limits(subject, [Limit("usd", "day", 10**9, "soft")])  # counters: limits only
    chat = book.admit(facts(endpoint="chat.completions"), {"max_tokens": 20}, b"{}")
    book.settle(event("m", endpoint="chat.completions", status="interrupted"), chat)
    assert book.meter(subject).current("day", now_us()).used.pico == chat.pico
    cut = book.admit(facts(), {"max_output_tokens": 20}, b"{}")
    book.settle(event("m", status="interrupted", response_id="resp_cut"), cut)
    assert book.parked() == 1
    assert book.expire_parked() == 1  # its poller never learnt the outcome
    assert book.meter(subject).current("day", now_us()).used.pico == chat.pico + cut.pico


def test_released_request_charges_nothing() -> None:
    book, _ = small_book()
    held = book.admit(facts(), {}, b"{}")
    book.release(held)
    book.release(held)
    meter = book.meter(user_subject("u"))
    assert meter.reserved.pico == 0 and meter.current("day", now_us()).used.requests == 0


def test_thresholds_alert_once_per_window_and_soft_limits_never_refuse() -> None:
    book, alerts = small_book()
    book.set_limits(user_subject("u"), [Limit("requests", "day", 4, "soft")])
    for _ in range(6):
        held = book.admit(facts(), {}, b"{}")
        book.settle(event("m", input_tokens=1, output_tokens=1), held)
    assert [a.rule for a in alerts] == [
        "requests/day 50%",
        "requests/day 80%",
        "requests/day 100%",
    ]
    assert alerts[-1].severity == "warning"  # soft: a warning, nothing refused
    assert len({a.dedupe_key for a in alerts}) == 3


def test_default_limits_apply_per_user_and_tags_are_shared() -> None:
    book, _ = small_book()
    book.set_limits(None, [Limit("requests", "minute", 1, "hard")])
    book.admit(facts("a"), {}, b"{}")
    book.admit(facts("b"), {}, b"{}")  # a budget of its own
    book.set_limits(("tag", "customer", "acme"), [Limit("requests", "total", 1, "hard")])
    tagged = {"metadata": {"customer": "acme"}}
    book.admit(facts("c"), tagged, b"{}")
    with pytest.raises(QuotaExceededError) as refused:
        book.admit(facts("d"), tagged, b"{}")
    assert refused.value.code == "tag_quota_exceeded"
    assert b"retry-after" not in dict(refused.value.headers or [])  # a total never resets
    book.admit(facts(None), {}, b"{}")  # no end user: no user limit applies


def test_windows_are_utc_calendar_periods() -> None:
    t = int(datetime(2026, 2, 14, 13, 45, 30, tzinfo=UTC).timestamp() * 1e6)
    day = window("day", t)
    month = window("month", t)
    assert datetime.fromtimestamp(day[0] / 1e6, UTC) == datetime(2026, 2, 14, tzinfo=UTC)
    assert datetime.fromtimestamp(month[0] / 1e6, UTC) == datetime(2026, 2, 1, tzinfo=UTC)
    assert datetime.fromtimestamp(month[1] / 1e6, UTC) == datetime(2026, 3, 1, tzinfo=UTC)
    assert window("minute", t)[1] - window("minute", t)[0] == 60_000_000


def test_burn_rate_is_the_spend_of_the_last_fifteen_minutes_per_hour() -> None:
    from tokentill.warehouse.quota_book import Meter

    start = int(datetime(2026, 5, 1, 12, tzinfo=UTC).timestamp() * 1e6)
    minute = 60_000_000
    meter = Meter(start - 60 * minute)  # a counter older than the burn window
    meter.add(start - 30 * minute, start - 30 * minute, 999, 1, 0)  # too old to count
    for i in range(10):  # 10 requests of 100 pico over the last 10 minutes
        at = start - i * minute
        meter.add(at, at, 100, 7, 0)
    assert meter.burn_per_hour("usd", start) == 1000 * 4  # 1,000 per 15 min
    assert meter.burn_per_hour("requests", start) == 10 * 4
    young = Meter(start - 2 * minute)  # a counter two minutes old: its own span
    young.add(start, start, 100, 1, 0)
    assert young.burn_per_hour("usd", start) == 100 * 30


def test_web_search_calls_are_reserved_so_concurrent_requests_stay_within_the_limit() -> None:
    book, _ = small_book(web_search=Decimal("0.00000000001"), tool_calls=3)  # 10 pico a call
    subject = user_subject("u")
    body = b'{"max_output_tokens":20}'  # 24 in + 200 out = 224 pico without tools
    book.set_limits(subject, [Limit("usd", "day", 1000, "hard")])
    tools = {"max_output_tokens": 20, "tools": [{"type": "web_search"}]}
    stated = book.admit(facts(), {**tools, "max_tool_calls": 5}, body)
    assert stated.pico == 224 + 5 * 10
    default = book.admit(facts(), tools, body)
    assert default.pico == 224 + 3 * 10
    assert book.admit(facts(), {"max_output_tokens": 20}, body).pico == 224
    # Concurrent requests each reserve their calls: the fourth would pass the limit.
    with pytest.raises(QuotaExceededError):
        book.admit(facts(), tools, body)
    # Each made its reserved calls at most: spend stays within the limit.
    for held, calls in ((stated, 5), (default, 3)):
        book.settle(event("m", input_tokens=24, output_tokens=20, web_search_calls=calls), held)
    assert book.meter(subject).current("day", now_us()).used.pico <= 1000


def test_counters_stay_bounded_under_a_million_distinct_users() -> None:
    """A client rotating X-Tokentill-User with a default limit set: counters of users
    whose windows have ended (and hold no reservation) are dropped, so memory plateaus."""
    import resource

    def rss_mb() -> float:
        pages = int(open("/proc/self/statm").read().split()[1])  # noqa: SIM115
        return pages * resource.getpagesize() / 2**20

    clock = [now_us()]
    book, _ = small_book(clock=lambda: clock[0])
    book.set_limits(None, [Limit("requests", "minute", 100, "hard")])
    counters, rss = [], []
    for i in range(1_000_000):
        clock[0] += 1_000  # a request a millisecond: 60,000 new users a minute
        request = facts(f"rotating-{i}", started_us=clock[0])
        held = book.admit(request, {"max_output_tokens": 1}, b"{}")
        book.settle(event("m", input_tokens=1, output_tokens=1, total_tokens=2), held)
        if i % 20_000 == 19_999:
            book.evict_idle()
            counters.append(book.counters())
            rss.append(rss_mb())
    # At most a minute of users (the limit's window) and those since the last sweep.
    assert max(counters) <= 60_000 + 20_000
    # Memory: after the first three minutes (the windows' full cycle), flat to the end.
    settled = rss[9]
    assert max(rss[9:]) < settled * 1.15 + 20, (settled, max(rss[9:]))


def test_a_limit_added_later_counts_only_from_then_and_users_without_limits_hold_nothing() -> None:
    book, _ = small_book()
    for i in range(100):
        held = book.admit(facts(f"free-{i}"), {"max_output_tokens": 1}, b"{}")
        book.settle(event("m", input_tokens=1, output_tokens=1, total_tokens=2), held)
    assert book.counters() == 0  # no limits: nothing kept in memory


def test_past_max_counters_idle_ones_are_spilled_and_known_as_such() -> None:
    """A default per-day limit: a counter cannot be dropped at zero before the day ends,
    so past `max_counters` the least recently used idle ones are spilled (remembered in a
    filter, read back from the warehouse on return)."""
    clock = [now_us()]
    book, _ = small_book(clock=lambda: clock[0], max_counters=50, spill_after=1.0)
    book.set_limits(None, [Limit("requests", "day", 5, "hard")])
    for i in range(500):
        clock[0] += 10_000  # 10 ms apart: 100 users a second
        held = book.admit(facts(f"day-{i}", started_us=clock[0]), {"max_output_tokens": 1}, b"{}")
        book.settle(event("m", input_tokens=1, output_tokens=1, total_tokens=2), held)
        if i % 50 == 49:
            book.evict_idle()
            # The cap, plus the last second's users (not idle long enough to spill).
            assert book.counters() <= 50 + 100
    first, recent, stranger = user_subject("day-0"), user_subject("day-499"), user_subject("x")
    assert book.spilled([first, recent, stranger]) == [first]
    # Reading a spilled subject's counters does not make them up from nothing.
    assert book.meter(first).current("day", clock[0]).used.requests == 0
    assert book.spilled([first]) == [first]
    before = book.revive(first)
    assert before == clock[0] and book.spilled([first]) == []
