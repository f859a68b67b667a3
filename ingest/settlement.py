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
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from tokentill.ingest.poller import Poller

log = logging.getLogger(__name__)

Find = Callable[[datetime, datetime], list[str]]  # (since, before) -> response ids


class Settler:
    def __init__(
        self,
        poller: Poller,
        find: Find,
        api_key: str | None,
        *,
        max_age: float,
        interval: float,
        grace: float,
    ) -> None:
        self._poller = poller
        self._find = find
        self._credentials = [(b"authorization", f"Bearer {api_key}".encode())] if api_key else None
        self._max_age = timedelta(seconds=max_age)
        self._interval = interval
        self._grace = timedelta(seconds=grace)
        self.adopted = 0
        self.unsettleable = 0  # pending, with no key to ask the upstream with

    async def sweep(self, grace: timedelta) -> int:
        """Hand the poller every pending response it does not track; how many."""
        now = datetime.now(UTC)
        found = await asyncio.to_thread(self._find, now - self._max_age, now - grace)
        fresh = [response_id for response_id in found if response_id not in self._poller]
        if self._credentials is None:
            if fresh and len(fresh) != self.unsettleable:
                log.warning(
                    "%d responses are pending with no poller; set TOKENTILL_SETTLEMENT_API_KEY "
                    "to settle them",
                    len(fresh),
                )
            self.unsettleable = len(fresh)
            return 0
        for response_id in fresh:
            self._poller.track(response_id, self._credentials, due_now=True)
        if fresh:
            log.info("settling %d pending responses left by a stopped process", len(fresh))
        self.adopted += len(fresh)
        return len(fresh)

    async def run(self) -> None:
        grace = timedelta(0)  # at start, every pending response is an orphan
        while True:
            try:
                await self.sweep(grace)
            except Exception:
                log.exception("settlement sweep failed; next in %.0f s", self._interval)
            grace = self._grace
            await asyncio.sleep(self._interval)
