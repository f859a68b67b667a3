"""When to ask the upstream again: what the response poller and the batch watcher share.

A `PollSchedule` holds things to poll by key, each with its back-off (from
`min_interval`, doubling to `max_interval`) and the age at which it is given up
(`max_age`). `due` hands out what is due and drops what is too old; `sleep` waits until
the next one is due or something new is added.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Generic, TypeVar

from tokentill.ingest.upstream import RawHeaders, Upstream

T = TypeVar("T")


@dataclass(slots=True)
class _Entry(Generic[T]):
    item: T
    give_up_at: float
    next_poll_at: float
    interval: float


class PollSchedule(Generic[T]):
    def __init__(self, *, max_age: float, min_interval: float, max_interval: float) -> None:
        self._max_age = max_age
        self._min_interval = min_interval
        self._max_interval = max_interval
        self._entries: dict[str, _Entry[T]] = {}
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, key: str, item: T, *, due_now: bool = False) -> None:
        """Poll `item` from now on (first after `min_interval`, or at once)."""
        now = time.monotonic()
        self._entries[key] = _Entry(
            item,
            give_up_at=now + self._max_age,
            next_poll_at=now if due_now else now + self._min_interval,
            interval=self._min_interval,
        )
        self._wake.set()

    def get(self, key: str) -> T | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.item

    def remove(self, key: str) -> None:
        self._entries.pop(key, None)

    def due(self) -> tuple[list[T], list[T]]:
        """(what is due now, what was given up: too old, and dropped)."""
        now = time.monotonic()
        due, expired = [], []
        for key, entry in list(self._entries.items()):
            if now >= entry.give_up_at:
                del self._entries[key]
                expired.append(entry.item)
            elif now >= entry.next_poll_at:
                due.append(entry.item)
        return due, expired

    def backoff(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.interval = min(entry.interval * 2, self._max_interval)
            entry.next_poll_at = time.monotonic() + entry.interval

    async def sleep(self) -> None:
        """Until the next entry is due, or one is added."""
        self._wake.clear()
        delay = self._max_interval
        if self._entries:
            soonest = min(e.next_poll_at for e in self._entries.values())
            delay = max(0.05, soonest - time.monotonic())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=delay)


async def fetch(client: Upstream, url: str, headers: RawHeaders) -> tuple[int, bytes]:
    """`GET url`: its status and whole body (the connection released either way)."""
    answer = await client.send("GET", url, headers, None)
    try:
        return answer.status, await answer.read()
    finally:
        answer.close()
