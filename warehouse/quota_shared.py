"""Quota counters shared by every instance, in Redis: the same policy as one process's book
(warehouse/quota_book.py decides what a request may cost and on whom), with the counters,
the reservations and the blocks kept where every proxy sees them.

Admission and settlement are each one Lua script, so they are atomic across proxies:
`admit` checks every hard limit of every subject the request counts for against used +
reserved + this request's worst case, and reserves it, or refuses; `settle` swaps a
reservation for the real cost. The bound on overshoot of one process therefore holds for
any number of proxies, unchanged.

Keys (one Redis, or a primary with replicas; not Redis Cluster: the scripts name keys
from their arguments):

- `tt:q:alive` {gen, since}: the dataset's generation. A Redis that restarted empty has
  none, so a new one begins, and every counter is rebuilt from the lake.
- `tt:q:{gen}:u:{subject}:{period}:{window start}` {since, seeded, pico, tokens, requests,
  unpriced}: a window's use. An event counts here live when it was recorded at or after
  `since`; the lake supplies (once, `seeded`) what was recorded before. Every event is on
  exactly one side of `since`, by the `recorded_at` stored with it.
  A window opens `since` the moment it opened, and its first admission reads the lake for
  what came before (`seed`), once every proxy's writer has committed past that moment
  (`tt:q:mark:{instance}`). After a subject's first seed, `tt:q:{gen}:s:{subject}` says
  since when all its events are counted live: its next windows open seeded, with no read.
- `tt:q:{gen}:r|rz|rh:{subject}`: reserved totals, and each reservation with its expiry
  (a proxy that dies leaves reservations that lapse, never counters that drift).
- `tt:q:counted:{event id}`: an event is charged once, whoever settles it.
- `tt:q:limits` (a version: every instance reloads the limits from the warehouse when it
  changes), `tt:q:blocks` {user: until}.

Money in the scripts: Lua's numbers are doubles (exact to 2^53, $9,007 in pico-dollars),
so amounts travel as decimal strings, are stored by HINCRBY (exact 64-bit integers: $9.2M
per window) and compared as two limbs of nine digits.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from tokentill.warehouse.alerts import Alert
from tokentill.warehouse.events import UsageEvent, now_us
from tokentill.warehouse.openai_errors import RequestRejectedError
from tokentill.warehouse.quota_book import (
    BURN_MINUTES,
    Meter,
    QuotaBook,
    QuotaExceededError,
    Reservation,
    Usage,
    Window,
)
from tokentill.warehouse.quota_rules import (
    FOREVER,
    PERIODS,
    Limit,
    Period,
    Subject,
    subject_label,
    window,
)

log = logging.getLogger(__name__)

PREFIX = "tt:q"
_US_MINUTE = 60_000_000
_DAY_MS = 86_400_000
_ALIVE = f"{PREFIX}:alive"
LIMITS_VERSION = f"{PREFIX}:limits"
BLOCKS = f"{PREFIX}:blocks"
MARKS = f"{PREFIX}:marks"  # {instance: "<mark µs>:<published µs>"}
_MARK_STALE_US = 5_000_000  # a mark not published for this long: its proxy is gone

_LUA_COMMON = r"""
local P = 'tt:q'
local B = 1000000000
local function big(s)
  s = tostring(s or '0')
  local neg = false
  if string.sub(s, 1, 1) == '-' then neg = true; s = string.sub(s, 2) end
  local n = #s
  local hi, lo
  if n <= 9 then hi, lo = 0, tonumber(s) else
    hi, lo = tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8)) end
  if neg then return {-hi, -lo} end
  return {hi, lo}
end
local function add(a, b)
  local hi, lo = a[1] + b[1], a[2] + b[2]
  while lo >= B do lo = lo - B; hi = hi + 1 end
  while lo < 0 and hi > 0 do lo = lo + B; hi = hi - 1 end
  return {hi, lo}
end
local function gte(a, b) return a[1] > b[1] or (a[1] == b[1] and a[2] >= b[2]) end
local function gen_of(now)
  local alive = redis.call('HMGET', 'tt:q:alive', 'gen', 'since')
  if not alive[1] then
    redis.call('HSET', 'tt:q:alive', 'gen', now, 'since', now)
    return now
  end
  return alive[1]
end
local function drop(gen, label, id)
  local pre = P .. ':' .. gen
  local held = redis.call('HGET', pre .. ':rh:' .. label, id)
  redis.call('ZREM', pre .. ':rz:' .. label, id)
  if not held then return false end
  local sep = string.find(held, ':', 1, true)
  local pico, tokens = string.sub(held, 1, sep - 1), string.sub(held, sep + 1)
  local r = pre .. ':r:' .. label
  if pico ~= '0' then redis.call('HINCRBY', r, 'pico', '-' .. pico) end
  if tokens ~= '0' then redis.call('HINCRBY', r, 'tokens', '-' .. tokens) end
  redis.call('HINCRBY', r, 'requests', -1)
  redis.call('HDEL', pre .. ':rh:' .. label, id)
  return true
end
local function purge(gen, label, now)
  local expired = redis.call('ZRANGEBYSCORE', P .. ':' .. gen .. ':rz:' .. label, '-inf', now)
  for _, id in ipairs(expired) do drop(gen, label, id) end
end
-- A window's key, opened if missing: seeded since its start when the subject has been
-- counted live since before it began (its `s` key), or else since `now`, to be seeded.
-- Returns key, since, seeded.
local function open(gen, label, period, wstart, expire_at, now)
  local key = P .. ':' .. gen .. ':u:' .. label .. ':' .. period .. ':' .. wstart
  local found = redis.call('HMGET', key, 'since', 'seeded')
  if found[1] then return key, found[1], found[2] == '1' end
  local since, seeded = now, '0'
  local live = redis.call('GET', P .. ':' .. gen .. ':s:' .. label)
  if live and tonumber(live) <= tonumber(wstart) then since, seeded = wstart, '1' end
  redis.call('HSET', key, 'since', since, 'seeded', seeded)
  if expire_at ~= '0' then redis.call('PEXPIREAT', key, expire_at)
  else redis.call('PEXPIRE', key, 1000 * 86400 * 400) end  -- `total`: then read again
  return key, since, seeded == '1'
end
"""

# ARGV: now, rid, expire_at (µs), pico, tokens, n subjects, the reservation keys' lifetime
# (ms); per subject: label, n checks; per check: period, window start, key expiry (ms),
# unit, amount, hard (1: checked; 0: a soft limit's window, opened and read all the same).
_ADMIT = (
    _LUA_COMMON
    + r"""
local now, rid, exp, pico, tokens = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local gen = gen_of(now)
local i = 8
local labels, seed = {}, {}
local over = nil
for s = 1, tonumber(ARGV[6]) do
  local label, checks = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  purge(gen, label, now)
  local reserved = redis.call('HMGET', P .. ':' .. gen .. ':r:' .. label,
    'pico', 'tokens', 'requests')
  for c = 1, checks do
    local period, wstart, expire_at, unit, amount, hard =
      ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
    i = i + 6
    local key, since, seeded = open(gen, label, period, wstart, expire_at, now)
    if not seeded then
      table.insert(seed, s); table.insert(seed, period); table.insert(seed, wstart)
      table.insert(seed, since)
    elseif hard == '1' and not over and #seed == 0 then
      local field, held, need = 'requests', reserved[3], '1'
      if unit == 'usd' then field, held, need = 'pico', reserved[1], pico
      elseif unit == 'tokens' then field, held, need = 'tokens', reserved[2], tokens end
      local used = redis.call('HGET', key, field)
      local total = add(big(used), big(held))
      local limit = big(amount)
      if gte(total, limit) or not gte(limit, add(total, big(need))) then
        local shown = tostring(total[2])
        if total[1] > 0 then shown = tostring(total[1]) .. string.format('%09d', total[2]) end
        over = {'over', s, c, shown}
      end
    end
  end
  table.insert(labels, label)
end
if #seed > 0 then
  table.insert(seed, 1, gen); table.insert(seed, 1, 'seed')
  return seed
end
if rid == '' then return {'ok', gen} end  -- a probe: windows opened, nothing reserved
if over then return over end
for _, label in ipairs(labels) do
  local pre = P .. ':' .. gen
  redis.call('ZADD', pre .. ':rz:' .. label, exp, rid)
  redis.call('HSET', pre .. ':rh:' .. label, rid, pico .. ':' .. tokens)
  local r = pre .. ':r:' .. label
  if pico ~= '0' then redis.call('HINCRBY', r, 'pico', pico) end
  if tokens ~= '0' then redis.call('HINCRBY', r, 'tokens', tokens) end
  redis.call('HINCRBY', r, 'requests', 1)
  for _, k in ipairs({r, pre .. ':rz:' .. label, pre .. ':rh:' .. label}) do
    redis.call('PEXPIRE', k, ARGV[7])
  end
end
return {'ok', gen}
"""
)

# ARGV: now, rid, counted key ('' for none), cost, tokens, unpriced, started, recorded,
# n subjects; per subject: label, held (0/1), n windows; per window: period, window start,
# key expiry (ms). Returns: counted (0: a duplicate), then per
# window its pico, tokens, requests after this event.
_SETTLE = (
    _LUA_COMMON
    + r"""
local now, rid, counted = ARGV[1], ARGV[2], ARGV[3]
local cost, tokens, unpriced = ARGV[4], ARGV[5], ARGV[6]
local started, recorded = tonumber(ARGV[7]), tonumber(ARGV[8])
local gen = gen_of(now)
local fresh = true
if counted ~= '' then
  fresh = redis.call('SET', counted, '1', 'NX', 'PX', ARGV[10]) ~= false
end
local out = {fresh and 1 or 0}
local i = 11
local minute = tostring(math.floor(tonumber(now) / 60000000))
for s = 1, tonumber(ARGV[9]) do
  local label, held, windows = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  i = i + 3
  if held == '1' then drop(gen, label, rid) end
  for w = 1, windows do
    local period, wstart, expire_at = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    i = i + 3
    local key, since = open(gen, label, period, wstart, expire_at, now)
    if fresh and started >= tonumber(wstart) and recorded >= tonumber(since) then
      if cost ~= '0' then redis.call('HINCRBY', key, 'pico', cost) end
      if tokens ~= '0' then redis.call('HINCRBY', key, 'tokens', tokens) end
      redis.call('HINCRBY', key, 'requests', 1)
      if unpriced == '1' then redis.call('HINCRBY', key, 'unpriced', 1) end
    end
    local now_used = redis.call('HMGET', key, 'pico', 'tokens', 'requests')
    table.insert(out, now_used[1] or '0'); table.insert(out, now_used[2] or '0')
    table.insert(out, now_used[3] or '0')
  end
  if windows > 0 then
    redis.call('PEXPIRE', P .. ':' .. gen .. ':s:' .. label, ARGV[10])
  end
  if fresh and windows > 0 then
    local burn = P .. ':' .. gen .. ':b:' .. label .. ':' .. minute
    if cost ~= '0' then redis.call('HINCRBY', burn, 'pico', cost) end
    if tokens ~= '0' then redis.call('HINCRBY', burn, 'tokens', tokens) end
    redis.call('HINCRBY', burn, 'requests', 1)
    redis.call('PEXPIRE', burn, 1000 * 60 * 16)
  end
end
return out
"""
)

# ARGV: now, rid, expire_at or '' (release), labels...: release a reservation, or move its
# expiry (a response parked until its outcome arrives).
_HOLD = (
    _LUA_COMMON
    + r"""
local now, rid, exp = ARGV[1], ARGV[2], ARGV[3]
local gen = gen_of(now)
for i = 4, #ARGV do
  if exp == '' then drop(gen, ARGV[i], rid)
  else redis.call('ZADD', P .. ':' .. gen .. ':rz:' .. ARGV[i], 'XX', exp, rid) end
end
return 1
"""
)

# ARGV: gen, label, period, window start, since, pico, tokens, requests, unpriced, the
# subject's `s` key lifetime (ms): add
# what the lake holds from before `since`, once (the first seeder of that `since`).
_SEED = r"""
local gen, label, period, wstart, since = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if redis.call('HGET', 'tt:q:alive', 'gen') ~= gen then return -1 end
local key = 'tt:q:' .. gen .. ':u:' .. label .. ':' .. period .. ':' .. wstart
local found = redis.call('HMGET', key, 'since', 'seeded')
if found[1] ~= since or found[2] == '1' then return 0 end
if ARGV[6] ~= '0' then redis.call('HINCRBY', key, 'pico', ARGV[6]) end
if ARGV[7] ~= '0' then redis.call('HINCRBY', key, 'tokens', ARGV[7]) end
if ARGV[8] ~= '0' then redis.call('HINCRBY', key, 'requests', ARGV[8]) end
if ARGV[9] ~= '0' then redis.call('HINCRBY', key, 'unpriced', ARGV[9]) end
redis.call('HSET', key, 'seeded', '1')
-- From `since` on, every event of the subject is counted live: its later windows open
-- seeded (no read) for as long as this holds (a limit change or a restart forgets it).
redis.call('SET', 'tt:q:' .. gen .. ':s:' .. label, since, 'NX', 'PX', ARGV[10])
return 1
"""

# ARGV: now, label, n, then per window: period, window start; returns reserved totals then
# per window pico, tokens, requests, unpriced, then per burn minute pico, tokens, requests.
_READ = (
    _LUA_COMMON
    + r"""
local now, label = ARGV[1], ARGV[2]
local gen = gen_of(now)
purge(gen, label, now)
local pre = P .. ':' .. gen
local out = {}
local r = redis.call('HMGET', pre .. ':r:' .. label, 'pico', 'tokens', 'requests')
for j = 1, 3 do table.insert(out, r[j] or '0') end
local i = 4
for w = 1, tonumber(ARGV[3]) do
  local got = redis.call('HMGET', pre .. ':u:' .. label .. ':' .. ARGV[i] .. ':' .. ARGV[i + 1],
    'pico', 'tokens', 'requests', 'unpriced')
  for j = 1, 4 do table.insert(out, got[j] or '0') end
  i = i + 2
end
local minute = math.floor(tonumber(now) / 60000000)
for m = minute - 14, minute do
  local got = redis.call('HMGET', pre .. ':b:' .. label .. ':' .. tostring(m),
    'pico', 'tokens', 'requests')
  for j = 1, 3 do table.insert(out, got[j] or '0') end
end
return out
"""
)


class QuotaStoreUnavailableError(RequestRejectedError):
    """Redis cannot be reached and the operator chose to refuse (`quota_redis_outage`)."""

    def __init__(self) -> None:
        super().__init__(
            503,
            "Quota counters are unavailable (tokentill cannot reach its Redis); this "
            "request is held to a limit and is refused until they are back. Retry shortly.",
            "quota_store_unavailable",
            type_="server_error",
            headers=[(b"retry-after", b"1")],
        )


@dataclass(frozen=True)
class Unseeded:
    """A window opened since `since`: the lake must supply what came before."""

    subject: Subject
    period: Period
    window_start: int
    since: int


class NeedsSeedError(Exception):
    def __init__(self, gen: str, windows: list[Unseeded]) -> None:
        super().__init__(f"{len(windows)} windows to seed")
        self.gen, self.windows = gen, windows


def _expiry_ms(end: int) -> str:
    """A window's key outlives its window by a minute (then it can only read zero)."""
    if end >= FOREVER:
        return "0"
    return str(end // 1000 + 60_000)


def _window_args(period: Period, now: int) -> list[str]:
    start, end = window(period, now)
    return [period, str(start), _expiry_ms(end)]


def _periods(limits: Iterable[Limit]) -> list[Period]:
    """The periods of `limits`, each once, in order."""
    return list(dict.fromkeys(limit.period for limit in limits))


def _window_key(gen: str, subject: Subject, period: str, start: int) -> str:
    """A window's key, as the scripts' `open` names it."""
    return f"{PREFIX}:{gen}:u:{subject_label(subject)}:{period}:{start}"


def _seeding_key(gen: str, found: Unseeded) -> str:
    """The claim of the process that reads `found` from the lake."""
    label = subject_label(found.subject)
    return f"{PREFIX}:{gen}:seeding:{label}:{found.period}:{found.since}"


@dataclass
class _Charge:
    reservation: Reservation
    cost: int
    tokens: int
    unpriced: bool
    counted: str  # the idempotency key ('' when it has none)
    recorded_us: int
    windows: list[tuple[Subject, list[Limit]]]


class SharedCounters:
    """The book's ledger in Redis. Admission is awaited by the proxy (a request held to a
    limit waits one round trip); settlement and releases are queued and sent beside the
    hot path, in order, retried while Redis is away."""

    def __init__(
        self,
        client: aioredis.Redis,
        book: QuotaBook,
        *,
        instance_id: str,
        open_for_seconds: float,
        pending_max_seconds: float,
        queue_max: int = 100_000,
        clock: Callable[[], int] = now_us,
    ) -> None:
        self._client = client
        self._clock = clock
        self._book = book
        self._instance = instance_id
        self._open_us = int(open_for_seconds * 1_000_000)
        self._pending_us = int(pending_max_seconds * 1_000_000)
        # How long an event is remembered as charged (a second settlement of it, by a
        # sweep or an expired reservation, comes within a pending response's lifetime),
        # and how long a subject stays known as counted live with no use.
        self._counted_ms = str(int(pending_max_seconds * 1000) + _DAY_MS)
        self._admit = client.register_script(_ADMIT)
        self._settle = client.register_script(_SETTLE)
        self._hold = client.register_script(_HOLD)
        self._seed = client.register_script(_SEED)
        self._read = client.register_script(_READ)
        self._queue: collections.deque[tuple[str, Any]] = collections.deque()
        self._queue_max = queue_max
        self._wake = asyncio.Event()
        self.up = True
        self.errors = 0
        self.dropped = 0
        self.on_unavailable: Callable[[BaseException], None] | None = None
        self._fired: set[str] = set()  # threshold alerts known raised (keys hold the window)

    # -- admission (awaited by the proxy) -------------------------------------------------

    async def admit(self, reservation: Reservation, probe: bool = False) -> str:
        """Reserve `reservation` on its held subjects, or raise `QuotaExceededError`, or
        `NeedsSeedError` (windows to read from the lake first). Returns the generation.
        `probe`: only open the windows (raising `NeedsSeedError` as admission would)."""
        if not probe:
            reservation.key = reservation.key or uuid.uuid4().hex
        now = self._clock()
        checks: list[tuple[Subject, list[Limit]]] = []
        args: list[str] = [
            str(now),
            reservation.key,
            str(now + self._open_us),
            str(reservation.pico),
            str(reservation.tokens),
            str(len(reservation.held)),
            self._counted_ms,
        ]
        for subject in reservation.held:
            # Every limit's window is opened (and read from the lake when new): a soft
            # limit's counts too, for its alerts and the API; only hard ones refuse.
            limits = list(self._book.limits_of(subject)[0])
            checks.append((subject, limits))
            args += [subject_label(subject), str(len(limits))]
            for limit in limits:
                args += _window_args(limit.period, now)
                args += [limit.unit, str(limit.amount), "1" if limit.mode == "hard" else "0"]
        answer = await self._call(self._admit, args)
        kind = _text(answer[0])
        if kind == "ok":
            return _text(answer[1])
        if kind == "seed":
            gen, rest = _text(answer[1]), answer[2:]
            windows = [
                Unseeded(
                    checks[int(rest[i]) - 1][0],
                    _text(rest[i + 1]),  # type: ignore[arg-type]
                    int(rest[i + 2]),
                    int(rest[i + 3]),
                )
                for i in range(0, len(rest), 4)
            ]
            raise NeedsSeedError(gen, windows)
        subject, limits = checks[int(answer[1]) - 1]
        chosen = limits[int(answer[2]) - 1]
        used = int(_text(answer[3]))
        need = Usage(reservation.pico, reservation.tokens, 1).of(chosen.unit)
        start, end = window(chosen.period, now)
        raise QuotaExceededError(subject, chosen, Window(start, end), used, need, now)

    async def seed(self, gen: str, found: Unseeded, used: Usage) -> bool:
        """Add the lake's count of `found` (once). False: the generation changed."""
        answer = await self._call(
            self._seed,
            [
                gen,
                subject_label(found.subject),
                found.period,
                str(found.window_start),
                str(found.since),
                str(used.pico),
                str(used.tokens),
                str(used.requests),
                str(used.unpriced),
                self._counted_ms,
            ],
        )
        return int(answer) >= 0

    async def claim_seed(self, gen: str, found: Unseeded) -> bool:
        """Whether this process reads `found` from the lake (else another one does)."""
        claim = self._client.set(_seeding_key(gen, found), "1", nx=True, px=30_000)
        return bool(await self._call_plain(claim))

    async def unclaim_seed(self, gen: str, found: Unseeded) -> None:
        """A claimed read that failed: let another process (or the next admission) read it."""
        await self._client.delete(_seeding_key(gen, found))

    async def wait_seeded(self, gen: str, found: Unseeded, seconds: float) -> None:
        """Until another process's seed of `found` lands (or `seconds` pass: the caller's
        admission then finds it unseeded again, and claims it once the claim lapses)."""
        key = _window_key(gen, found.subject, found.period, found.window_start)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if await self._call_plain(self._client.hget(key, "seeded")) in (b"1", "1", None):
                return  # seeded, or gone (a new generation: admission will say)
            await asyncio.sleep(0.02)

    async def writers_past(self, since: int) -> bool:
        """Whether every live proxy's writer has committed what it recorded before `since`
        (one hash of marks, never a scan of the keyspace)."""
        marks = await self._call_plain(self._client.hgetall(MARKS))
        fresh_after = self._clock() - _MARK_STALE_US
        for instance, value in marks.items():
            mark, published = (int(x) for x in _text(value).split(":"))
            if published < fresh_after:
                await self._client.hdel(MARKS, instance)  # its proxy stopped publishing
            elif mark < since:
                return False
        return True

    async def publish_mark(self, mark_us: int) -> None:
        value = f"{mark_us}:{self._clock()}"
        await self._call_plain(self._client.hset(MARKS, self._instance, value))

    # -- settlement (queued) --------------------------------------------------------------

    def charge(
        self,
        reservation: Reservation,
        cost: int,
        tokens: int,
        unpriced: bool,
        event: UsageEvent | None,
        counted_id: str | None = None,
    ) -> None:
        windows = []
        for subject in reservation.subjects:
            limits = list(self._book.limits_of(subject)[0])
            if limits or subject in reservation.held:
                windows.append((subject, limits))
        if not windows:
            return
        if event is not None:
            counted = f"{PREFIX}:counted:{event.event_id}"
            recorded = event.recorded_at_us or self._clock()
        else:
            once = counted_id or reservation.key
            counted = f"{PREFIX}:counted:{once}" if once else ""
            recorded = self._clock()
        self._put(
            "charge", _Charge(reservation, cost, tokens, unpriced, counted, recorded, windows)
        )

    def release(self, reservation: Reservation) -> None:
        if reservation.held and reservation.key:
            self._put("hold", (reservation, ""))

    def park(self, reservation: Reservation) -> None:
        if reservation.held and reservation.key:
            self._put("hold", (reservation, str(self._clock() + self._pending_us)))

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _put(self, kind: str, item: Any) -> None:
        if len(self._queue) >= self._queue_max:
            self._queue.popleft()
            self.dropped += 1
            log.error(
                "quota: %d settlements waited for Redis; the oldest was dropped", self._queue_max
            )
        self._queue.append((kind, item))
        self._wake.set()

    async def run(self) -> None:
        """Send queued settlements in order, up to 64 in one round trip (a pipeline);
        while Redis is away, keep them and retry."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = list(itertools.islice(self._queue, 64))
                now = self._clock()
                try:
                    pipe = self._client.pipeline(transaction=False)
                    for kind, item in batch:
                        if kind == "charge":
                            args = self._charge_args(item, now)
                            await self._settle(keys=[], args=args, client=pipe)  # queued
                        else:
                            reservation, expire = item
                            args = [str(now), reservation.key, expire]
                            args += [subject_label(s) for s in reservation.held]
                            await self._hold(keys=[], args=args, client=pipe)  # queued
                    answers = await self._call_plain(pipe.execute(raise_on_error=False))
                except RedisError:
                    await asyncio.sleep(0.5)
                    continue
                except Exception:
                    # Not Redis's: retrying would fail the same way. Dropped, and said.
                    log.exception("quota: %d settlements could not be sent", len(batch))
                    for _ in batch:
                        self._queue.popleft()
                    self.dropped += len(batch)
                    continue
                for (kind, item), answer in zip(batch, answers, strict=True):
                    self._queue.popleft()
                    if isinstance(answer, Exception):
                        log.error("quota: a settlement was refused by Redis: %s", answer)
                        self.dropped += 1
                    elif kind == "charge":
                        try:
                            await self._settled(item, answer, now)
                        except RedisError:
                            pass  # an alert's once-only mark: the next settlement retries
                        except Exception:
                            log.exception("quota: a settlement's alerts failed")

    async def drain(self, seconds: float) -> bool:
        """Wait until the queue is sent (shutdown, tests), for at most `seconds`."""
        deadline = time.monotonic() + seconds
        while self._queue:
            if time.monotonic() > deadline:
                log.warning(
                    "quota: %d settlements did not reach Redis before the stop; their events "
                    "are in the warehouse, and a window read from it again counts them",
                    len(self._queue),
                )
                return False
            await asyncio.sleep(0.01)
        return True

    def _charge_args(self, item: _Charge, now: int) -> list[str]:
        reservation = item.reservation
        args: list[str] = [
            str(now),
            reservation.key,
            item.counted,
            str(item.cost),
            str(item.tokens),
            "1" if item.unpriced else "0",
            str(reservation.started_us),
            str(item.recorded_us),
            str(len(item.windows)),
            self._counted_ms,
        ]
        for subject, limits in item.windows:
            periods = _periods(limits)
            held = "1" if subject in reservation.held and reservation.key else "0"
            args += [subject_label(subject), held, str(len(periods))]
            for period in periods:
                args += _window_args(period, now)
        return args

    async def _settled(self, item: _Charge, answer: Any, now: int) -> None:
        """A charge's answer: the windows' use after it, for threshold alerts."""
        if not int(answer[0]):
            return  # charged already (another proxy settled the same event)
        at = 1
        for subject, limits in item.windows:
            periods = _periods(limits)
            used: dict[Period, Usage] = {}
            for period in periods:
                pico, tokens, requests = (int(_text(x)) for x in answer[at : at + 3])
                used[period] = Usage(pico, tokens, requests)
                at += 3
            await self._thresholds(subject, limits, used, now)

    async def _thresholds(
        self, subject: Subject, limits: Sequence[Limit], used: dict[Period, Usage], now: int
    ) -> None:
        """Threshold alerts, raised once across instances (the first to cross it)."""
        for limit in limits:
            start, end = window(limit.period, now)
            for key, alert in self._book.crossed(
                subject, limit, Window(start, end, used[limit.period])
            ):
                if key in self._fired:
                    continue  # seen fired here (by this process or another)
                ttl = 86_400_000 if end >= FOREVER else max(60_000, (end - now) // 1000 + 60_000)
                if await self._client.set(f"{PREFIX}:fired:{key}", "1", nx=True, px=ttl):
                    self._book.raise_alert(alert)
                if len(self._fired) > 100_000:
                    self._fired.clear()
                self._fired.add(key)

    # -- reading and limits ---------------------------------------------------------------

    async def meter(self, subject: Subject, limits: Iterable[Limit]) -> Meter:
        """A subject's counters as the API shows them (a snapshot, not kept)."""
        now = self._clock()
        periods = _periods(limits)
        args = [str(now), subject_label(subject), str(len(periods))]
        for period in periods:
            args += [period, str(window(period, now)[0])]
        answer = [int(_text(x)) for x in await self._call(self._read, args)]
        meter = Meter(now)
        meter.reserved = Usage(answer[0], answer[1], answer[2])
        at = 3
        for period in periods:
            start, end = window(period, now)
            meter.windows[period] = Window(start, end, Usage(*answer[at : at + 4]))
            at += 4
        minute = now // _US_MINUTE
        for m in range(minute - BURN_MINUTES + 1, minute + 1):
            pico, tokens, requests = answer[at : at + 3]
            at += 3
            if requests:
                meter.recent.append((m, Usage(pico, tokens, requests)))
        meter.born_us = now - BURN_MINUTES * _US_MINUTE
        return meter

    async def forget(self, subject: Subject | None) -> None:
        """A subject's limits changed: its windows are read from the lake again (None: every
        user's, the default changed). Then every instance reloads the limits."""
        if subject is None:
            # Every user's windows: a new generation (all counters are read again, lazily,
            # and the old generation's keys expire). A rare, deliberate change.
            await self._call_plain(self._client.delete(_ALIVE))
        else:
            alive = await self._call_plain(self._client.hget(_ALIVE, "gen"))
            if alive is not None:
                # Its current windows (older ones are over, and expire) and its mark of
                # being counted live.
                gen, now = _text(alive), self._clock()
                keys = [f"{PREFIX}:{gen}:s:{subject_label(subject)}"]
                keys += [_window_key(gen, subject, p, window(p, now)[0]) for p in PERIODS]
                await self._call_plain(self._client.delete(*keys))
        await self._call_plain(self._client.incr(LIMITS_VERSION))

    async def limits_version(self) -> int:
        found = await self._call_plain(self._client.get(LIMITS_VERSION))
        return int(found or 0)

    async def blocks(self) -> dict[str, int]:
        found = await self._call_plain(self._client.hgetall(BLOCKS))
        return {_text(user): int(until) for user, until in found.items()}

    async def block(self, user_id: str, until_us: int) -> None:
        current = await self._call_plain(self._client.hget(BLOCKS, user_id))
        if current is None or int(current) < until_us:
            await self._call_plain(self._client.hset(BLOCKS, user_id, str(until_us)))

    async def unblock(self, user_id: str) -> bool:
        return bool(await self._call_plain(self._client.hdel(BLOCKS, user_id)))

    async def prune_blocks(self, now: int) -> None:
        for user, until in (await self.blocks()).items():
            if until <= now:
                await self._client.hdel(BLOCKS, user)

    async def persistence(self) -> list[str]:
        """What would let Redis come back with stale counters (see docs/quotas.md)."""
        found = []
        try:
            config = await self._client.config_get("save")
            config.update(await self._client.config_get("appendonly"))
            config.update(await self._client.config_get("maxmemory-policy"))
        except RedisError:
            return []  # CONFIG may be disabled (managed Redis): nothing to say
        if _text(config.get("save") or ""):
            found.append("RDB snapshots (save)")
        if _text(config.get("appendonly") or "") == "yes":
            found.append("an append-only file")
        policy = _text(config.get("maxmemory-policy") or "noeviction")
        if policy != "noeviction":
            found.append(f"maxmemory-policy {policy}")
        return found

    # -- internals ------------------------------------------------------------------------

    async def _call(self, script: Any, args: list[str]) -> Any:
        return await self._call_plain(script(keys=[], args=args))

    async def _call_plain(self, awaitable: Any) -> Any:
        try:
            answer = await awaitable
        except NoScriptError:
            raise
        except RedisError as exc:
            self._down(exc)
            raise
        if not self.up:
            self.up = True
            log.warning("quota: Redis is reachable again")
        return answer

    def _down(self, exc: BaseException) -> None:
        self.errors += 1
        if self.up:
            self.up = False
            log.error("quota: Redis cannot be reached: %s", exc)
            if self.on_unavailable is not None:
                self.on_unavailable(exc)


def quota_store_alert(exc: BaseException, instance: str) -> Alert:
    """Raised by each instance that loses Redis, once an hour (so an operator sees which
    instances lost it: one that cannot reach Redis while others can is a network fault)."""
    hour = now_us() // 3_600_000_000
    return Alert(
        dedupe_key=f"quota_store:{instance}:{hour}",
        kind="quota_store",
        rule="redis unreachable",
        severity="critical",
        message=(
            f"Instance {instance} cannot reach the quota counters' Redis: requests held to "
            "a limit are refused (or served unchecked, per TOKENTILL_QUOTA_REDIS_OUTAGE) "
            "until it is back"
        ),
        subject=f"instance:{instance}",
        evidence={"instance": instance, "error": str(exc)[:500]},
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
