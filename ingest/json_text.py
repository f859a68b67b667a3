"""Editing JSON text without re-encoding it: the client keeps the upstream's spelling."""

from __future__ import annotations

import re
from typing import Any

import orjson

# Strings (escapes included) and the structural characters; numbers, literals and
# blanks lie between tokens and are never needed to find a member's bounds.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\],:]', re.DOTALL)
_WS = b" \t\r\n"
_OPEN = frozenset(b"{[")
_CLOSE = frozenset(b"}]")


def without_member(text: bytes, parsed: dict[str, Any], key: str) -> bytes:
    """`text`, a JSON object already `parsed`, less its top-level member `key` (however
    its name is spelled, escapes included), every other byte as it was. Should the text
    not be the object it was parsed from, the object is re-encoded instead: valid JSON
    with the same meaning."""
    span = _member_span(text, key)
    if span is None:
        return orjson.dumps({k: v for k, v in parsed.items() if k != key})
    return _cut(text, *span)


def _member_span(text: bytes, key: str) -> tuple[int, int] | None:
    """(start of its name, end of its value) of the top-level member `key`."""
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
