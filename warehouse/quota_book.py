"""Quotas, enforced in the proxy: limits per end user (or a default), per metadata tag.

A limit is an amount of a unit (USD as pico-dollars, tokens, requests) per period (UTC
minute, UTC day, UTC calendar month, or in total), hard (requests past it are refused
with a 429) or soft (alerts only). A user with limits of their own is held to those; a
user without is held to the default limits, each user with a budget of their own. A
tag limit (say `customer=acme`) is shared by every request carrying that tag. Requests
with no end user are not subject to user limits (only to tag limits).

Everything here runs on the event loop, in memory, with no I/O:

- `admit` (before forwarding) reserves the request's worst case on each subject it
  counts for, after checking that, for every hard limit, used + reserved + this worst
  case stays within the limit; else it raises `QuotaExceededError` (a 429).
- `settle` (from the recorder, when the response's event is journaled) swaps the
  reservation for the real cost, priced by the live `PriceBook`. A response still
  pending (background, or a stream cut off) keeps its reservation until its outcome
  arrives, or for at most `background_poll_max`, after which it is charged its worst case.

The bound on overshoot. A request is admitted only if its reservation fits, and
reservations are held until the real cost replaces them, so a hard limit can only be
passed by requests whose real cost exceeded their reservation:

    spent <= limit + sum over concurrently admitted requests of max(0, real - reserved)

and real <= reserved whenever (1) the request states its output bound
(`max_output_tokens`, `max_completion_tokens`/`max_tokens` x `n`), or the output stays
within `quota_output_cap`; (2) its input is in the body, or in a `previous_response_id`
the proxy saw finish (its input plus output tokens are remembered), images counted at
`quota_image_tokens` each; (3) web search, billed per call, makes at most the calls
reserved for it (`max_tool_calls` when the request states it, else `quota_tool_calls`),
and no other hidden input (file search results, `conversation`, files by id) is used;
(4) the upstream bills the service tier asked for. With those, the overshoot is 0
whatever the concurrency; past (3), it is the price of the calls beyond those reserved.

Counters are kept only for subjects that have limits, seeded from the warehouse with
everything recorded before the limit was set (at start, or when the API sets it), then
live from that moment: each event is counted exactly once, by the warehouse or live,
because recording an event and settling it happen together on the event loop. Memory
is bounded by the subjects with limits that are active: a subject's counters are
dropped once every window of its limits has ended since its last use and it holds no
reservation (they could only read zero), and made anew, at zero, if it returns; a
`total` limit keeps its counters for good.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal, Protocol

import orjson

from tokentill.warehouse.alerts import Alert, Severity
from tokentill.warehouse.events import UsageEvent, now_us
from tokentill.warehouse.live_prices import PriceBook
from tokentill.warehouse.openai_errors import RequestRejectedError
from tokentill.warehouse.quota_rules import (
    FOREVER,
    PERIODS,
    THRESHOLDS,
    Limit,
    Period,
    Subject,
    Unit,
    subject_label,
    tag_subject,
    usd,
    user_subject,
    window,
)

# Burn rate: spend over the last this many minutes.
BURN_MINUTES = 15
_US_MINUTE = 60_000_000


@dataclass(slots=True)
class Usage:
    pico: int = 0
    tokens: int = 0
    requests: int = 0
    unpriced: int = 0

    def of(self, unit: Unit) -> int:
        return self.pico if unit == "usd" else self.tokens if unit == "tokens" else self.requests


@dataclass(slots=True)
class Window:
    start: int
    end: int
    used: Usage = field(default_factory=Usage)
    # Threshold alerts raised in this window (gone with it, so memory stays bounded).
    fired: set[str] = field(default_factory=set)


class Meter:
    """One subject's usage: per period in its current window, what is reserved in
    flight, and per-minute spend for the burn rate."""

    __slots__ = ("born_us", "last_used_us", "recent", "reserved", "windows")

    def __init__(self, now: int) -> None:
        self.windows = {period: Window(*window(period, now)) for period in PERIODS}
        self.reserved = Usage()
        self.recent: deque[tuple[int, Usage]] = deque()
        self.born_us = now
        self.last_used_us = now

    def idle_through(self, periods: Iterable[Period], now: int) -> bool:
        """Nothing reserved, and every window of `periods` that held a use has ended: the
        counters are all zero from here on, so dropping them loses nothing."""
        if self.reserved.requests:
            return False
        return all(
            period != "total" and window(period, now)[0] > self.last_used_us for period in periods
        )

    def reset_usage(self, now: int) -> None:
        """Forget what was counted (a seed from the warehouse replaces it); keep what is
        reserved in flight."""
        self.windows = {period: Window(*window(period, now)) for period in PERIODS}
        self.recent.clear()

    def current(self, period: Period, now: int) -> Window:
        found = self.windows[period]
        if now >= found.end:
            found = self.windows[period] = Window(*window(period, now))
        return found

    def add(self, started_us: int, now: int, cost: int, tokens: int, unpriced: int) -> None:
        self.last_used_us = now
        windows = self.windows
        for period, current in windows.items():
            if now >= current.end:
                current = windows[period] = Window(*window(period, now))
            if started_us >= current.start:  # else it belongs to a window already over
                used = current.used
                used.pico += cost
                used.tokens += tokens
                used.requests += 1
                used.unpriced += unpriced
        minute = now // _US_MINUTE
        if not self.recent or self.recent[-1][0] != minute:
            self.recent.append((minute, Usage()))
            while self.recent[0][0] <= minute - BURN_MINUTES:
                self.recent.popleft()
        last = self.recent[-1][1]
        last.pico += cost
        last.tokens += tokens
        last.requests += 1

    def burn_per_hour(self, unit: Unit, now: int) -> Decimal:
        """The unit's spend rate over the last BURN_MINUTES (or since this meter began)."""
        minute = now // _US_MINUTE
        total = sum(u.of(unit) for m, u in self.recent if m > minute - BURN_MINUTES)
        span_us = min(BURN_MINUTES * _US_MINUTE, max(_US_MINUTE, now - self.born_us))
        return Decimal(total) * Decimal(3_600_000_000) / Decimal(span_us)


class QuotaRequest(Protocol):
    """What admission reads of a request: the proxy's `RequestFacts` is one (the book
    never sees the request's content, only these facts and the parsed body's bounds)."""

    @property
    def started_us(self) -> int: ...
    @property
    def user_id(self) -> str | None: ...
    @property
    def endpoint(self) -> str: ...
    @property
    def requested_model(self) -> str | None: ...
    @property
    def input_characters(self) -> int | None: ...
    @property
    def store(self) -> bool: ...


@dataclass(slots=True)
class Reservation:
    """A request's worst case, held on each subject it counts for until settled."""

    subjects: tuple[Subject, ...]
    """Every subject the request counts for: charged if it has limits when it settles."""
    held: tuple[Subject, ...]
    """The subjects with limits at admission, on which its worst case is reserved."""
    started_us: int
    pico: int
    tokens: int
    unpriced: bool
    retrievable: bool  # stored upstream, so a cut-off outcome can still be learned
    state: Literal["open", "parked", "done"] = "open"
    key: str = ""  # its id in shared counters (warehouse/quota_shared.py)


class SharedLedger(Protocol):
    """Counters kept outside the process (Redis, for many proxies): the book decides what
    to reserve and charge; the ledger holds it where every proxy sees it."""

    def charge(
        self,
        reservation: Reservation,
        cost: int,
        tokens: int,
        unpriced: bool,
        event: UsageEvent | None,
        counted_id: str | None = None,
    ) -> None: ...

    def release(self, reservation: Reservation) -> None: ...

    def park(self, reservation: Reservation) -> None: ...


class UserBlockedError(RequestRejectedError):
    """The user is blocked for a while (a critical abuse flag, `abuse_block_seconds`)."""

    def __init__(self, user_id: str, until_us: int, now: int) -> None:
        until = datetime.fromtimestamp(until_us / 1e6, UTC)
        seconds = max(1, math.ceil((until_us - now) / 1e6))
        super().__init__(
            403,
            f"User '{user_id}' is blocked until {until.isoformat()} after a critical abuse "
            "flag; an operator can lift the block.",
            "user_temporarily_blocked",
            headers=[
                (b"retry-after", str(seconds).encode()),
                (b"x-tokentill-blocked-until", until.isoformat().encode()),
            ],
        )


class QuotaExceededError(RequestRejectedError):
    """A hard limit would be passed: 429 in OpenAI's shape, with when it resets."""

    def __init__(
        self, subject: Subject, limit: Limit, current: Window, used: int, need: int, now: int
    ) -> None:
        who = f"user '{subject[1]}'" if subject[0] == "user" else f"tag {subject[1]}={subject[2]}"
        headers: list[tuple[bytes, bytes]] = [
            (b"x-tokentill-quota-unit", limit.unit.encode()),
            (b"x-tokentill-quota-period", limit.period.encode()),
        ]
        message = (
            f"Quota exceeded for {who}: {limit.describe(limit.amount)} per {limit.period}"
            if limit.period != "total"
            else f"Quota exceeded for {who}: {limit.describe(limit.amount)} in total"
        )
        message += f", {limit.describe(used)} used or reserved"
        if need:
            message += f", and this request may use up to {limit.describe(need)}"
            if limit.unit != "requests":
                message += " (a lower max_output_tokens may fit)"
        if current.end < FOREVER:
            reset = datetime.fromtimestamp(current.end / 1e6, UTC)
            seconds = max(1, math.ceil((current.end - now) / 1e6))
            headers += [
                (b"retry-after", str(seconds).encode()),
                (b"x-tokentill-quota-reset", reset.isoformat().encode()),
            ]
            message += f". It resets at {reset.isoformat()}."
        else:
            message += ". It does not reset."
        code = "user_quota_exceeded" if subject[0] == "user" else "tag_quota_exceeded"
        super().__init__(429, message, code, type_="insufficient_quota", headers=headers)
        self.subject, self.limit = subject, limit


@dataclass(frozen=True)
class QuotaConfig:
    tag_keys: tuple[str, ...] = ("project", "team", "feature", "customer")
    # Reserved output when a request states no bound of its own.
    output_cap: int = 16_384
    # Input tokens are reserved as body bytes / this (1: every token is at least a byte).
    input_bytes_per_token: int = 1
    image_tokens: int = 2_000
    # A previous_response_id not seen finishing since start.
    unknown_context_tokens: int = 8_192
    # A parked reservation (pending response) is charged its worst case after this.
    pending_max_seconds: float = 6 * 3600.0
    # Web search calls reserved for a request that offers the tool and states no
    # `max_tool_calls` of its own.
    tool_calls: int = 3
    # Counters kept in memory before the least recently used (idle this long, holding no
    # reservation) are spilled: read back from the warehouse if their subject returns.
    max_counters: int = 100_000
    spill_after: float = 60.0


class QuotaBook:
    """The limits, the live counters and the reservations (one per process)."""

    def __init__(
        self,
        config: QuotaConfig,
        prices: PriceBook,
        alert: Callable[[Alert], None],
        clock: Callable[[], int] = now_us,
    ) -> None:
        self.config = config
        self._clock = clock
        self.prices = prices  # replaced wholesale by a refresh
        self._alert = alert
        self._default: tuple[Limit, ...] = ()
        self._limits: dict[Subject, tuple[Limit, ...]] = {}
        self._meters: dict[Subject, Meter] = {}
        self._parked: dict[str, tuple[Reservation, float]] = {}
        self._context: OrderedDict[str, int] = OrderedDict()
        self._fired_before_start: set[str] = set()
        self._blocked: dict[str, int] = {}  # user id -> blocked until (µs)
        self._spill = SpillFilter()
        self._spill_month = 0
        self._tag_keys = frozenset(config.tag_keys)
        # Set when the counters are shared (quota_shared.py): admission's check and every
        # count go there, and this book keeps only the policy, the limits and the blocks.
        self.shared: SharedLedger | None = None

    # -- limits ---------------------------------------------------------------------------

    def set_limits(self, subject: Subject | None, limits: Sequence[Limit]) -> None:
        """Replace a subject's limits (None: the default for users); empty removes them."""
        if subject is None:
            self._default = tuple(limits)
        elif limits:
            self._limits[subject] = tuple(limits)
        else:
            self._limits.pop(subject, None)

    def limits_of(self, subject: Subject) -> tuple[tuple[Limit, ...], str]:
        """The limits a subject is held to, and where they come from (own, default, none)."""
        own = self._limits.get(subject)
        if own:
            return own, "own"
        if subject[0] == "user" and self._default:
            return self._default, "default"
        return (), "none"

    @property
    def default_limits(self) -> tuple[Limit, ...]:
        return self._default

    def subjects_with_limits(self) -> list[Subject]:
        return list(self._limits)

    def note_fired(self, keys: Iterable[str]) -> None:
        """Alerts already raised this period (read from the warehouse at start)."""
        self._fired_before_start.update(keys)

    # -- temporary blocks -----------------------------------------------------------------

    def block(self, user_id: str, until_us: int) -> None:
        self._blocked[user_id] = max(until_us, self._blocked.get(user_id, 0))

    def unblock(self, user_id: str) -> bool:
        return self._blocked.pop(user_id, None) is not None

    def replace_blocks(self, blocks: dict[str, int]) -> None:
        """The blocks as the shared store holds them (every proxy applies the same)."""
        self._blocked = dict(blocks)

    def blocks(self, now: int) -> dict[str, int]:
        """The blocks in force (expired ones are dropped)."""
        for user_id in [u for u, until in self._blocked.items() if until <= now]:
            del self._blocked[user_id]
        return dict(self._blocked)

    # -- the hot path ---------------------------------------------------------------------

    def plan(self, facts: QuotaRequest, parsed: dict[str, Any] | None, body: bytes) -> Reservation:
        """The request's worst case and the subjects it is held on, checked against
        nothing yet (a blocked user is refused here)."""
        now = facts.started_us
        if facts.user_id and self._blocked:
            until = self._blocked.get(facts.user_id)
            if until is not None and now < until:
                raise UserBlockedError(facts.user_id, until, now)
        subjects = self.subjects_of(facts, parsed)
        input_tokens = self._input_bound(parsed, body)
        if facts.endpoint == "realtime" and parsed is not None and parsed.get("type"):
            # A response on a Realtime socket reads the whole conversation so far, which
            # the proxy never sees in one piece.
            input_tokens += self.config.unknown_context_tokens
        output_tokens = self._output_bound(parsed, facts.endpoint)
        tier = parsed.get("service_tier") if parsed is not None else None
        model, tier_name = facts.requested_model, tier if isinstance(tier, str) else None
        worst = self.prices.worst_case(
            model,
            tier_name,
            input_tokens,
            output_tokens,
            media=facts.endpoint.startswith(("audio.", "images.", "realtime")),
            characters=facts.input_characters or 0,
        )
        calls = self._tool_calls(parsed)
        if worst is not None and calls:
            worst += calls * self.prices.web_search_rate(model, tier_name)
        tokens = input_tokens + output_tokens
        held = [
            subject
            for subject in subjects
            # no counters kept for the others (a limit added later reads the warehouse)
            if self._limits.get(subject) or (subject[0] == "user" and self._default)
        ]
        return Reservation(
            tuple(subjects),
            tuple(held),
            now,
            worst or 0,
            tokens,
            worst is None,
            retrievable=facts.store,
        )

    def admit(self, facts: QuotaRequest, parsed: dict[str, Any] | None, body: bytes) -> Reservation:
        """Check the request against the counters in memory, and reserve its worst case,
        or raise `QuotaExceededError`."""
        reservation = self.plan(facts, parsed, body)
        now, pico, tokens = reservation.started_us, reservation.pico, reservation.tokens
        for subject in reservation.held:
            limits = self._limits.get(subject) or self._default
            meter = self._meter(subject, now)
            reserved = meter.reserved
            for limit in limits:
                if limit.mode != "hard":
                    continue
                current = meter.windows[limit.period]
                if now >= current.end:
                    current = meter.current(limit.period, now)
                unit = limit.unit
                if unit == "usd":
                    used, need = current.used.pico + reserved.pico, pico
                elif unit == "tokens":
                    used, need = current.used.tokens + reserved.tokens, tokens
                else:
                    used, need = current.used.requests + reserved.requests, 1
                if used >= limit.amount or used + need > limit.amount:
                    raise QuotaExceededError(subject, limit, current, used, need, now)
        for subject in reservation.held:
            meter = self._meter(subject, now)
            meter.last_used_us = now
            reserved = meter.reserved
            reserved.pico += pico
            reserved.tokens += tokens
            reserved.requests += 1
        return reservation

    def subjects_of(self, facts: QuotaRequest, parsed: dict[str, Any] | None) -> list[Subject]:
        """The subjects a request counts for: its user, and its tags of the quota keys."""
        metadata = parsed.get("metadata") if parsed is not None else None
        return self._subjects(facts.user_id, metadata)

    def _subjects(self, user_id: str | None, metadata: Any) -> list[Subject]:
        subjects: list[Subject] = []
        if user_id:
            subjects.append(user_subject(user_id))
        if isinstance(metadata, dict):
            for key in self._tag_keys.intersection(metadata):
                value = metadata[key]
                if isinstance(value, str):
                    subjects.append(tag_subject(key, value))
        return subjects

    @property
    def has_spilled(self) -> bool:
        """Whether any counters were spilled this month (else no subject can be cold)."""
        return bool(self._spill)

    def spilled(self, subjects: Iterable[Subject]) -> list[Subject]:
        """Of `subjects`, those held to limits whose counters may have been spilled (see
        `evict_idle`): their usage must be read back from the warehouse before admission.
        A false positive of the filter costs one read, never a wrong count."""
        if not self._spill:
            return []
        return [
            s
            for s in subjects
            if s not in self._meters and s in self._spill and self.limits_of(s)[0]
        ]

    def revive(self, subject: Subject) -> int:
        """Counters anew for a spilled subject, from now (live counting starts here); the
        caller adds what the warehouse holds from before the returned moment."""
        now = self._clock()
        self._meters[subject] = Meter(now)
        return now

    def settle(self, event: UsageEvent, reservation: Reservation | None) -> None:
        """Count a journaled event: swap its request's reservation for its real cost."""
        if reservation is None:
            if event.kind == "create" and not event.is_pending and event.status != "error":
                # Admitted by no request of its own (a response the upstream started on
                # a Realtime socket, a transcription there): counted all the same. (An
                # error row without a reservation is a refusal of tokentill's own.)
                reservation = self._unreserved(event)
                if reservation is None:
                    return
            else:
                if event.kind != "update" or not event.response_id or event.is_pending:
                    return
                parked = self._parked.pop(event.response_id, None)
                if parked is not None:
                    reservation = parked[0]
                elif self.shared is None:
                    return  # a response created before this process started
                else:
                    # Parked by another proxy, or by one that died: charged here (once:
                    # the shared counters know each event they counted).
                    reservation = self._unreserved(event)
                    if reservation is None:
                        return
        if reservation.state == "done":
            return
        if event.is_pending:
            if (
                event.endpoint == "responses"
                and event.response_id
                and reservation.retrievable
                and reservation.state == "open"
            ):
                # Its outcome comes later (the poller, or a client's retrieve).
                reservation.state = "parked"
                self._parked[event.response_id] = (reservation, time.monotonic())
                if self.shared is not None:
                    self.shared.park(reservation)
                return
            if reservation.state == "parked":
                return  # still pending
            # Nobody can learn what it cost (a cut Chat Completion, a response never
            # stored): charge its worst case.
            self._charge(
                reservation, reservation.pico, reservation.tokens, reservation.unpriced, event
            )
            return
        cost = self.prices.cost(event)
        tokens = event.total_tokens or (event.input_tokens or 0) + (event.output_tokens or 0)
        self._charge(reservation, cost or 0, tokens, cost is None, event)
        if event.response_id and tokens:
            # What a response continuing this one will carry as context.
            self._context[event.response_id] = tokens
            if len(self._context) > 100_000:
                self._context.popitem(last=False)

    def _unreserved(self, event: UsageEvent) -> Reservation | None:
        """An empty reservation on the event's subjects, to charge it as any other (None:
        it counts for no subject)."""
        metadata = None
        if event.metadata and self._tag_keys:
            with contextlib.suppress(orjson.JSONDecodeError):
                metadata = orjson.loads(event.metadata)
        subjects = self._subjects(event.user_id, metadata)
        if not subjects:
            return None
        return Reservation(tuple(subjects), (), self._clock(), 0, 0, False, False)

    def release(self, reservation: Reservation) -> None:
        """The request ended with nothing recorded: drop its reservation, charge nothing."""
        if reservation.state != "open":
            return
        reservation.state = "done"
        if self.shared is not None:
            self.shared.release(reservation)
            return
        for subject in reservation.held:
            meter = self._meters.get(subject)
            if meter is not None:
                _unreserve(meter, reservation)

    def expire_parked(self) -> int:
        """Charge pending responses whose outcome never came their worst case."""
        cutoff = time.monotonic() - self.config.pending_max_seconds
        stale = [rid for rid, (_, since) in self._parked.items() if since < cutoff]
        for response_id in stale:
            reservation, _ = self._parked.pop(response_id)
            self._charge(
                reservation,
                reservation.pico,
                reservation.tokens,
                reservation.unpriced,
                # Charged once under the response's id: its outcome, if it comes after
                # all (another proxy's sweep), is then not charged again.
                counted_id=response_id,
            )
        return len(stale)

    def evict_idle(self) -> int:
        """Drop the counters that can only read zero from now on (see `Meter.idle_through`)
        and those of subjects with no limits any more. Past `max_counters`, spill the least
        recently used of the rest that hold no reservation and have been idle for
        `spill_after` (by then the warehouse has all their events): they are remembered in
        a fixed-size filter and read back from the warehouse if they return. Return how
        many counters were dropped or spilled."""
        now = self._clock()
        month = window("month", now)[0]
        if month != self._spill_month:
            self._spill.clear()  # every spilled window has ended with the month
            self._spill_month = month
        dropped = 0
        idle: list[tuple[int, Subject]] = []
        cutoff = now - int(self.config.spill_after * 1_000_000)
        for subject, meter in list(self._meters.items()):
            limits, _ = self.limits_of(subject)
            periods = {limit.period for limit in limits}
            if (not limits and not meter.reserved.requests) or (
                limits and meter.idle_through(periods, now)
            ):
                del self._meters[subject]
                dropped += 1
            elif (
                not meter.reserved.requests
                and meter.last_used_us < cutoff
                and "total" not in periods
            ):
                idle.append((meter.last_used_us, subject))
        excess = len(self._meters) - self.config.max_counters
        if excess > 0:
            idle.sort()
            for _, subject in idle[:excess]:
                del self._meters[subject]
                self._spill.add(subject)
                dropped += 1
        return dropped

    def reset_usage(self, subject: Subject | None) -> None:
        """Forget a subject's counted usage (None: every user held to the default) before a
        seed from the warehouse replaces it."""
        now = self._clock()
        for key, meter in self._meters.items():
            if key == subject or (subject is None and key[0] == "user" and key not in self._limits):
                meter.reset_usage(now)

    def counters(self) -> int:
        """How many subjects have counters in memory."""
        return len(self._meters)

    # -- reading --------------------------------------------------------------------------

    def show(self, subject: Subject, snapshot: Meter) -> None:
        """Shared counters: the snapshot `meter` returns (the API reads it right after)."""
        self._meters[subject] = snapshot

    def meter(self, subject: Subject, now: int | None = None) -> Meter:
        """A subject's counters to read (empty ones, not kept, when it has none): reading
        never creates counters, so a spilled subject stays known as spilled."""
        found = self._meters.get(subject)
        return found if found is not None else Meter(self._clock() if now is None else now)

    def parked(self) -> int:
        return len(self._parked)

    # -- seeding (start, and a limit added later) -----------------------------------------

    def seed(self, subject: Subject, period: Period, window_start: int, used: Usage) -> None:
        """Add what the warehouse holds from before a moment to a subject's window."""
        meter = self._meter(subject, self._clock())
        current = meter.windows[period]
        if current.start != window_start:
            return  # the window the seed was read for is over
        current.used.pico += used.pico
        current.used.tokens += used.tokens
        current.used.requests += used.requests
        current.used.unpriced += used.unpriced

    # -- internals ------------------------------------------------------------------------

    def _meter(self, subject: Subject, now: int) -> Meter:
        meter = self._meters.get(subject)
        if meter is None:
            meter = self._meters[subject] = Meter(now)
        return meter

    def _input_bound(self, parsed: dict[str, Any] | None, body: bytes) -> int:
        config = self.config
        bound = -(-len(body) // config.input_bytes_per_token)
        images = body.count(b'"input_image"') + body.count(b'"image_url"')
        bound += images * config.image_tokens
        if parsed is not None:
            previous = parsed.get("previous_response_id")
            if isinstance(previous, str):
                bound += self._context.get(previous, config.unknown_context_tokens)
            if parsed.get("conversation") is not None:
                bound += config.unknown_context_tokens
        return bound

    def _output_bound(self, parsed: dict[str, Any] | None, endpoint: str) -> int:
        if endpoint in ("embeddings", "moderations"):
            return 0  # input only
        cap = self.config.output_cap
        if parsed is None:
            return cap
        for name in ("max_output_tokens", "max_completion_tokens", "max_tokens"):
            value = parsed.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                cap = value
                break
        counted = ("chat.completions", "completions", "images.generations", "images.edits")
        choices = parsed.get("n") if endpoint in counted else None
        if isinstance(choices, int) and not isinstance(choices, bool) and choices > 1:
            cap *= choices
        return cap

    def _charge(
        self,
        reservation: Reservation,
        cost: int,
        tokens: int,
        unpriced: bool,
        event: UsageEvent | None = None,
        counted_id: str | None = None,
    ) -> None:
        reservation.state = "done"
        if self.shared is not None:
            self.shared.charge(reservation, cost, tokens, unpriced, event, counted_id)
            return
        now = self._clock()
        for subject in reservation.held:
            meter = self._meters.get(subject)
            if meter is not None:
                _unreserve(meter, reservation)
        for subject in reservation.subjects:
            if not self.limits_of(subject)[0]:
                continue  # no limits (any more): nothing counted in memory
            meter = self._meter(subject, now)
            meter.add(reservation.started_us, now, cost, tokens, int(unpriced))
            self._check_thresholds(subject, meter, now)

    def _tool_calls(self, parsed: dict[str, Any] | None) -> int:
        """Web search calls to reserve: `max_tool_calls` when the request states it, else
        `tool_calls`, for a request that offers the tool (each call is billed)."""
        if parsed is None:
            return 0
        tools = parsed.get("tools")
        if not isinstance(tools, list) or not any(
            isinstance(t, dict) and str(t.get("type", "")).startswith("web_search") for t in tools
        ):
            return 0
        stated = parsed.get("max_tool_calls")
        if isinstance(stated, int) and not isinstance(stated, bool) and stated >= 0:
            return stated
        return self.config.tool_calls

    def _check_thresholds(self, subject: Subject, meter: Meter, now: int) -> None:
        limits, _ = self.limits_of(subject)
        for limit in limits:
            current = meter.current(limit.period, now)
            for key, alert in self.crossed(subject, limit, current):
                if key in current.fired:
                    continue
                current.fired.add(key)
                self._alert(alert)

    def crossed(self, subject: Subject, limit: Limit, current: Window) -> list[tuple[str, Alert]]:
        """The thresholds of `limit` that `current`'s use has reached, with their alerts
        (keyed by window: raised once per window), those raised before start left out."""
        used = current.used.of(limit.unit)
        found: list[tuple[str, Alert]] = []
        if used <= 0:
            return found
        for threshold in THRESHOLDS:
            if used * 100 < threshold * limit.amount:
                break
            key = (
                f"quota:{subject_label(subject)}:{limit.unit}:{limit.period}:"
                f"{current.start}:{threshold}"
            )
            if key not in self._fired_before_start:
                found.append((key, _threshold_alert(key, subject, limit, current, used, threshold)))
        return found

    def raise_alert(self, alert: Alert) -> None:
        self._alert(alert)


class SpillFilter:
    """The subjects whose counters were spilled, as a Bloom filter of fixed size (8 MiB,
    4 hashes: about one false positive in 100,000 at a million subjects)."""

    _BITS = 1 << 26

    def __init__(self) -> None:
        self._bits = bytearray(self._BITS // 8)
        self._count = 0

    def _positions(self, subject: Subject) -> list[int]:
        digest = hashlib.blake2b("\0".join(subject).encode(), digest_size=16).digest()
        return [int.from_bytes(digest[i : i + 4], "little") % self._BITS for i in (0, 4, 8, 12)]

    def add(self, subject: Subject) -> None:
        for bit in self._positions(subject):
            self._bits[bit >> 3] |= 1 << (bit & 7)
        self._count += 1

    def __contains__(self, subject: object) -> bool:
        if not self._count or not isinstance(subject, tuple):
            return False
        return all(self._bits[bit >> 3] & (1 << (bit & 7)) for bit in self._positions(subject))

    def __bool__(self) -> bool:
        return self._count > 0

    def clear(self) -> None:
        if self._count:
            self._bits = bytearray(self._BITS // 8)
            self._count = 0


def _unreserve(meter: Meter, reservation: Reservation) -> None:
    reserved = meter.reserved
    reserved.pico -= reservation.pico
    reserved.tokens -= reservation.tokens
    reserved.requests -= 1


def _threshold_alert(
    key: str, subject: Subject, limit: Limit, current: Window, used: int, threshold: int
) -> Alert:
    severity: Severity = "info" if threshold < 80 else "warning" if threshold < 100 else "critical"
    if threshold >= 100 and limit.mode == "soft":
        severity = "warning"
    what = f"{limit.unit}/{limit.period}"
    kind = "soft" if limit.mode == "soft" else "hard"
    message = (
        f"{subject_label(subject)} has used {threshold}% or more of its {kind} limit of "
        f"{limit.describe(limit.amount)} per {limit.period}: {limit.describe(used)}"
    )
    if threshold >= 100:
        message += (
            " (requests are now refused)" if limit.mode == "hard" else " (soft: not enforced)"
        )
    end = None if current.end >= FOREVER else datetime.fromtimestamp(current.end / 1e6, UTC)
    return Alert(
        dedupe_key=key,
        kind="quota_threshold",
        rule=f"{what} {threshold}%",
        severity=severity,
        message=message,
        user_id=subject[1] if subject[0] == "user" else None,
        subject=subject_label(subject),
        window_start=datetime.fromtimestamp(current.start / 1e6, UTC),
        window_end=end,
        evidence={
            "unit": limit.unit,
            "period": limit.period,
            "mode": limit.mode,
            "limit": str(usd(limit.amount)) if limit.unit == "usd" else limit.amount,
            "used": str(usd(used)) if limit.unit == "usd" else used,
            "threshold_percent": threshold,
        },
    )
