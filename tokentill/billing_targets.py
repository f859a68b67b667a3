"""Where billing sinks send: OpenMeter-style CloudEvents over HTTP, and Stripe meter events.

Both are told each response once, under an id derived from its event id, so that a page
sent again after a crash (sent, then killed before the mark moved) is known to the
receiver: OpenMeter deduplicates CloudEvents on (source, id), Stripe meter events on
their `identifier` (for at least 24 hours), and Stripe's answer to one it already holds
counts here as delivered.

A target's answer for a page: every record delivered, except those it lists as rejected
(a 4xx that names the event: malformed, too old). Anything that says the sink itself
cannot take events now (no answer, 5xx, 429, 401, 403, 404) raises
`SinkUnavailableError`, and the page is sent again on the next try.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, Protocol

import httpx
import orjson
import stripe
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from stripe.params.billing import MeterEventCreateParams

from tokentill.api.money import usd  # the admin API's exact USD strings, the same here
from tokentill.settings import BillingSink, StripeValue
from tokentill.warehouse.billing_usage import Reject
from tokentill.warehouse.rollups import TOKEN_COUNTS

BATCH_TYPE = "application/cloudevents-batch+json"
# A Stripe identifier is at most 100 characters.
_IDENTIFIER_MAX = 100


class SinkUnavailableError(RuntimeError):
    """The receiver cannot take events now (or the sink is stopping). The first
    `accepted` records were dealt with (delivered, or set aside: `rejects`); the rest are
    sent again later."""

    def __init__(
        self, message: str, *, accepted: int = 0, rejects: list[Reject] | None = None
    ) -> None:
        super().__init__(message)
        self.accepted = accepted
        self.rejects = rejects or []


class Target(Protocol):
    def deliver(self, records: list[dict[str, Any]], stop: threading.Event) -> list[Reject]:
        """Send `records` (in the events' order); the rejected ones. Stops early, raising
        SinkUnavailableError with what it got through, when the receiver fails or `stop`
        is set."""

    def close(self) -> None: ...


def usage_data(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record's usage as the JSON a receiver reads: tokens by kind as OpenAI counts
    them (cached within input, reasoning within output: price each once), `cost_usd` an
    exact decimal string (null when no price was in force), its charges likewise."""
    cost = record["cost_pico"]
    return {
        "response_id": record["response_id"],
        "model": record["model"],
        "service_tier": record["service_tier"] or "default",
        "endpoint": record["endpoint"],
        "status": record["status"],
        "user": record["user_id"],
        **{name: int(record[name]) for name in TOKEN_COUNTS},
        "cost_usd": None if cost is None else usd(int(cost)),
        "charges_usd": {
            name.removeprefix("charge_").removesuffix("_pico"): usd(int(value))
            for name, value in record.items()
            if name.startswith("charge_") and value
        },
        "unpriced": bool(record["unpriced"]),
        "metadata": orjson.loads(record["metadata"]) if record["metadata"] else {},
    }


class CloudEventsTarget:
    """OpenMeter's ingest shape: CloudEvents 1.0, structured JSON, POSTed as batches
    (`application/cloudevents-batch+json`); `subject` the customer, `id` the event id."""

    def __init__(self, sink: BillingSink, *, batch: int = 100) -> None:
        self._sink = sink
        self._batch = batch
        self._format = JSONFormat()
        headers = {"content-type": BATCH_TYPE}
        if sink.secret is not None:
            headers["authorization"] = "Bearer " + sink.secret.get_secret_value()
        self._client = httpx.Client(timeout=sink.timeout, headers=headers)

    def event(self, record: Mapping[str, Any]) -> CloudEvent:
        created: datetime = record["created_at"]
        return CloudEvent(
            attributes={
                "id": record["event_id"],
                "source": self._sink.source,
                "type": self._sink.event_type,
                "subject": record["subject"],
                "time": created,
                "datacontenttype": "application/json",
            },
            data=usage_data(record),
        )

    def deliver(self, records: list[dict[str, Any]], stop: threading.Event) -> list[Reject]:
        rejected: list[Reject] = []
        for start in range(0, len(records), self._batch):
            if stop.is_set():
                raise SinkUnavailableError("stopping", accepted=start, rejects=rejected)
            try:
                rejected += self._send(records[start : start + self._batch])
            except SinkUnavailableError as exc:
                raise SinkUnavailableError(str(exc), accepted=start, rejects=rejected) from exc
        return rejected

    def _send(self, records: list[dict[str, Any]]) -> list[Reject]:
        body = b"[" + b",".join(self._format.write(self.event(r)) for r in records) + b"]"
        try:
            answer = self._client.post(self._sink.url, content=body)
        except httpx.HTTPError as exc:
            raise SinkUnavailableError(f"no answer from {self._sink.url}: {exc!r}") from exc
        if answer.is_success:
            return []
        if answer.status_code in (400, 413, 422):
            if len(records) > 1:  # which one? each alone, to set aside only the bad ones
                return [r for one in records for r in self._send([one])]
            return [_reject(records[0], f"{answer.status_code}: {answer.text[:500]}")]
        raise SinkUnavailableError(f"{self._sink.url} answered {answer.status_code}")

    def close(self) -> None:
        self._client.close()


class StripeTarget:
    """Stripe meter events through the stripe SDK, at the configured base URL: one per
    response, `identifier` derived from the sink's event name and the event id,
    `timestamp` the response's creation, `payload` the customer and the value."""

    def __init__(self, sink: BillingSink) -> None:
        assert sink.secret is not None  # the settings refuse a Stripe sink without one
        self._sink = sink
        self._client = stripe.StripeClient(
            sink.secret.get_secret_value(),
            base_addresses={"api": sink.url},
            max_network_retries=1,  # the sink retries the page itself, backing off
            http_client=stripe.RequestsClient(timeout=sink.timeout),  # its own default
        )
        self._pool = ThreadPoolExecutor(sink.concurrency, thread_name_prefix="tokentill-stripe")

    def identifier(self, event_id: str) -> str:
        name = f"{self._sink.event_type}:{event_id}"
        if len(name) <= _IDENTIFIER_MAX:
            return name
        return "tt_" + hashlib.sha256(name.encode()).hexdigest()

    def deliver(self, records: list[dict[str, Any]], stop: threading.Event) -> list[Reject]:
        # The first failure stops what is not yet sent (taken in order: the prefix before
        # it stays whole), so a failing Stripe is not sent a whole page of retries.
        failed = threading.Event()

        def send(record: dict[str, Any]) -> Reject | SinkUnavailableError | None:
            if stop.is_set() or failed.is_set():
                return SinkUnavailableError("stopping")
            answer = self._send(record)
            if isinstance(answer, SinkUnavailableError):
                failed.set()
            return answer

        answers = list(self._pool.map(send, records))
        for index, answer in enumerate(answers):
            if isinstance(answer, SinkUnavailableError):
                # What came before the first failure is done; what came after it and went
                # through is sent again, and Stripe, holding it, says so.
                done = [a for a in answers[:index] if isinstance(a, Reject)]
                failures = [a for a in answers if isinstance(a, SinkUnavailableError)]
                why = next((str(a) for a in failures if str(a) != "stopping"), "stopping")
                raise SinkUnavailableError(why, accepted=index, rejects=done)
        return [a for a in answers if isinstance(a, Reject)]

    def _send(self, record: dict[str, Any]) -> Reject | SinkUnavailableError | None:
        value = meter_value(record, self._sink.value)
        if value is None:
            return _reject(record, "unpriced: no cost to send")
        subject = record["subject"]
        params: MeterEventCreateParams = {
            "event_name": self._sink.event_type,
            "identifier": self.identifier(record["event_id"]),
            "timestamp": int(record["created_at"].timestamp()),
            "payload": {
                self._sink.customer_key: self._sink.customers.get(subject, subject),
                self._sink.value_key: value,
            },
        }
        try:
            self._client.v1.billing.meter_events.create(params)
        except stripe.InvalidRequestError as exc:
            if exc.http_status in (400, 422):  # about this event
                if exc.code == "resource_already_exists" or "already exists" in str(exc):
                    return None  # sent before a crash: Stripe holds it once
                return _reject(record, f"{exc.http_status}: {exc.user_message or exc}")
            return SinkUnavailableError(f"Stripe at {self._sink.url}: {exc!r}")  # 404: the URL
        except stripe.StripeError as exc:
            # No answer, 5xx, 429, a refused key: the sink, not the event.
            return SinkUnavailableError(f"Stripe at {self._sink.url}: {exc!r}")
        return None

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def meter_value(record: Mapping[str, Any], value: StripeValue) -> str | None:
    """A record's value for a Stripe meter, as the decimal string Stripe's payload holds
    (None: a cost asked of an unpriced response)."""
    if value == "requests":
        return "1"
    if value == "cost_usd":
        cost = record["cost_pico"]
        return None if cost is None else usd(int(cost))
    if value == "uncached_input_tokens":
        # As the FOCUS export's `input` charge: input read neither from nor into the cache.
        parts = ("cached_input_tokens", "cache_write_tokens")
        return str(int(record["input_tokens"]) - sum(int(record[p]) for p in parts))
    return str(int(record[value]))


def target_for(sink: BillingSink) -> Target:
    if sink.kind == "stripe":
        return StripeTarget(sink)
    return CloudEventsTarget(sink)


def _reject(record: Mapping[str, Any], reason: str) -> Reject:
    return Reject(record["event_id"], record["response_id"], record["subject"], reason)
