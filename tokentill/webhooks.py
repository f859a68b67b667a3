"""Delivering alerts to a webhook: a JSON POST, signed, retried with backoff.

Each delivery is `POST <url>` with the alert as a JSON body and the headers

    X-Tokentill-Event: alert
    X-Tokentill-Delivery: <a unique id, the same on every retry of one delivery>
    X-Tokentill-Timestamp: <unix seconds when this attempt was signed>
    X-Tokentill-Signature: sha256=<hex HMAC-SHA256 under the secret of "<timestamp>.<body>">

so a receiver can check who sent it, and refuse replays older than it likes. A 2xx
answer ends the delivery; anything else (or no answer) is retried after 1, 2, 4, ...
times `alert_webhook_backoff` seconds, up to `alert_webhook_max_attempts` attempts.
Deliveries live in memory: those still retrying when the server stops are dropped
(logged); the alert itself stays in the `alerts` table.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
import uuid
from typing import Any

import httpx
import orjson

log = logging.getLogger(__name__)


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    return (
        "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    )


class Webhook:
    def __init__(
        self,
        url: str,
        secret: str | None,
        *,
        max_attempts: int = 6,
        backoff: float = 1.0,
        timeout: float = 10.0,
    ) -> None:
        self._url = url
        self._secret = secret.encode() if secret else None
        self._max_attempts = max_attempts
        self._backoff = backoff
        self._client = httpx.AsyncClient(timeout=timeout)
        self._tasks: set[asyncio.Task[bool]] = set()
        self.delivered = 0
        self.failed = 0

    def send(self, payload: dict[str, Any]) -> asyncio.Task[bool]:
        """Start delivering `payload` (from the event loop); the task says if it landed."""
        task = asyncio.create_task(self._deliver(payload), name="tokentill-webhook")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _deliver(self, payload: dict[str, Any]) -> bool:
        body = orjson.dumps(payload)
        delivery = uuid.uuid4().hex
        for attempt in range(1, self._max_attempts + 1):
            timestamp = str(int(time.time()))
            headers = {
                "content-type": "application/json",
                "x-tokentill-event": "alert",
                "x-tokentill-delivery": delivery,
                "x-tokentill-timestamp": timestamp,
            }
            if self._secret is not None:
                headers["x-tokentill-signature"] = sign(self._secret, timestamp, body)
            try:
                answer = await self._client.post(self._url, content=body, headers=headers)
                if 200 <= answer.status_code < 300:
                    self.delivered += 1
                    return True
                why = f"HTTP {answer.status_code}"
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}"
            if attempt < self._max_attempts:
                log.info("webhook attempt %d failed (%s); retrying", attempt, why)
                await asyncio.sleep(self._backoff * 2 ** (attempt - 1))
            else:
                log.error(
                    "webhook delivery %s failed after %d attempts: %s", delivery, attempt, why
                )
        self.failed += 1
        return False

    async def close(self, grace: float = 2.0) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if pending:
                log.warning("%d webhook deliveries still retrying were dropped", len(pending))
        await self._client.aclose()
