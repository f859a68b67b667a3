"""The alert outbox: alerts raised anywhere (the proxy's quota book on the event loop, the
abuse job in the scheduler's thread) are stored once in the `alerts` table, off the hot
path, and the new ones handed to the webhook, if one is configured."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import duckdb

from tokentill.warehouse.alerts import Alert, insert_alerts
from tokentill.webhooks import Webhook

log = logging.getLogger(__name__)


class AlertOutbox:
    def __init__(
        self,
        connect: Callable[[], duckdb.DuckDBPyConnection],
        webhook: Webhook | None = None,
    ) -> None:
        self._connect = connect
        self._webhook = webhook
        # Called on the event loop with each new alert (the quota book's blocks listen).
        self._listeners: list[Callable[[Alert], None]] = []
        self._queue: asyncio.Queue[Alert] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._storing = asyncio.Lock()  # one writer of the alerts table at a time
        self.stored = 0

    def subscribe(self, listener: Callable[[Alert], None]) -> None:
        """Hear of each new alert (on the event loop). A subscription, not wiring: the
        quota service both raises alerts here and listens for the abuse flags that block
        a user, so one of the two must come after the other's construction."""
        self._listeners.append(listener)

    def raise_alert(self, alert: Alert) -> None:
        """From the event loop: queue it (no I/O here)."""
        self._queue.put_nowait(alert)

    def raise_from_thread(self, alert: Alert) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, alert)

    def store_from_thread(self, batch: list[Alert], timeout: float = 60.0) -> list[Alert]:
        """From a worker thread (a job): store `batch` now and wait until it is committed;
        return the alerts that were new (the rest repeat one already raised)."""
        if not batch:
            return []
        return asyncio.run_coroutine_threadsafe(self._store(batch), self._loop).result(timeout)

    async def run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._store(batch)

    async def close(self) -> None:
        """Store what is still queued; let deliveries in flight finish (briefly)."""
        batch = []
        while not self._queue.empty():
            batch.append(self._queue.get_nowait())
        if batch:
            await self._store(batch)
        if self._webhook is not None:
            await self._webhook.close()

    async def _store(self, batch: list[Alert]) -> list[Alert]:
        try:
            async with self._storing:
                fresh = await asyncio.to_thread(self._insert, batch)
        except Exception:
            # Not on the money path: the counters are unaffected; the alert is lost.
            log.exception("could not store %d alerts", len(batch))
            return []
        self.stored += len(fresh)
        for alert in fresh:
            log.warning("alert: %s", alert.message)
            for listener in self._listeners:
                listener(alert)
            if self._webhook is not None:
                self._webhook.send(alert.payload())
        return fresh

    def _insert(self, batch: list[Alert]) -> list[Alert]:
        conn = self._connect()
        try:
            return insert_alerts(conn, batch)
        finally:
            with contextlib.suppress(duckdb.Error):
                conn.close()
