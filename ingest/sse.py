"""Server-Sent Events read by the spec, incrementally, beside the client.

The WHATWG event-stream rules: one leading UTF-8 BOM is ignored; lines end in CRLF, LF
or CR (a CR that ends one chunk and an LF that starts the next are one line end);
`field:value` drops one space after the colon; `data` lines join with LF; lines
starting with `:` are comments; `id` and `retry` are fields like any other; a blank
line dispatches the event. It works on bytes, so a chunk boundary inside a multi-byte
character is nothing special (line ends are ASCII).

Reading is in two steps, so that the hot path pays for what it needs: `SSEParser.feed`
cuts the stream into event blocks (one regex over the chunk: a line end followed by
another), and `event_fields` reads a block's fields, which callers do only for the
blocks a byte pre-filter lets through (a field's bytes are always in its block).

Every byte fed comes back in exactly one block, in order (an unterminated last event
stays in `pending`): that is what lets the proxy drop or rewrite one event and forward
every other byte as the upstream sent it.
"""

from __future__ import annotations

import re

_BOM = b"\xef\xbb\xbf"
# A line end, then another: the end of an event. A CR followed by LF is one line end,
# so a CR only counts alone when no LF follows it (or the buffer ends after it).
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_COLON = 0x3A


class SSEParser:
    """Feed raw bytes, get back whole event blocks (each with its blank line)."""

    __slots__ = ("_buf", "_started")

    def __init__(self) -> None:
        self._buf = b""
        self._started = False  # past the place where a BOM may stand

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet terminated."""
        return self._buf

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf + chunk if self._buf else chunk
        if not self._started:
            if len(buf) < len(_BOM) and _BOM.startswith(buf):
                self._buf = buf  # perhaps the start of a BOM: wait for more
                return []
            self._started = True
        start = 0
        blocks = []
        if b"\r" not in buf:
            # LF line ends only (OpenAI's, and most servers'): an event ends at "\n\n".
            end = buf.find(b"\n\n")
            while end >= 0:
                blocks.append(buf[start : end + 2])
                start = end + 2
                end = buf.find(b"\n\n", start)
            self._buf = buf[start:]
            return blocks
        # A block may end in a CR that was the first half of a CRLF cut between chunks:
        # its LF then opens the next block, where `event_fields` reads it as a blank
        # line with no fields, as the spec does.
        for match in _EVENT_END.finditer(buf):
            end = match.end()
            blocks.append(buf[start:end])
            start = end
        self._buf = buf[start:]
        return blocks


def event_fields(block: bytes) -> tuple[bytes | None, bytes | None]:
    """The `event:` name (None if absent) and the joined `data:` payload (None if the
    event has no `data` field: the spec dispatches nothing for it) of one block."""
    if block.startswith(_BOM):
        block = block[len(_BOM) :]
    lines = block.split(b"\n") if b"\r" not in block else _LINE_END.split(block)
    name: bytes | None = None
    data: list[bytes] | None = None
    for line in lines:
        if not line or line[0] == _COLON:
            continue
        colon = line.find(b":")
        if colon < 0:
            field, value = line, b""
        else:
            field, value = line[:colon], line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        if field == b"data":
            if data is None:
                data = [value]
            else:
                data.append(value)
        elif field == b"event":
            name = value
        # `id` and `retry` concern the client's reconnection, not usage: read past them.
    return name, None if data is None else b"\n".join(data)


def lead(block: bytes) -> bytes:
    """The bytes at the start of `block` that are not its event's own (a BOM, the LF of
    a CRLF cut between chunks, blank lines): kept when the event itself is dropped."""
    start = len(_BOM) if block.startswith(_BOM) else 0
    end = start
    while end < len(block) and block[end] in b"\r\n":
        end += 1
    return block[:end]


def replace_data(block: bytes, data: bytes) -> bytes:
    """`block` with its `data` lines carrying `data` instead: every other line, every
    line end and the `data:` spelling stay as they came. `data` must have no more lines
    than the event's own data (it is the same payload less some of it)."""
    if block.startswith(b"data:") and block.endswith(b"\n\n") and block.count(b"\n") == 2:
        # One `data:` line and its blank line (OpenAI's own framing), with LF line ends.
        spaced = block[5:6] == b" " or data[:1] == b" "
        return (b"data: " if spaced else b"data:") + data + b"\n\n"
    new_lines = data.split(b"\n")
    out: list[bytes] = []
    written = 0
    pos = 0
    for match in _LINE_END.finditer(block):
        line, ending = block[pos : match.start()], match.group()
        pos = match.end()
        bare = line[len(_BOM) :] if line.startswith(_BOM) else line
        if bare == b"data" or bare.startswith(b"data:"):
            if written < len(new_lines):
                value = new_lines[written]
                # `data:x` reads as x, `data: x` too; a value that starts with a space
                # needs the spelled-out one, or the reader would drop its space.
                spaced = bare[5:6] == b" " or value[:1] == b" "
                prefix = line[: len(line) - len(bare)]  # a BOM stays where it was
                out.append(prefix + (b"data: " if spaced else b"data:") + value + ending)
                written += 1
            continue  # a line the shorter payload no longer needs
        out.append(line + ending)
    out.append(block[pos:])
    return b"".join(out)
