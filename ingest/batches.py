"""The Batch API, metered: every request of a batch lands as a row when the batch ends.

A batch (`POST /v1/batches`) is answered at once and runs for up to a day; its bill is
in its output file, one line per request with the endpoint's own body and usage. The
watcher learns of a batch when it is created, or retrieved, through the proxy; it polls
`GET /v1/batches/{id}` with the caller's own credentials (held in memory only, as the
response poller does) until the batch ends, then reads its output file and its input
file (`GET /v1/files/{id}/content`) and records one event per request line:

- endpoint, model and usage from the line's response body (Responses, Chat Completions,
  embeddings), priced at the `batch` service tier;
- end user: the `X-Tokentill-User` of the request that created (or retrieved) the batch,
  else the input line's `user` or `safety_identifier`, read by the proxy's own rules;
  metadata from the input line's body;
- a line the endpoint refused: an error row with its status;
- `event_id`: the response's own id, else `<batch id>:<custom_id>`, so a batch read
  twice (polled, then retrieved by a client) lands once.

Batches are not admitted against quotas when created (their cost is not known before
they run); their spend counts in reports, and in quota counters from the next seed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from ingest.capture import Endpoint, JSONCapture, RequestFacts, error_event, now_us
from ingest.events import UsageEvent
from ingest.polling import PollSchedule, fetch
from ingest.proxy import IdentityRules, RequestRejectedError, learn_request
from ingest.upstream import Upstream, UpstreamError

log = logging.getLogger(__name__)

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_ENDPOINTS: dict[str, Endpoint] = {
    "/v1/responses": "responses",
    "/v1/chat/completions": "chat.completions",
    "/v1/embeddings": "embeddings",
    "/v1/completions": "completions",
    "/v1/moderations": "moderations",
}


@dataclass(slots=True)
class Watched:
    batch_id: str
    credentials: list[tuple[bytes, bytes]]
    header_user: str | None
    fingerprint: str | None


class BatchWatcher:
    def __init__(
        self,
        *,
        upstream: str,
        record: Callable[[UsageEvent], None],
        identity: IdentityRules,
        max_age: float,
        min_interval: float,
        max_interval: float,
    ) -> None:
        self._upstream = upstream
        self._record = record
        self._identity = identity
        self._schedule: PollSchedule[Watched] = PollSchedule(
            max_age=max_age, min_interval=min_interval, max_interval=max_interval
        )
        self._read: OrderedDict[str, None] = OrderedDict()  # batches already read

    def __len__(self) -> int:
        return len(self._schedule)

    def observe(
        self,
        batch: dict[str, Any],
        credentials: list[tuple[bytes, bytes]],
        header_user: str | None,
        fingerprint: str | None,
    ) -> None:
        """A batch seen through the proxy (created or retrieved): watch it until it ends
        (an ended one is read at once)."""
        batch_id = batch.get("id")
        if not isinstance(batch_id, str) or batch_id in self._read:
            return
        watched = Watched(batch_id, credentials, header_user, fingerprint)
        self._schedule.add(batch_id, watched, due_now=batch.get("status") in TERMINAL)

    async def run(self, client: Upstream) -> None:
        while True:
            due, expired = self._schedule.due()
            for watched in expired:
                log.warning("gave up watching batch %s: it did not end", watched.batch_id)
            for watched in due:
                await self._poll(client, watched)
            await self._schedule.sleep()

    async def _poll(self, client: Upstream, watched: Watched) -> None:
        try:
            batch = await self._get_json(client, f"/v1/batches/{watched.batch_id}", watched)
        except UpstreamError as exc:
            log.info("polling batch %s failed: %s", watched.batch_id, exc)
            self._schedule.backoff(watched.batch_id)
            return
        if batch is None:
            self._schedule.remove(watched.batch_id)  # gone, or not this key's to read
            return
        if batch.get("status") not in TERMINAL:
            self._schedule.backoff(watched.batch_id)
            return
        try:
            events = await self._events(client, watched, batch)
        except UpstreamError as exc:
            log.info("reading batch %s's files failed: %s", watched.batch_id, exc)
            self._schedule.backoff(watched.batch_id)
            return
        self._schedule.remove(watched.batch_id)
        self._read[watched.batch_id] = None
        if len(self._read) > 10_000:
            self._read.popitem(last=False)
        for event in events:
            self._record(event)

    async def _events(
        self, client: Upstream, watched: Watched, batch: dict[str, Any]
    ) -> list[UsageEvent]:
        output = await self._lines(client, batch.get("output_file_id"), watched)
        inputs = {
            line.get("custom_id"): line
            for line in await self._lines(client, batch.get("input_file_id"), watched)
        }
        events = []
        for line in output:
            event = self._event(watched, batch, line, inputs.get(line.get("custom_id")) or {})
            if event is not None:
                events.append(event)
        return events

    def _event(
        self,
        watched: Watched,
        batch: dict[str, Any],
        line: dict[str, Any],
        request: dict[str, Any],
    ) -> UsageEvent | None:
        url = request.get("url") if isinstance(request.get("url"), str) else batch.get("endpoint")
        endpoint = _ENDPOINTS.get(str(url))
        if endpoint is None:
            return None
        facts = RequestFacts(
            endpoint=endpoint,
            kind="create",
            started_us=now_us(),
            started_perf=time.perf_counter(),
            key_fingerprint=watched.fingerprint,
        )
        body = request.get("body") if isinstance(request.get("body"), dict) else None
        try:
            learn_request(facts, body, watched.header_user, b"", self._identity)
        except RequestRejectedError:
            facts.user_id = watched.header_user  # an id the proxy would refuse: not kept
        facts.stream = facts.background = facts.strip_chat_usage = False
        given = line.get("response")
        response: dict[str, Any] = given if isinstance(given, dict) else {}
        code = response.get("status_code")
        status = code if isinstance(code, int) else 0
        answer = response.get("body")
        stable = f"{watched.batch_id}:{line.get('custom_id')}"
        if status == 200 and isinstance(answer, dict):
            event = JSONCapture(facts, None).event(answer, 200)
            if event is None:
                return None
        else:
            event = error_event(facts, status or 500, answer)
        event.service_tier = "batch"  # what the batch is billed at, whatever the body says
        event.event_id = event.response_id or stable
        event.latency_ms = None
        return event

    async def _lines(
        self, client: Upstream, file_id: object, watched: Watched
    ) -> list[dict[str, Any]]:
        if not isinstance(file_id, str):
            return []
        url = f"{self._upstream}/v1/files/{file_id}/content"
        status, content = await fetch(client, url, watched.credentials)
        if status != 200:
            raise UpstreamError(f"GET {url}: HTTP {status}")
        lines = []
        for raw in content.splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                parsed = orjson.loads(raw)
                if isinstance(parsed, dict):
                    lines.append(parsed)
        return lines

    async def _get_json(
        self, client: Upstream, path: str, watched: Watched
    ) -> dict[str, Any] | None:
        status, content = await fetch(client, self._upstream + path, watched.credentials)
        if status in (401, 403, 404):
            return None
        if status != 200:
            raise UpstreamError(f"GET {path}: HTTP {status}")
        try:
            parsed = orjson.loads(content)
        except orjson.JSONDecodeError:
            raise UpstreamError(f"GET {path}: not JSON") from None
        return parsed if isinstance(parsed, dict) else None
