"""The Batch API, metered: every request of a batch lands as a row when the batch ends.

A batch (`POST /v1/batches`) is answered at once and runs for up to a day; its bill is
in its output file, one line per request with the endpoint's own body and usage. The
watcher learns of a batch when it is created, or retrieved, through the proxy; it polls
`GET /v1/batches/{id}` with the caller's own credentials (held in memory only, as the
response poller does) until the batch ends, then reads its output and error files and
its input file (`GET /v1/files/{id}/content`) and records one event per request line:

- endpoint, model and usage from the line's response body (Responses, Chat Completions,
  embeddings, legacy completions, moderations, images), priced at the `batch` tier;
- end user: the `X-Tokentill-User` of the request that created (or retrieved) the batch,
  else the input line's `user` or `safety_identifier`, read by the proxy's own rules;
  metadata from the input line's body;
- a line the endpoint refused (in the error file, or the output file): an error row
  with its status; a line that never ran (the batch expired or was cancelled first): an
  error row with the batch's error code, not billed;
- `event_id`: the response's own id, else `<batch id>:<custom_id>`, so a batch read
  twice (polled, then retrieved by a client) lands once.

Quotas: when quotas are on, a batch is admitted before it is created, line by line, as
if each line were its own request (`admit`): the proxy reads the input file with the
caller's credentials, reserves each line's worst case on its subjects, and refuses the
batch (429, nothing forwarded) if any line would pass a hard limit. The reservations are
held until the batch ends, then each is settled by its line's event (released if the
line never ran).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from tokentill.ingest.capture import Endpoint, JSONCapture, RequestFacts, error_event, now_us
from tokentill.ingest.errors import RequestRejectedError
from tokentill.ingest.polling import PollSchedule, fetch
from tokentill.ingest.proxy import Admission, IdentityRules, learn_request
from tokentill.ingest.upstream import Upstream, UpstreamError
from tokentill.warehouse.events import UsageEvent

log = logging.getLogger(__name__)

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_ENDPOINTS: dict[str, Endpoint] = {
    "/v1/responses": "responses",
    "/v1/chat/completions": "chat.completions",
    "/v1/embeddings": "embeddings",
    "/v1/completions": "completions",
    "/v1/moderations": "moderations",
    "/v1/images/generations": "images.generations",
}


class BatchRefusedError(RequestRejectedError):
    """A batch that cannot be admitted (a line over a quota, an input too big to read)."""


@dataclass(slots=True)
class Watched:
    batch_id: str
    credentials: list[tuple[bytes, bytes]]
    header_user: str | None
    fingerprint: str | None
    holds: dict[str, Any] = field(default_factory=dict)  # custom_id -> its reservation


class Record(Protocol):
    def __call__(
        self,
        event: UsageEvent,
        credentials: list[tuple[bytes, bytes]] | None = None,
        hold: Any = None,
    ) -> None: ...


class BatchWatcher:
    def __init__(
        self,
        *,
        upstream: str,
        record: Record,
        release: Callable[[Any], None],
        identity: IdentityRules,
        max_age: float,
        min_interval: float,
        max_interval: float,
        max_input_bytes: int,
    ) -> None:
        self._upstream = upstream
        self._record = record
        self._release = release
        self._max_input_bytes = max_input_bytes
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
        holds: dict[str, Any] | None = None,
    ) -> None:
        """A batch seen through the proxy (created or retrieved): watch it until it ends
        (an ended one is read at once). `holds` are its lines' reservations (`admit`)."""
        batch_id = batch.get("id")
        if not isinstance(batch_id, str) or batch_id in self._read:
            self.release_all(holds)
            return
        watched = self._schedule.get(batch_id)
        if watched is None:
            watched = Watched(batch_id, credentials, header_user, fingerprint, holds or {})
        else:
            self.release_all(holds)  # seen again (a retrieve): it keeps what it holds
        self._schedule.add(batch_id, watched, due_now=batch.get("status") in TERMINAL)

    def release_all(self, holds: dict[str, Any] | None) -> None:
        for hold in (holds or {}).values():
            if hold is not None:
                self._release(hold)

    async def admit(
        self,
        client: Upstream,
        create: dict[str, Any] | None,
        credentials: list[tuple[bytes, bytes]],
        header_user: str | None,
        fingerprint: str | None,
        admission: Admission,
    ) -> dict[str, Any]:
        """Admit a batch about to be created, line by line; return each line's
        reservation by `custom_id`. `BatchRefusedError` (or the quota's own refusal) if
        a line may not run: then nothing is held."""
        file_id = create.get("input_file_id") if create is not None else None
        if not isinstance(file_id, str):
            return {}  # the upstream will refuse it
        url = f"{self._upstream}/v1/files/{file_id}/content"
        try:
            status, content = await fetch(client, url, credentials)
        except UpstreamError:
            return {}  # nor can the upstream read it, most likely: it will say so
        if status != 200:
            return {}
        watched = Watched("", credentials, header_user, fingerprint)
        if len(content) > self._max_input_bytes:
            refused = BatchRefusedError(
                400,
                f"The batch's input file is larger than {self._max_input_bytes} bytes, too "
                "large for tokentill to admit against quotas; split it into smaller batches.",
                "batch_too_large_to_admit",
                "input_file_id",
            )
            self._refused(self._facts(watched, create or {}, {}), refused)
            raise refused
        holds: dict[str, Any] = {}
        facts: RequestFacts | None = None
        try:
            for raw in content.splitlines():
                line = _json_line(raw)
                if line is None:
                    continue
                facts = self._facts(watched, create or {}, line)
                if facts is None:
                    continue
                body = line.get("body") if isinstance(line.get("body"), dict) else None
                pending = admission(facts, body, raw)
                if pending is not None:
                    await pending
                holds[str(line.get("custom_id"))] = facts.hold
        except RequestRejectedError as exc:
            self.release_all(holds)
            self._refused(facts, exc)
            raise
        return holds

    def _refused(self, facts: RequestFacts | None, exc: RequestRejectedError) -> None:
        """The row of a batch refused before it was created (the line that did not fit)."""
        if facts is None:
            return
        event = error_event(facts, exc.status, {"error": {"type": exc.type, "code": exc.code}})
        event.service_tier = "batch"
        self._record(event)

    async def run(self, client: Upstream) -> None:
        while True:
            due, expired = self._schedule.due()
            for watched in expired:
                log.warning("gave up watching batch %s: it did not end", watched.batch_id)
                self.release_all(watched.holds)
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
            self.release_all(watched.holds)
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
        for custom_id, event in events:
            self._record(event, hold=watched.holds.pop(custom_id, None))
        self.release_all(watched.holds)  # lines that left no trace

    async def _events(
        self, client: Upstream, watched: Watched, batch: dict[str, Any]
    ) -> list[tuple[str, UsageEvent]]:
        """(custom_id, event) for every line of the batch's output and error files, and
        for every input line that never ran (the batch expired or was cancelled)."""
        answered = await self._lines(client, batch.get("output_file_id"), watched)
        answered += await self._lines(client, batch.get("error_file_id"), watched)
        inputs = {
            str(line.get("custom_id")): line
            for line in await self._lines(client, batch.get("input_file_id"), watched)
        }
        events = []
        seen = set()
        for line in answered:
            custom_id = str(line.get("custom_id"))
            seen.add(custom_id)
            event = self._event(watched, batch, line, inputs.get(custom_id) or {})
            if event is not None:
                events.append((custom_id, event))
        if batch.get("status") in ("expired", "cancelled"):
            code = "batch_expired" if batch["status"] == "expired" else "batch_cancelled"
            for custom_id, request in inputs.items():
                if custom_id in seen:
                    continue
                unrun = {"error": {"code": code, "message": "not run"}}
                event = self._event(
                    watched, batch, {"custom_id": custom_id, "error": unrun}, request
                )
                if event is not None:
                    events.append((custom_id, event))
        return events

    def _facts(
        self, watched: Watched, batch: dict[str, Any], request: dict[str, Any]
    ) -> RequestFacts | None:
        """What the proxy would have learned from the line had it come on its own."""
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
        facts.store = False  # nothing to retrieve later: settled by its line's event
        return facts

    def _event(
        self,
        watched: Watched,
        batch: dict[str, Any],
        line: dict[str, Any],
        request: dict[str, Any],
    ) -> UsageEvent | None:
        facts = self._facts(watched, batch, request)
        if facts is None:
            return None
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
            # Refused by the endpoint (its status and error body), or never run (the
            # line's own `error`: expired, cancelled): not billed.
            error = line.get("error")
            if not isinstance(answer, dict) and isinstance(error, dict):
                answer = error if "error" in error else {"error": error}
            event = error_event(facts, status or 400, answer)
        event.service_tier = "batch"  # what the batch is billed at, whatever the body says
        event.event_id = event.response_id or stable
        event.latency_ms = None
        # The same batch may be read again (after a restart, or by another proxy a client
        # asked about it): its lines must be the same rows, so that the writer's replay
        # check (the event's id among the rows recorded at the same moment) finds them.
        # They are stamped with the moment the batch ended, not the moment of reading.
        ended = _ended_us(batch)
        if ended is not None:
            event.recorded_at_us = ended
            if status != 200:  # an error line's moment is its request's, here the reading
                event.created_at_us = event.request_started_at_us = ended
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
        return [line for raw in content.splitlines() if (line := _json_line(raw)) is not None]

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


def _json_line(raw: bytes) -> dict[str, Any] | None:
    with contextlib.suppress(orjson.JSONDecodeError):
        parsed = orjson.loads(raw)
        if isinstance(parsed, dict):
            return parsed
    return None


def _ended_us(batch: dict[str, Any]) -> int | None:
    """When the batch ended (completed, expired, cancelled or failed), in µs."""
    for name in ("completed_at", "expired_at", "cancelled_at", "failed_at"):
        value = batch.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return int(value * 1_000_000)
    return None
