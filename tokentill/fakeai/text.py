"""Filler text for the fake's answers, sized to a token count and cut into deltas."""

from __future__ import annotations

import random
from typing import Final

_SOURCE: Final = (
    "the quick brown fox jumps over a lazy dog while seven otters drift past quietly "
    "metering every token that flows through the proxy keeps the invoice honest and "
    "small numbers add up to large bills when nobody is watching the ledger closely "
    "caches help prompts repeat cheaply but reasoning models think before they answer "
    "so output tokens climb faster than anyone expects on a busy afternoon"
)
_WORDS: Final = tuple(_SOURCE.split())
_CORPUS: Final = _WORDS * 64
WORDS_PER_TOKEN: Final = 0.75


def filler_text(tokens: int, rng: random.Random) -> str:
    """About `tokens` tokens of words (one word at minimum when `tokens` > 0)."""
    if tokens <= 0:
        return ""
    count = max(1, int(tokens * WORDS_PER_TOKEN))
    start = rng.randrange(len(_WORDS))
    words = _CORPUS[start : start + count]
    while len(words) < count:
        words += _CORPUS[: count - len(words)]
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def split_deltas(text: str, parts: int) -> list[str]:
    """`text` cut at word boundaries into at most `parts` non-empty deltas."""
    if not text:
        return []
    words = text.split(" ")
    parts = max(1, min(parts, len(words)))
    size = -(-len(words) // parts)
    chunks = [" ".join(words[i : i + size]) for i in range(0, len(words), size)]
    return [chunk if index == 0 else " " + chunk for index, chunk in enumerate(chunks)]
