"""Learning the outcome of responses that finish after their request did.

A background response (`background: true`) is answered `queued`; a stream may be cut
before its terminal event. Either way the upstream still knows how it ended. The
poller asks `GET /v1/responses/{id}` with the caller's own credentials (held in
memory only, never written anywhere) with backoff until the response is terminal or
`background_poll_max` has passed, and records the outcome as an update. A client that
retrieves the response itself through the proxy settles it first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from tokentill.ingest.capture import JSONCapture, RequestFacts, now_us
from tokentill.ingest.polling import PollSchedule, fetch
from tokentill.ingest.upstream import Upstream, UpstreamError
from tokentill.warehouse.events import UsageEvent

log = logging.getLogger(__name__)

# The request headers that say who is asking; nothing else is kept.
CREDENTIAL_HEADERS = frozenset({b"authorization", b"openai-organization", b"openai-project"})


@dataclass(slots=True)
class Pending:
    response_id: str
    credentials: list[tuple[bytes, bytes]]
    # Whom it counts for, when adopted from the warehouse (the outcome's event carries
    # them, so that shared quota counters can charge it).
    user_id: str | None = None
    metadata: str | None = None


class Poller:
    def __init__(
        self,
        *,
        upstream: str,
        max_age: float,
        min_interval: float,
        max_interval: float,
    ) -> None:
        self._upstream = upstream
        self._schedule: PollSchedule[Pending] = PollSchedule(
            max_age=max_age, min_interval=min_interval, max_interval=max_interval
        )
        self.given_up = 0

    def __len__(self) -> int:
        return len(self._schedule)

    def __contains__(self, response_id: object) -> bool:
        return isinstance(response_id, str) and self._schedule.get(response_id) is not None

    def track(
        self,
        response_id: str,
        credentials: list[tuple[bytes, bytes]],
        *,
        due_now: bool = False,
        user_id: str | None = None,
        metadata: str | None = None,
    ) -> None:
        pending = Pending(response_id, credentials, user_id, metadata)
        self._schedule.add(response_id, pending, due_now=due_now)

    def forget(self, response_id: str) -> None:
        self._schedule.remove(response_id)

    async def run(self, client: Upstream, record: Callable[[UsageEvent], None]) -> None:
        """Poll what is tracked until cancelled, recording each outcome with `record` (the
        recorder, which also tells this poller what to track: each needs the other, so
        the poller is handed its half when it starts)."""
        while True:
            due, expired = self._schedule.due()
            for pending in expired:
                self.given_up += 1
                log.warning("gave up polling %s: still not finished", pending.response_id)
            for pending in due:
                await self._poll(client, pending, record)
            await self._schedule.sleep()

    async def _poll(
        self, client: Upstream, pending: Pending, record: Callable[[UsageEvent], None]
    ) -> None:
        url = f"{self._upstream}/v1/responses/{pending.response_id}"
        try:
            status, content = await fetch(client, url, pending.credentials)
        except UpstreamError as exc:
            log.info("polling %s failed: %s", pending.response_id, exc)
            self._schedule.backoff(pending.response_id)
            return
        if status == 404:
            # Not stored upstream (store: false) or deleted: nothing more to learn.
            self._schedule.remove(pending.response_id)
            return
        if status != 200:
            self._schedule.backoff(pending.response_id)
            return
        try:
            obj = orjson.loads(content)
        except orjson.JSONDecodeError:
            self._schedule.backoff(pending.response_id)
            return
        facts = RequestFacts(
            endpoint="responses",
            kind="update",
            started_us=now_us(),
            started_perf=time.perf_counter(),
            response_id=pending.response_id,
            user_id=pending.user_id,
            metadata=pending.metadata,
        )
        event = JSONCapture(facts, None).event(obj, 200) if isinstance(obj, dict) else None
        if event is None:
            self._schedule.backoff(pending.response_id)
            return
        event.latency_ms = None
        self._schedule.remove(pending.response_id)
        record(event)
