"""Server-Sent Events read by the spec, incrementally, beside the client.

`SSEParser` follows the WHATWG event-stream rules: one leading UTF-8 BOM is ignored;
lines end in CRLF, LF or CR (a CR that ends one chunk and an LF that starts the next
are one line end); `field:value` drops one space after the colon; `data` lines join
with LF; lines starting with `:` are comments; `id` and `retry` are fields like any
other; a blank line dispatches the event. It works on bytes, so a chunk boundary in
the middle of a multi-byte character is nothing special (line ends are ASCII).

Every byte fed comes back in exactly one event's `raw`, in order (the bytes of an
unterminated last event stay in `pending`). That is what lets the proxy drop or
rewrite one event and forward every other byte as the upstream sent it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

_BOM = b"\xef\xbb\xbf"
_EOL = re.compile(rb"[\r\n]")
_LF = 0x0A
_CR = 0x0D
_COLON = 0x3A


@dataclass(slots=True)
class SSEEvent:
    """One dispatched event. `data` is None when the event had no `data` field (a
    keep-alive comment, a lone `id:`): the spec dispatches nothing for those."""

    raw: bytes
    """Every byte of the event as it came, from the end of the previous one."""
    lead: int
    """How many bytes at the start of `raw` are not this event's own: a BOM, or the LF
    of a CRLF whose CR ended the previous event in an earlier chunk."""
    name: bytes | None
    data: bytes | None


class SSEParser:
    """Feed raw bytes, get back whole events."""

    __slots__ = ("_buf", "_cr", "_data", "_lead", "_name", "_scan", "_started")

    def __init__(self) -> None:
        self._buf = b""  # bytes from the start of the event being read
        self._scan = 0  # where, in _buf, the lines not yet read start
        self._cr = False  # the last byte read was a CR that ended a line
        self._started = False  # past the place where a BOM may stand
        self._lead = 0
        self._name: bytes | None = None
        self._data: list[bytes] | None = None

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet terminated."""
        return self._buf

    def feed(self, chunk: bytes) -> Iterator[SSEEvent]:
        buf = self._buf + chunk if self._buf else chunk
        pos = self._scan
        if not self._started:
            if len(buf) < len(_BOM) and _BOM.startswith(buf):
                self._buf = buf  # perhaps the start of a BOM: wait for more
                return
            self._started = True
            if buf.startswith(_BOM):
                pos = self._lead = len(_BOM)
        start = 0
        end = len(buf)
        if self._cr and pos < end:
            self._cr = False
            if buf[pos] == _LF:
                pos += 1  # the LF of a CRLF split over two chunks
                if pos - start == 1 + self._lead and self._name is None and self._data is None:
                    self._lead += 1
        while pos < end:
            match = _EOL.search(buf, pos)
            if match is None:
                break
            eol = match.start()
            line = buf[pos:eol]
            if buf[eol] == _CR:
                if eol + 1 < end:
                    pos = eol + 2 if buf[eol + 1] == _LF else eol + 1
                else:
                    pos = eol + 1
                    self._cr = True
            else:
                pos = eol + 1
            if line:
                self._field(line)
                continue
            data = self._data
            yield SSEEvent(
                buf[start:pos], self._lead, self._name, None if data is None else b"\n".join(data)
            )
            start = pos
            self._lead = 0
            self._name = None
            self._data = None
        self._buf = buf[start:]
        self._scan = pos - start

    def _field(self, line: bytes) -> None:
        if line[0] == _COLON:
            return  # a comment
        colon = line.find(b":")
        if colon < 0:
            field, value = line, b""
        else:
            field, value = line[:colon], line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        if field == b"data":
            if self._data is None:
                self._data = [value]
            else:
                self._data.append(value)
        elif field == b"event":
            self._name = value
        # `id` and `retry` concern the client's reconnection, not usage: read past them.


def replace_data(event: SSEEvent, data: bytes) -> bytes:
    """`event`'s bytes with its `data` lines carrying `data` instead: every other line,
    every line end and the `data:` spelling stay as they came. `data` must have no more
    lines than the event's own data (it is the same payload less some of it)."""
    new_lines = data.split(b"\n")
    out: list[bytes] = [event.raw[: event.lead]]
    parser = _Lines(event.raw, event.lead)
    written = 0
    for line, ending in parser:
        if _is_data_line(line):
            if written < len(new_lines):
                value = new_lines[written]
                # `data:x` reads as x, `data: x` too; a value that starts with a space
                # needs the spelled-out one, or the reader would drop its space.
                spaced = line[5:6] == b" " or value[:1] == b" "
                out.append((b"data: " if spaced else b"data:") + value + ending)
                written += 1
            continue  # a line the shorter payload no longer needs
        out.append(line + ending)
    return b"".join(out)


def _is_data_line(line: bytes) -> bool:
    return line == b"data" or line.startswith(b"data:")


class _Lines:
    """The lines of one event's bytes, each with its own line end."""

    def __init__(self, raw: bytes, start: int) -> None:
        self._raw, self._pos = raw, start

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        raw, pos, end = self._raw, self._pos, len(self._raw)
        while pos < end:
            match = _EOL.search(raw, pos)
            if match is None:
                yield raw[pos:], b""
                return
            eol = match.start()
            stop = eol + 2 if raw[eol] == _CR and raw[eol + 1 : eol + 2] == b"\n" else eol + 1
            yield raw[pos:eol], raw[eol:stop]
            pos = stop
