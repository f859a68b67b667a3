"""The fake's own billing record: one entry per response/completion it finished.

Every response or chat completion that reached a final state is recorded with the
usage it carried (``None`` numbers for a failed or cancelled one, which OpenAI does
not bill). Answers the client never received whole — the ``cut`` and ``garbage``
scenarios — are still recorded with their usage and ``delivered=False``: the tokens
were spent upstream. Served at ``GET /_fake/ledger``; a later Costs endpoint can
aggregate `entries()`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import orjson

from tokentill.fakeai.usage import UsagePlan


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    id: str
    endpoint: str
    """``/v1/responses`` or ``/v1/chat/completions``."""
    model: str
    """The model as answered (a dated snapshot for aliases)."""
    requested_model: str
    status: str
    """completed, incomplete, failed or cancelled (chat: completed/incomplete/failed)."""
    incomplete_reason: str | None
    error_code: str | None
    input_tokens: int | None
    cached_input_tokens: int | None
    cache_write_tokens: int | None
    cache_write_30m_tokens: int | None
    cache_write_12h_tokens: int | None
    output_tokens: int | None
    reasoning_tokens: int | None
    total_tokens: int | None
    web_search_calls: int | None
    image_gen_input_tokens: int | None
    image_gen_input_image_tokens: int | None
    image_gen_output_tokens: int | None
    service_tier: str
    user: str | None
    safety_identifier: str | None
    created_at: int
    completed_at: int | None
    key_fingerprint: str | None
    streamed: bool
    background: bool
    delivered: bool
    # By modality and unit (the Images, Audio and Realtime APIs; None where not reported).
    input_audio_tokens: int | None = None
    cached_audio_tokens: int | None = None
    output_audio_tokens: int | None = None
    input_image_tokens: int | None = None
    cached_image_tokens: int | None = None
    output_image_tokens: int | None = None
    audio_seconds: float | None = None
    input_characters: int | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def usage_columns(plan: UsagePlan | None) -> dict[str, int | None]:
    """The ledger's usage numbers for `plan` (all None when nothing was billed)."""
    if plan is None:
        return dict.fromkeys(_USAGE_COLUMNS)
    image = plan.image_gen
    tools = plan.tools_present
    return {
        "input_tokens": plan.input_tokens,
        "cached_input_tokens": plan.cached_tokens,
        "cache_write_tokens": plan.cache_write_tokens,
        "cache_write_30m_tokens": plan.cache_write_30m_tokens,
        "cache_write_12h_tokens": plan.cache_write_12h_tokens,
        "output_tokens": plan.output_tokens,
        "reasoning_tokens": plan.reasoning_tokens,
        "total_tokens": plan.total_tokens,
        "web_search_calls": plan.web_search_calls if tools else None,
        "image_gen_input_tokens": (image.input_tokens if image else 0) if tools else None,
        "image_gen_input_image_tokens": (image.input_image_tokens if image else 0)
        if tools
        else None,
        "image_gen_output_tokens": (image.output_image_tokens if image else 0) if tools else None,
    }


_USAGE_COLUMNS = (
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
    "image_gen_output_tokens",
)


class Ledger:
    """An append-only in-memory list of `LedgerEntry` (cleared on demand)."""

    def __init__(self) -> None:
        self._entries: list[LedgerEntry] = []

    def record(self, entry: LedgerEntry) -> None:
        self._entries.append(entry)

    def entries(self) -> list[LedgerEntry]:
        return list(self._entries)

    def clear(self) -> int:
        count = len(self._entries)
        self._entries.clear()
        return count

    def __len__(self) -> int:
        return len(self._entries)

    def to_json(self) -> bytes:
        return orjson.dumps(self._entries)
