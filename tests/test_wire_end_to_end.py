"""One traffic, three upstream spellings, the same rows.

Three fake upstreams with the same seed: OpenAI's compact JSON; `json.dumps`'s spaced
JSON with CRLF line ends; and every spelling at random (key order, escapes, `\\r`,
split `data:` lines, comments, a BOM, chunks cut at random bytes). Each sits behind
its own real tokentill; the openai SDK sends the same requests through each. The
rows must be the same, and so must what the SDK decoded.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Running, serve_tokentill
from tests.servers import serve_in_thread
from tokentill.fakeai import create_fake_app
from tokentill.fakeai.wire import Wire, parse_wire

# What varies between two runs of the same traffic whatever the wire: ids and clocks.
_VOLATILE = {
    "event_id",
    "response_id",
    "previous_response_id",
    "created_at",
    "completed_at",
    "request_started_at",
    "latency_ms",
    "ttft_ms",
    "recorded_at",
    "ingest_seq",
    "updated_at",
    "settled_at",  # a time, as recorded_at
}

WIRES = {
    "compact": Wire(),
    "spaced-crlf": parse_wire("spaced,crlf"),
    # All at random but the BOM: the openai SDK's own SSE decoder does not skip one
    # (it would fail going direct too); test_stream_wire covers the BOM.
    "random": Wire(
        spacing="random",
        line_end="random",
        data_space=False,
        split_data=True,
        comments=True,
        chunks=True,
        seed=5,
    ),
}


@pytest.fixture(scope="module")
def tokentills(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Running]]:
    running: dict[str, Running] = {}
    stack = []
    for name, wire in WIRES.items():
        upstream = serve_in_thread(create_fake_app(seed=21, wire=wire))
        stack.append(upstream)
        url = upstream.__enter__()
        db: Path = tmp_path_factory.mktemp(name) / "w.duckdb"
        proxy = serve_tokentill(db, url)
        stack.append(proxy)
        running[name] = proxy.__enter__()
    yield running
    for context in reversed(stack):
        context.__exit__(None, None, None)


def _traffic(tokentill: Running) -> list[Any]:
    """Every metered shape, in one fixed order (the fake's usage follows the order)."""
    client = tokentill.client()
    seen: list[Any] = []
    with client.responses.stream(model="o4-mini", input="hi", user="u1") as stream:
        seen.append([e.type for e in stream])
        seen.append(stream.get_final_response().usage)
    seen.append(client.responses.create(model="gpt-4o-mini", input="x", user="u2").usage)
    seen.append(
        [
            e.type
            for e in client.responses.create(
                model="gpt-5-mini",
                input="hi",
                stream=True,
                extra_headers={"x-fake-scenario": "incomplete"},
            )
        ]
    )
    no_usage = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            user="u3",
        )
    )
    # The client did not ask for usage: no usage chunk, no `usage` field on any chunk.
    assert all(chunk.choices for chunk in no_usage)
    assert not any("usage" in chunk.model_fields_set for chunk in no_usage)
    seen.append("".join(c.choices[0].delta.content or "" for c in no_usage if c.choices))
    with_usage = list(
        client.chat.completions.create(
            model="gpt-4.1-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
            n=2,
        )
    )
    assert with_usage[-1].choices == [] and with_usage[-1].usage is not None
    seen.append(with_usage[-1].usage)
    seen.append(
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], user="u4"
        ).usage
    )
    # The legacy Completions stream (usage asked for on the client's behalf, then cut
    # out) and an embeddings answer, in the same spellings.
    legacy = list(
        client.completions.create(
            model="gpt-3.5-turbo-instruct", prompt="hi", stream=True, user="u5"
        )
    )
    assert all(chunk.choices for chunk in legacy)
    assert not any("usage" in chunk.model_fields_set for chunk in legacy)
    seen.append("".join(c.choices[0].text for c in legacy))
    seen.append(
        client.embeddings.create(model="text-embedding-3-small", input="hi", user="u6").usage
    )
    # Images, transcriptions and speech: their JSON answers and their typed SSE streams.
    seen.append(client.images.generate(model="gpt-image-1", prompt="a fox", user="u7").usage)
    images = list(
        client.images.generate(
            model="gpt-image-1.5", prompt="a heron", stream=True, partial_images=1
        )
    )
    seen.append([(e.type, getattr(e, "usage", None)) for e in images])
    audio = ("talk.wav", b"RIFF" + b"\x80" * 32_000)
    seen.append(client.audio.transcriptions.create(model="gpt-4o-transcribe", file=audio).usage)
    transcript = list(
        client.audio.transcriptions.create(model="gpt-4o-mini-transcribe", file=audio, stream=True)
    )
    seen.append([(e.type, getattr(e, "usage", None)) for e in transcript])
    speech = client.audio.speech.create(
        model="gpt-4o-mini-tts", voice="alloy", input="Hello there.", stream_format="sse"
    )
    seen.append(b"speech.audio.done" in speech.content)
    return seen


def _rows(tokentill: Running) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in _VOLATILE} for row in tokentill.rows("true")]


def test_every_spelling_of_the_same_traffic_gives_the_same_rows(
    tokentills: dict[str, Running],
) -> None:
    seen = {name: _traffic(running) for name, running in tokentills.items()}
    rows = {name: _rows(running) for name, running in tokentills.items()}
    assert len(rows["compact"]) == 13
    assert all(row["input_tokens"] for row in rows["compact"])
    assert {row["status"] for row in rows["compact"]} == {"completed", "incomplete"}
    assert rows["spaced-crlf"] == rows["compact"]
    assert rows["random"] == rows["compact"]
    assert seen["spaced-crlf"] == seen["compact"]
    assert seen["random"] == seen["compact"]
