"""How the fake writes its bytes: OpenAI's compact style, or any other valid spelling.

Real upstreams differ in everything the meaning does not fix: JSON spacing and key
order (Python's `json.dumps` writes `"usage": {`), `\\u` escapes, SSE line ends
(`\\n`, `\\r\\n`, `\\r`), `data:` with or without its space, a payload split over
several `data:` lines, comment lines, `id:`/`retry:` fields, a BOM, and TCP chunks
cut at any byte. A `Wire` picks one of those spellings (or a random one per event),
so tests can check that what tokentill records depends on the meaning alone.

The ``x-fake-wire`` header (or ``tokentill fake-upstream --wire``) names a spelling as
comma-separated words: ``compact`` (the default), ``spaced`` (json.dumps' defaults),
``random-json`` (random spacing, key order and escapes), ``lf``/``crlf``/``cr``/
``random-eol``, ``nospace`` (``data:x``), ``split-data``, ``comments``, ``bom``,
``chunks`` (each frame cut at random bytes), ``seed=N``; ``random`` means all the
random ones at once.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

import orjson

from tokentill.fakeai.errors import bad_fake_header

WIRE_HEADER: Final = "x-fake-wire"
BOM: Final = b"\xef\xbb\xbf"

Spacing = Literal["compact", "spaced", "random"]
LineEnd = Literal["lf", "crlf", "cr", "random"]
_EOLS: Final = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}
_BLANKS: Final = ("", " ", "  ", "\t", "\n", " \n  ")


@dataclass(frozen=True, slots=True)
class Wire:
    spacing: Spacing = "compact"
    line_end: LineEnd = "lf"
    data_space: bool = True
    split_data: bool = False
    comments: bool = False
    bom: bool = False
    chunks: bool = False
    seed: int = 0

    @property
    def is_openai(self) -> bool:
        return self == OPENAI

    def writer(self, key: str) -> WireWriter:
        """A writer for one answer; `key` (the object's id) makes its choices repeatable."""
        return WireWriter(self, random.Random(f"{self.seed}:{key}"))


OPENAI: Final = Wire()


def parse_wire(spec: str, base: Wire = OPENAI) -> Wire:
    """A `Wire` from its header spelling (see the module docstring)."""
    wire = base
    for word in (w.strip().lower() for w in spec.split(",")):
        if not word or word == "compact":
            continue
        if word in ("spaced", "random-json"):
            wire = replace(wire, spacing="spaced" if word == "spaced" else "random")
        elif word in _EOLS or word == "random-eol":
            wire = replace(wire, line_end="random" if word == "random-eol" else word)  # type: ignore[arg-type]
        elif word == "nospace":
            wire = replace(wire, data_space=False)
        elif word == "split-data":
            wire = replace(wire, split_data=True)
        elif word == "comments":
            wire = replace(wire, comments=True)
        elif word == "bom":
            wire = replace(wire, bom=True)
        elif word == "chunks":
            wire = replace(wire, chunks=True)
        elif word == "random":
            wire = replace(
                wire,
                spacing="random",
                line_end="random",
                split_data=True,
                comments=True,
                bom=True,
                chunks=True,
            )
        elif word.startswith("seed=") and word[5:].isdigit():
            wire = replace(wire, seed=int(word[5:]))
        else:
            raise bad_fake_header(WIRE_HEADER, spec, "words from the wire list")
    return wire


class WireWriter:
    """Spells one answer: its JSON body, or its SSE frames one by one."""

    def __init__(self, wire: Wire, rng: random.Random) -> None:
        self.wire = wire
        self._rng = rng
        self._first = True

    def json(self, payload: bytes) -> bytes:
        """`payload` (compact JSON) in this wire's spacing, key order and escapes."""
        if self.wire.spacing == "compact":
            return payload
        value = orjson.loads(payload)
        if self.wire.spacing == "spaced":
            return json.dumps(value, ensure_ascii=False).encode()
        return _random_json(value, self._rng).encode()

    def frame(self, event_type: str | None, payload: bytes) -> list[bytes]:
        """One SSE event (`event:` line when `event_type` is given), as the pieces it
        goes out in (one piece unless the wire cuts chunks)."""
        wire, rng = self.wire, self._rng
        eol = self._eol()
        lines: list[bytes] = []
        if wire.comments and rng.random() < 0.3:
            lines.append(b": keep-alive")
        if event_type is not None:
            lines.append(b"event: " + event_type.encode())
        if wire.comments and rng.random() < 0.3:
            lines.append(b"id: " + str(rng.randrange(10**6)).encode())
        if payload == b"[DONE]":
            text = payload
        elif wire.split_data and wire.spacing != "random":
            # Newlines between tokens only: each line of the payload is a `data:` line.
            text = json.dumps(orjson.loads(payload), indent=rng.randint(0, 2)).encode()
        else:
            text = self.json(payload)  # random spacing puts newlines between tokens itself
        prefix = b"data: " if wire.data_space else b"data:"
        lines.extend(prefix + part for part in text.split(b"\n"))
        if wire.comments and rng.random() < 0.2:
            lines.append(b"retry: 3000")
        frame = eol.join(lines) + eol + eol
        if self._first:
            self._first = False
            if wire.bom:
                frame = BOM + frame
        if not wire.chunks or len(frame) < 2:
            return [frame]
        cuts = sorted(rng.sample(range(1, len(frame)), min(len(frame) - 1, rng.randint(1, 3))))
        return [frame[a:b] for a, b in zip([0, *cuts], [*cuts, len(frame)], strict=True)]

    def _eol(self) -> bytes:
        if self.wire.line_end == "random":
            return self._rng.choice((b"\n", b"\r\n", b"\r"))
        return _EOLS[self.wire.line_end]


def _random_json(value: Any, rng: random.Random) -> str:
    """`value` as valid JSON with random blanks, key order and `\\u` escapes."""

    def blank() -> str:
        return rng.choice(_BLANKS)

    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        members = [
            blank() + _random_string(k, rng) + blank() + ":" + blank() + _random_json(v, rng)
            for k, v in items
        ]
        return "{" + ",".join(members) + blank() + "}"
    if isinstance(value, list):
        return "[" + ",".join(blank() + _random_json(v, rng) for v in value) + blank() + "]"
    if isinstance(value, str):
        return _random_string(value, rng)
    return json.dumps(value)


def _random_string(text: str, rng: random.Random) -> str:
    """A JSON string, sometimes with every character escaped as `\\uXXXX`."""
    if rng.random() < 0.1:
        return '"' + "".join(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else c for c in text) + '"'
    return json.dumps(text, ensure_ascii=rng.random() < 0.5)
