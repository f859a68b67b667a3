"""Editing JSON text without re-encoding it: the client keeps the upstream's spelling."""

from __future__ import annotations

import functools
import re
from typing import Any

import orjson

# Strings (escapes included) and the structural characters; numbers, literals and
# blanks lie between tokens and are never needed to find a member's bounds.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\],:]', re.DOTALL)
_WS = b" \t\r\n"
_OPEN = frozenset(b"{[")
_CLOSE = frozenset(b"}]")


def without_member(text: bytes, key: str, parsed: dict[str, Any] | None = None) -> bytes | None:
    """`text`, a JSON object (`parsed`, if the caller has parsed it already), less its
    top-level member `key` (however its name is spelled, escapes included), every other
    byte as it was; None if it has no such member or is not a JSON object.

    A candidate is found by pattern, cut, and kept only if the shorter text parses to
    an object that lost exactly that top-level member: a lookalike inside a string or a
    nested object is never cut. A name spelled with `\\u` escapes is found by reading
    every token. Should neither find it, the object is re-encoded: valid JSON with the
    same meaning."""
    if parsed is None:
        try:
            loaded = orjson.loads(text)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(loaded, dict):
            return None
        parsed = loaded
    if key not in parsed:
        return None
    for match in _name_pattern(key).finditer(text):
        end = _value_end(text, match.end())
        if end is None:
            continue
        shorter = _cut(text, match.start(), end)
        try:
            again = orjson.loads(shorter)
        except orjson.JSONDecodeError:
            continue
        if isinstance(again, dict) and key not in again and len(again) == len(parsed) - 1:
            return shorter
    if b"\\u" in text:
        span = _member_span(text, key)
        if span is not None:
            return _cut(text, *span)
    return orjson.dumps({k: v for k, v in parsed.items() if k != key})


@functools.cache
def _name_pattern(key: str) -> re.Pattern[bytes]:
    return re.compile(rb'"' + re.escape(key.encode()) + rb'"\s*:\s*')


def _value_end(text: bytes, pos: int) -> int | None:
    """Where the value at `pos` ends: `null`, or an object or array (strings inside
    are skipped whole); None for anything else."""
    if text.startswith(b"null", pos):
        return pos + 4
    if pos >= len(text) or text[pos] not in _OPEN:
        return None
    depth = 0
    for match in _TOKEN.finditer(text, pos):
        char = text[match.start()]
        if char in _OPEN:
            depth += 1
        elif char in _CLOSE:
            depth -= 1
            if depth == 0:
                return match.end()
    return None


def _member_span(text: bytes, key: str) -> tuple[int, int] | None:
    """(start of its name, end of its value) of the top-level member `key`, found by
    reading every token (names spelled with escapes too)."""
    depth = 0
    expect_name = False
    start = -1
    for match in _TOKEN.finditer(text):
        char = text[match.start()]
        if char == 0x22:  # a string
            if depth == 1 and expect_name:
                expect_name = False
                if orjson.loads(match.group()) == key:
                    start = match.start()
        elif char in _OPEN:
            depth += 1
            expect_name = depth == 1 and char == 0x7B
        elif char == 0x2C and depth == 1:  # a comma between members
            if start >= 0:
                return start, _rstrip(text, match.start())
            expect_name = True
        elif char in _CLOSE:
            if depth == 1 and start >= 0:
                return start, _rstrip(text, match.start())
            depth -= 1
    return None


def _rstrip(text: bytes, end: int) -> int:
    while end > 0 and text[end - 1] in _WS:
        end -= 1
    return end


def _cut(text: bytes, start: int, stop: int) -> bytes:
    """Remove text[start:stop] and one comma that separated it from a neighbour."""
    before = _rstrip(text, start)
    if before > 0 and text[before - 1] == 0x2C:
        return text[: before - 1] + text[stop:]  # `, "key": v` (not the first member)
    after = stop
    while after < len(text) and text[after] in _WS:
        after += 1
    if after < len(text) and text[after] == 0x2C:
        after += 1
        while after < len(text) and text[after] in _WS:
            after += 1
        return text[:start] + text[after:]  # `"key": v, ` (the first of several)
    return text[:start] + text[stop:]  # the only member
