"""What the warehouse stores is bounded, whatever a client sends.

A client (or an attacker rotating values) must not be able to grow the warehouse, the
journal or the tag rollups with megabytes per request. Metadata is kept within the
Response object's own rule (at most 16 pairs, keys up to 64 characters, string values
up to 512); every other stored string has a length bound. What is beyond a bound is cut,
never silently: the row names the fields that were cut (`truncated_fields`), and the
metric `tokentill_stored_fields_cut_total{field}` counts them.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from tokentill.warehouse.events import UsageEvent

METADATA_PAIRS: Final = 16
METADATA_KEY: Final = 64
METADATA_VALUE: Final = 512

# Stored string fields and their bounds (characters).
LIMITS: Final[dict[str, int]] = {
    "user_id": 256,
    "body_user_id": 256,
    "model": 256,
    "requested_model": 256,
    "response_id": 256,
    "event_id": 256,
    "previous_response_id": 256,
    "conversation_id": 256,
    "service_tier": 64,
    "incomplete_reason": 64,
    "error_type": 128,
    "error_code": 128,
    "key_fingerprint": 64,
}


def bounded_metadata(value: Any) -> tuple[str | None, bool]:
    """The metadata to store as JSON text (None when there is none), and whether any of
    it was cut: pairs past the 16th, non-string values, keys and values past their
    lengths."""
    if not isinstance(value, dict) or not value:
        return None, False
    kept: dict[str, str] = {}
    cut = len(value) > METADATA_PAIRS
    for key, item in list(value.items())[:METADATA_PAIRS]:
        if not isinstance(key, str) or not isinstance(item, str):
            cut = True
            continue
        if len(key) > METADATA_KEY or len(item) > METADATA_VALUE:
            cut = True
        kept[key[:METADATA_KEY]] = item[:METADATA_VALUE]
    if not kept:
        return None, cut
    return orjson.dumps(kept).decode(), cut


def bound_event(event: UsageEvent) -> list[str]:
    """Cut `event`'s strings to their bounds; return the names of the fields cut (also
    recorded in the event's `truncated_fields`)."""
    cut: list[str] = []
    for name, limit in LIMITS.items():
        value = getattr(event, name)
        if isinstance(value, str) and len(value) > limit:
            setattr(event, name, value[:limit])
            cut.append(name)
    if cut:
        earlier = event.truncated_fields.split(",") if event.truncated_fields else []
        event.truncated_fields = ",".join(dict.fromkeys([*earlier, *cut]))
    return cut
