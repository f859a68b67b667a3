"""Where a finished response's event goes: the journal, the metrics, the poller, and the
quota counters (settlement, in memory, after the event is safe in the journal)."""

from __future__ import annotations

from typing import Any, Protocol

from tokentill.ingest.bounds import bound_event
from tokentill.ingest.journal import Journal
from tokentill.ingest.metrics import Metrics
from tokentill.ingest.poller import Poller
from tokentill.warehouse.events import UsageEvent


class Settlement(Protocol):
    """What counts spend live (the quota book): see warehouse/quota_book.py."""

    def settle(self, event: UsageEvent, hold: Any) -> None: ...

    def release(self, hold: Any) -> None: ...


class Recorder:
    def __init__(
        self,
        journal: Journal,
        metrics: Metrics,
        poller: Poller | None = None,
        quotas: Settlement | None = None,
    ) -> None:
        """`poller` learns of responses still pending; `quotas` (None: quotas off)
        settles each recorded event against its request's reservation."""
        self._journal = journal
        self._metrics = metrics
        self._poller = poller
        self._quotas = quotas

    def record(
        self,
        event: UsageEvent,
        credentials: list[tuple[bytes, bytes]] | None = None,
        hold: Any = None,
    ) -> None:
        """Journal `event` (synchronously: it is in the kernel when this returns). `hold`
        is the request's quota reservation, if it has one. Every stored string is cut to
        its bound first (`ingest.bounds`), and what was cut is counted."""
        bound_event(event)
        if event.truncated_fields:
            for name in event.truncated_fields.split(","):
                self._metrics.count_cut(name)
        self._journal.append(event)
        self._metrics.count_event(event.endpoint, event.status)
        quotas = self._quotas
        if quotas is not None:
            quotas.settle(event, hold)
        poller = self._poller
        if poller is None or event.endpoint != "responses" or not event.response_id:
            return
        if event.is_pending and credentials:
            poller.track(event.response_id, credentials)
        elif not event.is_pending:
            poller.forget(event.response_id)

    def release(self, hold: Any) -> None:
        """The request ended without an event settling `hold`."""
        quotas = self._quotas
        if quotas is not None:
            quotas.release(hold)
