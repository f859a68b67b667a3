"""The fake's other billable endpoints: embeddings, legacy completions, moderations.

Payloads are the openai SDK's own types (`CreateEmbeddingResponse`, `Completion`,
`ModerationCreateResponse`). Embeddings honour `encoding_format: base64` (the SDK asks
for it by default and decodes it); completions stream like Chat Completions, with the
usage-only chunk when `stream_options.include_usage` is set; moderations are free and
answer every category unflagged. Each answer is billed in the ledger like the others.
"""

from __future__ import annotations

import base64
import random
import struct
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final

import orjson
from openai.types.completion import Completion
from openai.types.completion_choice import CompletionChoice
from openai.types.completion_usage import CompletionUsage
from openai.types.create_embedding_response import CreateEmbeddingResponse
from openai.types.create_embedding_response import Usage as EmbeddingUsage
from openai.types.embedding import Embedding
from openai.types.moderation_create_response import ModerationCreateResponse

from tokentill.fakeai import errors, ids
from tokentill.fakeai.ledger import LedgerEntry
from tokentill.fakeai.request import parse_body
from tokentill.fakeai.sdk import build, coerce, dump
from tokentill.fakeai.text import filler_text, split_deltas

if TYPE_CHECKING:
    from starlette.requests import Request

    from tokentill.fakeai.app import FakeUpstream

EMBEDDINGS_PATH: Final = "/v1/embeddings"
COMPLETIONS_PATH: Final = "/v1/completions"
MODERATIONS_PATH: Final = "/v1/moderations"
_DIMENSIONS: Final = 8  # small vectors: the fake's are for plumbing, not for search
_CATEGORIES: Final = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
    "illicit/violent", "self-harm", "self-harm/instructions", "self-harm/intent", "sexual",
    "sexual/minors", "violence", "violence/graphic",
)  # fmt: skip


def _texts(value: Any) -> list[str]:
    """The strings of an `input`/`prompt` (a string, a list of strings, or token lists)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        out = []
        for item in value:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, list):
                out.append(" " * len(item) * 4)  # a token list: about 4 characters a token
            elif isinstance(item, dict) and isinstance(item.get("text"), str):
                out.append(item["text"])
        return out
    return []


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _required(body: dict[str, Any], name: str) -> Any:
    if body.get(name) is None:
        raise errors.missing_parameter(name)
    return body[name]


def _entry(
    path: str,
    object_id: str,
    model: str,
    body: dict[str, Any],
    key: str,
    input_tokens: int,
    output_tokens: int,
    *,
    status: str = "completed",
    streamed: bool = False,
) -> LedgerEntry:
    user = body.get("user") if isinstance(body.get("user"), str) else None
    now = int(time.time())
    return LedgerEntry(
        id=object_id,
        endpoint=path,
        model=model,
        requested_model=str(body.get("model")),
        status=status,
        incomplete_reason="max_output_tokens" if status == "incomplete" else None,
        error_code=None,
        input_tokens=input_tokens,
        cached_input_tokens=0,
        cache_write_tokens=0,
        cache_write_30m_tokens=None,
        cache_write_12h_tokens=None,
        output_tokens=output_tokens,
        reasoning_tokens=0,
        total_tokens=input_tokens + output_tokens,
        web_search_calls=None,
        image_gen_input_tokens=None,
        image_gen_input_image_tokens=None,
        image_gen_output_tokens=None,
        service_tier="default",
        user=user,
        safety_identifier=None,
        created_at=now,
        completed_at=now,
        key_fingerprint=ids.key_fingerprint(key),
        streamed=streamed,
        background=False,
        delivered=True,
    )


def embeddings(
    fake: FakeUpstream, body: dict[str, Any], key: str, *, tier: str = "default"
) -> bytes:
    model = _required(body, "model")
    texts = _texts(_required(body, "input"))
    if not texts:
        raise errors.invalid_type("input", "a string or an array", "something else")
    rng = random.Random(orjson.dumps(body))
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, _ in enumerate(texts):
        vector = [round(rng.uniform(-1, 1), 6) for _ in range(_DIMENSIONS)]
        value: Any = vector
        if as_base64:
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append(build(Embedding, embedding=value, index=index, object="embedding"))
    tokens = sum(_tokens(t) for t in texts)
    answer = build(
        CreateEmbeddingResponse,
        object="list",
        data=data,
        model=str(model),
        usage=build(EmbeddingUsage, prompt_tokens=tokens, total_tokens=tokens),
    )
    # Embeddings have no id: the ledger keys them by one of its own.
    entry = _entry(EMBEDDINGS_PATH, ids.request_id(), str(model), body, key, tokens, 0)
    fake.ledger.record(replace(entry, service_tier=tier))
    # The SDK types `embedding` as floats; on the wire base64 is a string it decodes.
    return orjson.dumps(answer.model_dump(exclude_unset=True, warnings=False))


def moderations(fake: FakeUpstream, body: dict[str, Any], key: str) -> bytes:
    model = body.get("model") if isinstance(body.get("model"), str) else "omni-moderation-latest"
    texts = _texts(_required(body, "input"))
    result = {
        "flagged": False,
        "categories": dict.fromkeys(_CATEGORIES, False),
        "category_scores": dict.fromkeys(_CATEGORIES, 0.0001),
        "category_applied_input_types": {c: ["text"] for c in _CATEGORIES},
    }
    answer = coerce(
        ModerationCreateResponse,
        {
            "id": "modr-" + ids.request_id()[4:],
            "model": "omni-moderation-2024-09-26" if model == "omni-moderation-latest" else model,
            "results": [result for _ in texts] or [result],
        },
    )
    fake.ledger.record(_entry(MODERATIONS_PATH, answer.id, answer.model, body, key, 0, 0))
    return orjson.dumps(answer.model_dump(by_alias=True, exclude_unset=True))


class CompletionDraft:
    """One legacy completion, decided up front: the JSON and the stream are views of it."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.model = str(_required(body, "model"))
        prompts = _texts(_required(body, "prompt"))
        self.body = body
        self.id = "cmpl-" + ids.chat_completion_id()[9:]
        self.created = int(time.time())
        rng = random.Random(orjson.dumps(body))
        given = body.get("max_tokens")
        limit: int = given if isinstance(given, int) and not isinstance(given, bool) else 16
        wanted = rng.randint(8, 64)
        self.output_tokens: int = min(wanted, limit)
        self.finish = "length" if wanted > limit else "stop"
        self.input_tokens = sum(_tokens(p) for p in prompts) or 1
        self.text = filler_text(self.output_tokens, rng)

    def usage(self) -> CompletionUsage:
        return build(
            CompletionUsage,
            prompt_tokens=self.input_tokens,
            completion_tokens=self.output_tokens,
            total_tokens=self.input_tokens + self.output_tokens,
        )

    def _completion(self, choices: list[CompletionChoice], **extra: Any) -> Completion:
        return build(
            Completion,
            id=self.id,
            object="text_completion",
            created=self.created,
            model=self.model,
            choices=choices,
            system_fingerprint=ids.system_fingerprint(self.model),
            **extra,
        )

    def _choice(self, text: str, finish: str | None) -> CompletionChoice:
        return build(CompletionChoice, index=0, text=text, logprobs=None, finish_reason=finish)

    def whole(self) -> Completion:
        return self._completion([self._choice(self.text, self.finish)], usage=self.usage())

    def chunks(self) -> Iterator[Completion]:
        options = self.body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        extra: dict[str, Any] = {"usage": None} if include_usage else {}
        deltas = split_deltas(self.text, 4) or [""]
        for index, delta in enumerate(deltas):
            finish = self.finish if index == len(deltas) - 1 else None
            yield self._completion([self._choice(delta, finish)], **extra)
        if include_usage:
            yield self._completion([], usage=self.usage())

    def status(self) -> str:
        return "incomplete" if self.finish == "length" else "completed"


def completion(fake: FakeUpstream, body: dict[str, Any], key: str) -> tuple[bytes, CompletionDraft]:
    draft = CompletionDraft(body)
    entry = _entry(
        COMPLETIONS_PATH, draft.id, draft.model, body, key, draft.input_tokens,
        draft.output_tokens, status=draft.status(), streamed=body.get("stream") is True,
    )  # fmt: skip
    fake.ledger.record(entry)
    return dump(draft.whole()), draft


async def read_json(request: Request) -> dict[str, Any]:
    return parse_body(await request.body())
