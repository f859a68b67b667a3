"""Incremental Server-Sent Events splitting, for reading a stream beside the client."""

from __future__ import annotations

import re
from collections.abc import Iterator

# Events end with a blank line; servers may use \n, \r\n or \r line endings.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class SSESplitter:
    """Feed raw bytes, get back whole events (the bytes of each, terminator included)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        buffer = self._buffer + chunk if self._buffer else chunk
        start = 0
        for match in _EVENT_END.finditer(buffer):
            yield buffer[start : match.end()]
            start = match.end()
        self._buffer = buffer[start:]

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet terminated."""
        return self._buffer


def event_fields(event: bytes) -> tuple[bytes | None, bytes]:
    """The `event:` name (if any) and the joined `data:` payload of one SSE event."""
    name: bytes | None = None
    data: list[bytes] = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(b"event:"):
            name = line[6:].strip()
    return name, b"\n".join(data)
