"""Settling the responses a dead process left pending.

A background response's poller, and the caller's credentials it holds in memory only,
die with their process: the warehouse keeps the response `queued` with no tokens,
though the upstream bills it. With a settlement key (`TOKENTILL_SETTLEMENT_API_KEY`, a
key of the same OpenAI project that the operator configures; never a client's key,
never written to disk) the sweep hands every such response back to the poller, which
retrieves it and records its outcome as an update. Updates apply only to events still
pending, so two nodes settling the same response count it once.

The sweep runs at start (after the journal's replay landed: everything pending then was
orphaned by the restart) and every `settlement_interval` after, for responses pending
longer than `grace` (another node's poller may still be on the fresher ones; polling
those twice is harmless, only wasteful).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from tokentill.ingest.poller import Poller
from tokentill.warehouse.unsettled import Unsettled

log = logging.getLogger(__name__)

_AT_ONCE = 100  # adopted responses polled at once per sweep; the rest on schedule

# (since, before, streams before) -> the pending responses created in [since, before),
# the streamed ones among them only if created before the third moment.
Find = Callable[[datetime, datetime, datetime], list[Unsettled]]


class Settler:
    def __init__(
        self,
        poller: Poller,
        find: Find,
        landed: Callable[[], bool],
        api_key: str | None,
        *,
        max_age: float,
        interval: float,
        grace: float,
        stream_grace: float = 900.0,
        alone: bool = True,
    ) -> None:
        """`stream_grace`: a stream is journaled as pending at its start and read to its
        end by its own proxy, which records it; the sweep leaves it to that proxy for this
        long. `alone`: no other process meters into this warehouse (one process on its
        file), so at start every pending response, streams too, is an orphan."""
        self._poller = poller
        self._find = find
        self._landed = landed  # blocks until the journal's replay is in the warehouse
        # What this node adopted, and when: a response its poller gave up on (gone
        # upstream, or never finishing) is not adopted again for `max_age`.
        self._adopted: dict[str, float] = {}
        self._credentials = [(b"authorization", f"Bearer {api_key}".encode())] if api_key else None
        self._max_age = timedelta(seconds=max_age)
        self._interval = interval
        self._grace = timedelta(seconds=grace)
        self._stream_grace = timedelta(seconds=stream_grace)
        self._alone = alone
        self.adopted = 0
        self.unsettleable = 0  # pending, with no key to ask the upstream with

    async def sweep(self, *, at_start: bool = False) -> int:
        """Hand the poller every pending response it does not track; how many. At start,
        every pending response this node left is an orphan (on a lake, others' fresh ones
        may be polled by their own node too: harmless, counted once); later, only those
        pending for longer than the grace."""
        now = datetime.now(UTC)
        grace = timedelta(0) if at_start else self._grace
        streams_before = now if at_start and self._alone else now - self._stream_grace
        found = await asyncio.to_thread(
            self._find, now - self._max_age, now - grace, streams_before
        )
        clock = time.monotonic()
        horizon = clock - self._max_age.total_seconds()
        for response_id in [r for r, at in self._adopted.items() if at < horizon]:
            del self._adopted[response_id]
        fresh = [
            pending
            for pending in found
            if pending.response_id not in self._poller and pending.response_id not in self._adopted
        ]
        if self._credentials is None:
            if fresh and len(fresh) != self.unsettleable:
                log.warning(
                    "%d responses are pending with no poller; set TOKENTILL_SETTLEMENT_API_KEY "
                    "to settle them",
                    len(fresh),
                )
            self.unsettleable = len(fresh)
            return 0
        for n, pending in enumerate(fresh):
            # The first at once; a long list spread by the poller's own schedule, so that
            # the responses it already polls are not starved behind it.
            self._poller.track(
                pending.response_id,
                self._credentials,
                due_now=n < _AT_ONCE,
                user_id=pending.user_id,
                metadata=pending.metadata,
            )
            self._adopted[pending.response_id] = clock
        if fresh:
            log.info("settling %d pending responses left by a stopped process", len(fresh))
        self.adopted += len(fresh)
        return len(fresh)

    async def run(self) -> None:
        if not await asyncio.to_thread(self._landed):
            log.error("settlement: the journal's replay did not land in time; sweeping anyway")
        at_start = True
        while True:
            try:
                await self.sweep(at_start=at_start)
            except Exception:
                log.exception("settlement sweep failed; next in %.0f s", self._interval)
            at_start = False
            await asyncio.sleep(self._interval)
