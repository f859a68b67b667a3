"""Stored responses: what ``GET /v1/responses/{id}`` returns, and background jobs.

A background response moves ``queued`` -> ``in_progress`` -> its terminal status on
the event loop's timers; ``cancel`` stops it on the way. Plain responses are kept as
their final JSON only. The store is bounded (oldest entries are forgotten first), a
stand-in for OpenAI's 30-day retention that keeps long benchmarks in constant memory.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from tokentill.fakeai.response_builder import ResponseDraft
from tokentill.fakeai.sdk import dump

DEFAULT_CAPACITY: Final = 20_000
_QUEUED_FOR_S: Final = 0.02
TERMINAL: Final = frozenset({"completed", "incomplete", "failed", "cancelled"})


class BackgroundJob:
    """A ``background: true`` response progressing on its own."""

    def __init__(
        self, draft: ResponseDraft, *, on_terminal: Callable[[BackgroundJob], None]
    ) -> None:
        self.draft = draft
        self.status = "queued"
        self.body = dump(draft.pending("queued"))
        self.done = asyncio.Event()
        self._on_terminal = on_terminal
        self._timers: list[asyncio.TimerHandle] = []

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def start(self, delay_s: float) -> None:
        """Go in progress shortly, and finish after `delay_s`."""
        loop = asyncio.get_running_loop()
        self._timers = [
            loop.call_later(min(_QUEUED_FOR_S, delay_s / 2), self._begin),
            loop.call_later(delay_s, self.finish),
        ]

    def _begin(self) -> None:
        if self.status == "queued":
            self.status = "in_progress"
            self.body = dump(self.draft.pending("in_progress"))

    def finish(self) -> None:
        """Reach the drafted terminal status now (idempotent; no-op once cancelled)."""
        if self.terminal:
            return
        for timer in self._timers:
            timer.cancel()
        final = self.draft.final()
        self.status = self.draft.outcome
        self.body = dump(final)
        self._settle()

    def cancel(self) -> None:
        """Stop a job still queued or in progress; a finished one is left as it is."""
        if self.terminal:
            return
        for timer in self._timers:
            timer.cancel()
        self.status = "cancelled"
        self.body = dump(self.draft.cancelled())
        self._settle()

    def _settle(self) -> None:
        self.done.set()
        self._on_terminal(self)


class ResponseStore:
    """Response id -> final JSON (plain responses) or a `BackgroundJob`."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, bytes | BackgroundJob] = OrderedDict()

    def put(self, response_id: str, item: bytes | BackgroundJob) -> None:
        self._items[response_id] = item
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> bytes | BackgroundJob | None:
        return self._items.get(response_id)

    def __len__(self) -> int:
        return len(self._items)
