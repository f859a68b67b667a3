"""A limit on guessing the admin token: failed logins and wrong bearer tokens, per client
address.

After `limit` failures from one address within `window` seconds, that address is
refused (429, `Retry-After`) without its token even being compared, until `window`
seconds have passed since its latest failure. Each failure counts in
`tokentill_auth_failures_total`; each lockout in `tokentill_auth_lockouts_total` and
raises an alert (kind `security`, rule `auth_failures`). Memory is bounded: at most
`max_addresses` addresses are tracked, the stalest dropped first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Record:
    failures: list[float] = field(default_factory=list)
    locked_until: float = 0.0


class AuthLimiter:
    def __init__(
        self,
        limit: int,
        window: float,
        on_failure: Callable[[], None],
        on_lockout: Callable[[str, int], None],
        *,
        max_addresses: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit, self._window = limit, window
        self._on_failure, self._on_lockout = on_failure, on_lockout
        self._max = max_addresses
        self._clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def retry_after(self, address: str) -> int | None:
        """Seconds until `address` may try again, or None if it may now."""
        record = self._records.get(address)
        if record is None:
            return None
        left = record.locked_until - self._clock()
        return int(left) + 1 if left > 0 else None

    def failed(self, address: str) -> None:
        now = self._clock()
        record = self._records.pop(address, None) or _Record()
        self._records[address] = record  # most recent last
        record.failures = [t for t in record.failures if now - t < self._window]
        record.failures.append(now)
        self._on_failure()
        if len(record.failures) >= self._limit:
            record.locked_until = now + self._window
            record.failures.clear()
            self._on_lockout(address, self._limit)
        while len(self._records) > self._max:
            self._records.popitem(last=False)

    def succeeded(self, address: str) -> None:
        record = self._records.get(address)
        if record is not None and record.locked_until <= self._clock():
            del self._records[address]
