"""Learning the outcome of responses that finish after their request did.

A background response (`background: true`) is answered `queued`; a stream may be cut
before its terminal event. Either way the upstream still knows how it ended. The
poller asks `GET /v1/responses/{id}` with the caller's own credentials (held in
memory only, never written anywhere) with backoff until the response is terminal or
`background_poll_max` has passed, and records the outcome as an update. A client that
retrieves the response itself through the proxy settles it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from ingest.capture import JSONCapture, RequestFacts, now_us
from ingest.events import UsageEvent
from ingest.upstream import Upstream, UpstreamError

log = logging.getLogger(__name__)

# The request headers that say who is asking; nothing else is kept.
CREDENTIAL_HEADERS = frozenset({b"authorization", b"openai-organization", b"openai-project"})


@dataclass(slots=True)
class Pending:
    response_id: str
    credentials: list[tuple[bytes, bytes]]
    give_up_at: float
    next_poll_at: float
    interval: float


class Poller:
    def __init__(
        self,
        *,
        upstream: str,
        record: Callable[[UsageEvent], None],
        max_age: float,
        min_interval: float,
        max_interval: float,
    ) -> None:
        self._upstream = upstream
        self._record = record
        self._max_age = max_age
        self._min_interval = min_interval
        self._max_interval = max_interval
        self._pending: dict[str, Pending] = {}
        self._wake = asyncio.Event()
        self.given_up = 0

    def __len__(self) -> int:
        return len(self._pending)

    def track(self, response_id: str, credentials: list[tuple[bytes, bytes]]) -> None:
        now = time.monotonic()
        self._pending[response_id] = Pending(
            response_id,
            credentials,
            give_up_at=now + self._max_age,
            next_poll_at=now + self._min_interval,
            interval=self._min_interval,
        )
        self._wake.set()

    def forget(self, response_id: str) -> None:
        self._pending.pop(response_id, None)

    async def run(self, client: Upstream) -> None:
        while True:
            due = self._due()
            for pending in due:
                await self._poll(client, pending)
            self._wake.clear()
            delay = self._next_delay()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

    def _due(self) -> list[Pending]:
        now = time.monotonic()
        due = []
        for pending in list(self._pending.values()):
            if now >= pending.give_up_at:
                self._pending.pop(pending.response_id, None)
                self.given_up += 1
                log.warning("gave up polling %s: still not finished", pending.response_id)
            elif now >= pending.next_poll_at:
                due.append(pending)
        return due

    def _next_delay(self) -> float:
        if not self._pending:
            return self._max_interval
        soonest = min(p.next_poll_at for p in self._pending.values())
        return max(0.05, soonest - time.monotonic())

    async def _poll(self, client: Upstream, pending: Pending) -> None:
        url = f"{self._upstream}/v1/responses/{pending.response_id}"
        try:
            answer = await client.send("GET", url, pending.credentials, None)
            try:
                status, content = answer.status, await answer.read()
            finally:
                answer.close()
        except UpstreamError as exc:
            log.info("polling %s failed: %s", pending.response_id, exc)
            self._backoff(pending)
            return
        if status == 404:
            # Not stored upstream (store: false) or deleted: nothing more to learn.
            self._pending.pop(pending.response_id, None)
            return
        if status != 200:
            self._backoff(pending)
            return
        try:
            obj = orjson.loads(content)
        except orjson.JSONDecodeError:
            self._backoff(pending)
            return
        facts = RequestFacts(
            endpoint="responses",
            kind="update",
            started_us=now_us(),
            started_perf=time.perf_counter(),
            response_id=pending.response_id,
        )
        event = JSONCapture(facts, None).event(obj, 200) if isinstance(obj, dict) else None
        if event is None:
            self._backoff(pending)
            return
        event.latency_ms = None
        self._pending.pop(pending.response_id, None)
        self._record(event)

    def _backoff(self, pending: Pending) -> None:
        pending.interval = min(pending.interval * 2, self._max_interval)
        pending.next_poll_at = time.monotonic() + pending.interval
