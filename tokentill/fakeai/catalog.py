"""The model catalog: aliases, their dated snapshots, and which models reason.

OpenAI answers a request for an alias (``gpt-4o``) with the snapshot that served it
(``gpt-4o-2024-08-06``); dated snapshots, fine-tunes (``ft:...``) and models it does
not know are echoed unchanged.
"""

from __future__ import annotations

from typing import Final

SNAPSHOTS: Final[dict[str, str]] = {
    "gpt-3.5-turbo": "gpt-3.5-turbo-0125",
    "gpt-4": "gpt-4-0613",
    "gpt-4-turbo": "gpt-4-turbo-2024-04-09",
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "gpt-4.1-nano": "gpt-4.1-nano-2025-04-14",
    "o1": "o1-2024-12-17",
    "o1-pro": "o1-pro-2025-03-19",
    "o3": "o3-2025-04-16",
    "o3-mini": "o3-mini-2025-01-31",
    "o3-pro": "o3-pro-2025-06-10",
    "o4-mini": "o4-mini-2025-04-16",
    "gpt-5": "gpt-5-2025-08-07",
    "gpt-5-mini": "gpt-5-mini-2025-08-07",
    "gpt-5-nano": "gpt-5-nano-2025-08-07",
    "gpt-5-pro": "gpt-5-pro-2025-10-06",
    "gpt-5.1": "gpt-5.1-2025-11-13",
    "gpt-5.2": "gpt-5.2-2025-12-11",
    "gpt-5.2-pro": "gpt-5.2-pro-2025-12-11",
    "gpt-5.4-mini": "gpt-5.4-mini-2026-03-17",
    "gpt-5.4-nano": "gpt-5.4-nano-2026-03-17",
    "gpt-5.5": "gpt-5.5-2026-04-23",
    "gpt-5.5-pro": "gpt-5.5-pro-2026-04-23",
}
"""Alias -> the snapshot OpenAI reports having served it."""

_REASONING_PREFIXES: Final = ("o1", "o3", "o4", "gpt-5")
_NON_REASONING_MARKERS: Final = ("-chat-latest",)
_CREATED_BASE: Final = 1_700_000_000


def snapshot_for(model: str) -> str:
    """The model name OpenAI puts in the answer for a requested `model`."""
    return SNAPSHOTS.get(model, model)


def base_model(model: str) -> str:
    """The model family behind a name: ``ft:gpt-4o-mini-2024-07-18:org::id`` -> the base."""
    if model.startswith("ft:"):
        return model[3:].split(":", 1)[0]
    return model


def is_reasoning_model(model: str) -> bool:
    """Whether the model spends reasoning tokens (o-series and gpt-5 family)."""
    base = base_model(model)
    if any(marker in base for marker in _NON_REASONING_MARKERS):
        return False
    return base.startswith(_REASONING_PREFIXES)


def listed_models() -> list[tuple[str, int]]:
    """The ids (with a stable fake creation time) that GET /v1/models lists."""
    names = sorted({*SNAPSHOTS, *SNAPSHOTS.values()})
    return [(name, _CREATED_BASE + 86_400 * index) for index, name in enumerate(names)]
