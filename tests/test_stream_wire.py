"""Streams read by meaning: any valid spelling of the same events gives the same record.

The events come from the fake upstream's own builders (the openai SDK's types); each
example re-spells them with a random `Wire` (JSON spacing, key order, `\\u` escapes,
line ends, `data:` spelling, split data, comments, `id:`/`retry:`, a BOM) and cuts the
bytes at random places, inside multi-byte characters too. The compact run is the
reference: the usage event must be the same, and the client must decode the same
events (for a Chat stream whose usage we asked for on the client's behalf: the same
events less the usage chunk and the `usage` fields, each kept byte for byte).
"""

from __future__ import annotations

import json
import random
import re
import time
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokentill.fakeai.chat_builder import draft_chat
from tokentill.fakeai.request import read_request
from tokentill.fakeai.response_builder import draft_response
from tokentill.fakeai.sdk import dump
from tokentill.fakeai.usage import plan_usage
from tokentill.fakeai.wire import OPENAI, Wire
from tokentill.ingest import json_text
from tokentill.ingest.capture import RequestFacts, StreamCapture
from tokentill.ingest.sse import SSEParser, event_fields, lead

_RECORDED = (
    "response_id",
    "model",
    "status",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
    "incomplete_reason",
    "service_tier",
    "web_search_calls",
    "error_code",
)

wires = st.builds(
    Wire,
    spacing=st.sampled_from(["compact", "spaced", "random"]),
    line_end=st.sampled_from(["lf", "crlf", "cr", "random"]),
    data_space=st.booleans(),
    split_data=st.booleans(),
    comments=st.booleans(),
    bom=st.booleans(),
    chunks=st.booleans(),
    seed=st.integers(0, 2**32),
)
extra_text = st.text(
    alphabet=st.sampled_from(list('aé€😀"\\\n日本語 ,:{}')), min_size=0, max_size=8
)


def _responses_payloads(seed: int, outcome: str | None, extra: str) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    body = {"model": "o4-mini", "input": "hi", "stream": True, "reasoning": {"effort": "low"}}
    if seed % 3 == 0:
        body["tools"] = [{"type": "web_search"}]
    info = read_request(body, "responses")
    forced = {"incomplete": ("incomplete", "max_output_tokens"), "failed": ("failed", None)}
    kind, reason = forced.get(outcome or "", (None, None))
    draft = draft_response(
        info,
        plan_usage(info, rng),
        rng,
        created_at=1_700_000_000,
        forced=kind,
        forced_reason=reason,
    )
    out = []
    for event in draft.events():
        payload = orjson.loads(dump(event))
        if "delta" in payload:
            payload["delta"] += extra  # multi-byte characters, quotes, escapes on the wire
        out.append((payload["type"], orjson.dumps(payload)))
    return out


def _chat_payloads(seed: int, include_usage: bool, extra: str) -> list[tuple[None, bytes]]:
    rng = random.Random(seed)
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "n": 1 + seed % 2,
        "stream_options": {"include_usage": include_usage},
    }
    info = read_request(body, "chat")
    draft = draft_chat(info, plan_usage(info, rng), rng, created=1_700_000_000)
    out: list[tuple[None, bytes]] = []
    for chunk in draft.chunks():
        payload = orjson.loads(chunk if isinstance(chunk, bytes) else dump(chunk))
        for choice in payload.get("choices") or ():
            if choice.get("delta", {}).get("content"):
                choice["delta"]["content"] += extra
        out.append((None, orjson.dumps(payload)))
    out.append((None, b"[DONE]"))
    return out


def _spell(payloads: list[tuple[str | None, bytes]], wire: Wire) -> bytes:
    writer = wire.writer("x")
    frames = []
    for name, payload in payloads:
        frames.extend(writer.frame(name, payload))
    return b"".join(frames)


def _cut(stream: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 40))))
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]


def _capture(endpoint: str, *, strip: bool = False) -> StreamCapture:
    facts = RequestFacts(
        endpoint=endpoint,  # type: ignore[arg-type]
        kind="create",
        started_us=0,
        started_perf=time.perf_counter(),
        stream=True,
        strip_chat_usage=strip,
    )
    return StreamCapture(facts, None, 200)


def _run(capture: StreamCapture, chunks: list[bytes]) -> tuple[dict[str, Any], bytes]:
    out = b"".join(capture.feed(chunk) for chunk in chunks) + capture.flush_tail()
    event = capture.finish(client_disconnected=False)
    return {name: getattr(event, name) for name in _RECORDED}, out


def _client_events(stream: bytes) -> list[tuple[str | None, Any]]:
    """What a client decodes, by a reading of the spec independent of `SSEParser`."""
    if stream.startswith(b"\xef\xbb\xbf"):
        stream = stream[3:]
    text = stream.decode("utf-8")
    events, name, data = [], None, None
    for line in re.split(r"\r\n|\r|\n", text):
        if line == "":
            if data is not None:
                payload = "\n".join(data)
                events.append((name, payload if payload == "[DONE]" else json.loads(payload)))
            name, data = None, None
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                name = value
            elif field == "data":
                data = [*(data or []), value]
    return events


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    wire=wires,
    seed=st.integers(0, 10_000),
    outcome=st.sampled_from([None, "incomplete", "failed"]),
    extra=extra_text,
)
def test_a_responses_stream_is_read_the_same_in_any_spelling(
    wire: Wire, seed: int, outcome: str | None, extra: str
) -> None:
    payloads = _responses_payloads(seed, outcome, extra)
    compact, compact_out = _run(_capture("responses"), [_spell(payloads, OPENAI)])
    spelled = _spell(payloads, wire)
    record, out = _run(_capture("responses"), _cut(spelled, random.Random(seed)))
    assert record == compact
    assert record["status"] == (outcome or "completed")
    assert record["output_tokens"] is not None or outcome == "failed"
    assert out == spelled  # forwarded untouched
    assert _client_events(out) == _client_events(compact_out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wire=wires, seed=st.integers(0, 10_000), extra=extra_text)
def test_a_chat_stream_is_read_the_same_in_any_spelling(wire: Wire, seed: int, extra: str) -> None:
    payloads = _chat_payloads(seed, True, extra)
    compact, _ = _run(_capture("chat.completions"), [_spell(payloads, OPENAI)])
    assert compact["status"] == "completed" and compact["input_tokens"]
    spelled = _spell(payloads, wire)
    record, out = _run(_capture("chat.completions"), _cut(spelled, random.Random(seed)))
    assert record == compact
    assert out == spelled


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wire=wires, seed=st.integers(0, 10_000), extra=extra_text)
def test_usage_we_asked_for_is_taken_out_exactly_in_any_spelling(
    wire: Wire, seed: int, extra: str
) -> None:
    """The client did not ask for usage: it gets the upstream's bytes less the usage
    chunk and the `usage` members, and decodes what an upstream asked without usage
    would have sent; the record still has the usage."""
    with_usage = _chat_payloads(seed, True, extra)
    compact, _ = _run(_capture("chat.completions"), [_spell(with_usage, OPENAI)])
    spelled = _spell(with_usage, wire)
    record, out = _run(_capture("chat.completions", strip=True), _cut(spelled, random.Random(seed)))
    assert record == compact

    wanted = []
    for _, payload in with_usage:
        if payload == b"[DONE]":
            wanted.append((None, "[DONE]"))
            continue
        obj = orjson.loads(payload)
        if obj["choices"] == [] and isinstance(obj.get("usage"), dict):
            continue  # the usage-only chunk
        obj.pop("usage", None)
        wanted.append((None, obj))
    assert _client_events(out) == wanted
    # Byte for byte: each data payload is the upstream's with one member cut out.
    sent = [d for d in (event_fields(b)[1] for b in SSEParser().feed(spelled)) if d is not None]
    got = [d for d in (event_fields(b)[1] for b in SSEParser().feed(out)) if d is not None]
    sent = [d for d in sent if not _is_usage_only(d)]
    assert len(sent) == len(got)
    for before, after in zip(sent, got, strict=True):
        assert before == after or _one_usage_member_less(before, after), (before, after)


_USAGE_NAME = (
    b'"'
    + b"".join(b"(?:" + bytes([c]) + rb"|\\u00" + f"{c:02x}".encode() + b")" for c in b"usage")
    + b'"'
)
_USAGE_MEMBER = re.compile(rb"[\s,]*" + _USAGE_NAME + rb"\s*:\s*null[\s,]*", re.IGNORECASE)


def _one_usage_member_less(before: bytes, after: bytes) -> bool:
    """`after` is `before` with one span cut out, and that span is a `usage: null` member
    with its separating comma and blanks (its name spelled in any escapes)."""
    size = len(before) - len(after)
    return any(
        before[:i] + before[i + size :] == after and _USAGE_MEMBER.fullmatch(before[i : i + size])
        for i in range(len(after) + 1)
    )


def _is_usage_only(data: bytes) -> bool:
    if data.strip() == b"[DONE]":
        return False
    obj = orjson.loads(data)
    return obj.get("choices") == [] and isinstance(obj.get("usage"), dict)


def _common_prefix(a: bytes, b: bytes) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def test_a_member_lookalike_inside_a_string_is_never_cut() -> None:
    text = b'{"note": "\\"usage\\": null, x", "usage" : null ,"id":"c1"}'
    parsed = orjson.loads(text)
    shorter = json_text.without_member(text, "usage", parsed)
    assert shorter == b'{"note": "\\"usage\\": null, x" ,"id":"c1"}'
    nested = b'{"a": {"usage": null}, "usage": {"x": [1, {"y": "}"}]}}'
    assert json_text.without_member(nested, "usage") == (b'{"a": {"usage": null}}')


def test_a_bom_and_a_crlf_cut_between_chunks_are_read_as_the_spec_says() -> None:
    parser = SSEParser()
    stream = b"\xef\xbb\xbfdata: 1\r\n\r\ndata:2\r\rdata: 3\n\n: c\r\nid: 9\r\n\r\n"
    blocks = []
    for i in range(len(stream)):  # one byte at a time: every boundary is a cut
        blocks.extend(parser.feed(stream[i : i + 1]))
    data = [event_fields(block)[1] for block in blocks]
    assert [d for d in data if d is not None] == [b"1", b"2", b"3"]
    assert b"".join(blocks) + parser.pending == stream
    assert lead(blocks[0]) == b"\xef\xbb\xbf"
