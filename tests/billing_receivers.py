"""Local receivers for the billing sinks' tests, each as its real counterpart behaves.

- `CloudEventsReceiver`: OpenMeter's ingest endpoint. Structured CloudEvents, one or a
  batch, read with the cloudevents SDK; a bearer token; events deduplicated on
  (source, id), as OpenMeter does.
- `StripeReceiver`: Stripe's `/v1/billing/meter_events`, its answers built from the
  stripe SDK's own types (`stripe.billing.MeterEvent`, `stripe.ErrorObject`): a secret
  key, form-encoded parameters, a timestamp within the past 35 days, and an identifier
  already held refused with Stripe's 400 ("An event already exists with identifier").

Both count every delivery they were sent (`deliveries`) beside what they hold, and can
be taken down (`down`: 503 to everything) to stand for an outage.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import parse_qsl

import orjson
import stripe
from cloudevents.core.bindings.http import HTTPMessage, from_http_event
from cloudevents.core.formats.json import JSONFormat
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

THIRTY_FIVE_DAYS = 35 * 86_400


class CloudEventsReceiver:
    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.down = False
        # Events of these subjects are refused as malformed (400), with their whole batch.
        self.refuse_subjects: set[str] = set()
        self.events: dict[tuple[str, str], dict[str, Any]] = {}  # (source, id): attributes+data
        self.deliveries: Counter[tuple[str, str]] = Counter()
        self.requests = 0
        self._lock = threading.Lock()
        self.app = Starlette(routes=[Route("/api/v1/events", self._ingest, methods=["POST"])])

    async def _ingest(self, request: Request) -> Response:
        self.requests += 1
        if self.down:
            return JSONResponse({"title": "Service Unavailable"}, status_code=503)
        if self.token is not None and request.headers.get("authorization") != (
            "Bearer " + self.token
        ):
            return JSONResponse({"title": "Unauthorized"}, status_code=401)
        body = await request.body()
        kind = request.headers.get("content-type", "")
        try:
            if kind.startswith("application/cloudevents-batch+json"):
                events = [
                    JSONFormat().read(None, orjson.dumps(item)) for item in orjson.loads(body)
                ]
            else:
                message = HTTPMessage(headers=dict(request.headers), body=body)
                events = [from_http_event(message)]
        except Exception as exc:  # malformed: OpenMeter answers 400
            return JSONResponse({"title": "Bad Request", "detail": str(exc)}, status_code=400)
        refused = [e for e in events if e.get_attributes().get("subject") in self.refuse_subjects]
        if refused:
            detail = f"invalid event {refused[0].get_attributes()['id']}"
            return JSONResponse({"title": "Bad Request", "detail": detail}, status_code=400)
        with self._lock:
            for event in events:
                attributes = event.get_attributes()
                key = (attributes["source"], attributes["id"])
                self.deliveries[key] += 1
                self.events.setdefault(key, {**attributes, "data": event.get_data()})
        return Response(status_code=204)


class StripeReceiver:
    def __init__(self, key: str) -> None:
        self.key = key
        self.down = False
        self.fail_after: int | None = None  # take this many more, then go down
        self.events: dict[str, dict[str, Any]] = {}  # identifier: the meter event
        self.deliveries: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.app = Starlette(
            routes=[Route("/v1/billing/meter_events", self._create, methods=["POST"])]
        )

    async def _create(self, request: Request) -> Response:
        if self.down:
            return _stripe_error(503, "api_error", "Stripe is unavailable", retry=True)
        if request.headers.get("authorization") != "Bearer " + self.key:
            return _stripe_error(401, "invalid_request_error", "Invalid API Key provided")
        form = dict(parse_qsl((await request.body()).decode()))
        payload = {
            name[len("payload[") : -1]: value
            for name, value in form.items()
            if name.startswith("payload[") and name.endswith("]")
        }
        identifier = form.get("identifier", "")
        timestamp = int(form.get("timestamp", time.time()))
        if not form.get("event_name") or "value" not in payload:
            return _stripe_error(400, "invalid_request_error", "Missing event_name or value")
        if timestamp < time.time() - THIRTY_FIVE_DAYS:
            return _stripe_error(
                400, "invalid_request_error", "Timestamp must be within the past 35 days"
            )
        with self._lock:
            self.deliveries[identifier] += 1
            if identifier in self.events:
                return _stripe_error(
                    400,
                    "invalid_request_error",
                    f"An event already exists with identifier {identifier}.",
                )
            event = stripe.billing.MeterEvent.construct_from(
                {
                    "object": "billing.meter_event",
                    "created": int(time.time()),
                    "event_name": form["event_name"],
                    "identifier": identifier,
                    "livemode": False,
                    "payload": payload,
                    "timestamp": timestamp,
                },
                self.key,
            )
            self.events[identifier] = event.to_dict()
            if self.fail_after is not None:
                self.fail_after -= 1
                self.down = self.fail_after <= 0
        return Response(orjson.dumps(event.to_dict()), media_type="application/json")


def _stripe_error(status: int, kind: str, message: str, *, retry: bool = False) -> Response:
    error = stripe.ErrorObject.construct_from({"type": kind, "message": message}, None)
    return Response(
        orjson.dumps({"error": {k: v for k, v in error.to_dict().items() if v is not None}}),
        status_code=status,
        media_type="application/json",
        headers={"stripe-should-retry": "true" if retry else "false"},
    )
