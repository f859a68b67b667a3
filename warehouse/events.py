"""The usage event: what the proxy records about one response, and nothing about its content.

An event is journaled as one JSON line and later becomes (or updates) one row of
`usage_events`. `kind` says which: a "create" inserts the row once (replays are
no-ops), an "update" fills in a row whose response was still pending (a background
response that finished, an interrupted stream whose outcome was fetched later).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Literal

import polars as pl

EventKind = Literal["create", "update"]

TERMINAL_STATUSES = frozenset({"completed", "incomplete", "failed", "cancelled", "error"})
# Statuses a later event may still change.
PENDING_STATUSES = frozenset({"queued", "in_progress", "interrupted"})
# The same, as a SQL list (`status IN (...)`).
PENDING_SQL = ", ".join(f"'{status}'" for status in sorted(PENDING_STATUSES))


@dataclass(slots=True)
class UsageEvent:
    kind: EventKind
    event_id: str
    endpoint: str
    status: str
    created_at_us: int
    request_started_at_us: int
    recorded_at_us: int
    response_id: str | None = None
    model: str | None = None
    requested_model: str | None = None
    http_status: int | None = None
    user_id: str | None = None
    user_source: str | None = None
    metadata: str | None = None  # JSON text, as the client sent it
    input_tokens: int | None = None
    cached_input_tokens: int | None = None
    cache_write_tokens: int | None = None
    cache_write_30m_tokens: int | None = None
    cache_write_12h_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None
    total_tokens: int | None = None
    web_search_calls: int | None = None
    image_gen_input_tokens: int | None = None
    image_gen_input_image_tokens: int | None = None
    image_gen_cached_tokens: int | None = None
    image_gen_output_tokens: int | None = None
    # By modality, each a part of its total (see migration 0013).
    input_audio_tokens: int | None = None
    cached_audio_tokens: int | None = None
    output_audio_tokens: int | None = None
    input_image_tokens: int | None = None
    cached_image_tokens: int | None = None
    output_image_tokens: int | None = None
    audio_ms: int | None = None  # audio transcribed, where it is priced by time
    input_characters: int | None = None  # text spoken, where it is priced by character
    usage_unreported: bool = False  # a billable answer that said nothing of its usage
    service_tier: str | None = None
    previous_response_id: str | None = None
    conversation_id: str | None = None
    background: bool = False
    streamed: bool = False
    client_disconnected: bool = False
    incomplete_reason: str | None = None
    error_type: str | None = None
    error_code: str | None = None
    completed_at_us: int | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    key_fingerprint: str | None = None
    transport: str = "http"  # or "websocket": the Responses API's WebSocket mode
    body_user_id: str | None = None  # the body's user when the header named another
    truncated_fields: str | None = None  # comma-separated names of fields cut to bounds

    @property
    def is_pending(self) -> bool:
        return self.status in PENDING_STATUSES


def now_us() -> int:
    """Now, in integer microseconds (the unit of every timestamp an event carries)."""
    return time.time_ns() // 1000


def key_fingerprint(authorization: str | None) -> str | None:
    """A short, non-reversible tag for the API key behind a request (never the key)."""
    if not authorization:
        return None
    token = authorization.removeprefix("Bearer ").removeprefix("bearer ").strip()
    if not token:
        return None
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:16]


_TS = pl.Datetime("us", "UTC")

# Journal record field -> (usage_events column, type). The writer reads journal lines
# with exactly this schema (timestamps travel as integer microseconds).
COLUMNS: dict[str, tuple[str, pl.DataType]] = {
    "event_id": ("event_id", pl.String()),
    "response_id": ("response_id", pl.String()),
    "endpoint": ("endpoint", pl.String()),
    "model": ("model", pl.String()),
    "requested_model": ("requested_model", pl.String()),
    "status": ("status", pl.String()),
    "http_status": ("http_status", pl.Int16()),
    "user_id": ("user_id", pl.String()),
    "user_source": ("user_source", pl.String()),
    "metadata": ("metadata", pl.String()),
    "input_tokens": ("input_tokens", pl.Int64()),
    "cached_input_tokens": ("cached_input_tokens", pl.Int64()),
    "cache_write_tokens": ("cache_write_tokens", pl.Int64()),
    "cache_write_30m_tokens": ("cache_write_30m_tokens", pl.Int64()),
    "cache_write_12h_tokens": ("cache_write_12h_tokens", pl.Int64()),
    "output_tokens": ("output_tokens", pl.Int64()),
    "reasoning_tokens": ("reasoning_tokens", pl.Int64()),
    "total_tokens": ("total_tokens", pl.Int64()),
    "web_search_calls": ("web_search_calls", pl.Int32()),
    "image_gen_input_tokens": ("image_gen_input_tokens", pl.Int64()),
    "image_gen_input_image_tokens": ("image_gen_input_image_tokens", pl.Int64()),
    "image_gen_cached_tokens": ("image_gen_cached_tokens", pl.Int64()),
    "image_gen_output_tokens": ("image_gen_output_tokens", pl.Int64()),
    "input_audio_tokens": ("input_audio_tokens", pl.Int64()),
    "cached_audio_tokens": ("cached_audio_tokens", pl.Int64()),
    "output_audio_tokens": ("output_audio_tokens", pl.Int64()),
    "input_image_tokens": ("input_image_tokens", pl.Int64()),
    "cached_image_tokens": ("cached_image_tokens", pl.Int64()),
    "output_image_tokens": ("output_image_tokens", pl.Int64()),
    "audio_ms": ("audio_ms", pl.Int64()),
    "input_characters": ("input_characters", pl.Int64()),
    "usage_unreported": ("usage_unreported", pl.Boolean()),
    "service_tier": ("service_tier", pl.String()),
    "previous_response_id": ("previous_response_id", pl.String()),
    "conversation_id": ("conversation_id", pl.String()),
    "background": ("background", pl.Boolean()),
    "streamed": ("streamed", pl.Boolean()),
    "client_disconnected": ("client_disconnected", pl.Boolean()),
    "incomplete_reason": ("incomplete_reason", pl.String()),
    "error_type": ("error_type", pl.String()),
    "error_code": ("error_code", pl.String()),
    "created_at_us": ("created_at", _TS),
    "completed_at_us": ("completed_at", _TS),
    "request_started_at_us": ("request_started_at", _TS),
    "latency_ms": ("latency_ms", pl.Float64()),
    "ttft_ms": ("ttft_ms", pl.Float64()),
    "key_fingerprint": ("key_fingerprint", pl.String()),
    "recorded_at_us": ("recorded_at", _TS),
    "transport": ("transport", pl.String()),
    "body_user_id": ("body_user_id", pl.String()),
    "truncated_fields": ("truncated_fields", pl.String()),
}

# Usage by modality and by units beyond tokens (migration 0013): what the answer reports.
MODALITY_COUNTS = (
    "input_audio_tokens",
    "cached_audio_tokens",
    "output_audio_tokens",
    "input_image_tokens",
    "cached_image_tokens",
    "output_image_tokens",
    "audio_ms",
)

# Columns an "update" may change: the outcome, never who asked or what they tagged.
UPDATABLE_COLUMNS = (
    "model",
    "status",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "cache_write_30m_tokens",
    "cache_write_12h_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
    "web_search_calls",
    "image_gen_input_tokens",
    "image_gen_input_image_tokens",
    "image_gen_cached_tokens",
    "image_gen_output_tokens",
    *MODALITY_COUNTS,
    "usage_unreported",
    "service_tier",
    "incomplete_reason",
    "error_type",
    "error_code",
    "completed_at",
    "latency_ms",
    "ttft_ms",
    "client_disconnected",
    "settled_at",  # the update's own recorded_at (migration 0017)
)


def updated_value(column: str, new: str = "b", old: str = "u") -> str:
    """The SQL for an updatable column's value after an update (`new`) of a row (`old`):
    what an update leaves out is kept (a poller's update knows no model, latency or time
    to first token), and a client that left stays left."""
    if column in ("model", "latency_ms", "ttft_ms"):
        return f'coalesce({new}."{column}", {old}."{column}")'
    if column == "settled_at":
        return f'{new}."recorded_at"'
    if column == "client_disconnected":
        return f'(coalesce({old}."{column}", false) OR coalesce({new}."{column}", false))'
    return f'{new}."{column}"'


def insert_new_sql(table: str) -> str:
    """INSERT of the batch registered as `_new_events` into `table` (stamped with the
    parameter `$seq`), skipping each event already stored. Idempotent on event_id: a
    replayed event carries its original recorded_at, so looking for it among rows
    recorded in the batch's time window finds it, and zone maps on recorded_at keep that
    lookup off the rest of the table."""
    columns = ", ".join(f'"{column}"' for column, _ in COLUMNS.values())
    return f"""
INSERT INTO {table} ({columns}, ingest_seq, updated_at)
SELECT {columns}, $seq, now() FROM _new_events
WHERE event_id NOT IN (
    SELECT event_id FROM {table}
    WHERE recorded_at BETWEEN (SELECT min(recorded_at) FROM _new_events)
                          AND (SELECT max(recorded_at) FROM _new_events)
)
"""
