"""Where a finished response's event goes: the journal, the metrics, the poller."""

from __future__ import annotations

from ingest.events import UsageEvent
from ingest.journal import Journal
from ingest.poller import Poller
from tokentill.metrics import Metrics


class Recorder:
    def __init__(self, journal: Journal, metrics: Metrics, poller: Poller | None = None) -> None:
        self._journal = journal
        self._metrics = metrics
        self.poller = poller

    def record(
        self, event: UsageEvent, credentials: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """Journal `event` (synchronously: it is in the kernel when this returns)."""
        self._journal.append(event)
        self._metrics.count_event(event.endpoint, event.status)
        poller = self.poller
        if poller is None or event.endpoint != "responses" or not event.response_id:
            return
        if event.is_pending and credentials:
            poller.track(event.response_id, credentials)
        elif not event.is_pending:
            poller.forget(event.response_id)
