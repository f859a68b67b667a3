"""Chat Completions payloads: the `ChatCompletion` and its `ChatCompletionChunk` stream.

Streaming follows OpenAI's ``stream_options.include_usage`` contract: when it is
true every chunk carries ``"usage": null`` and one extra final chunk has
``"choices": []`` and the usage; when it is false or absent no chunk has a
``usage`` key at all.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal

from openai.types.chat.chat_completion import ChatCompletion, Choice
from openai.types.chat.chat_completion_chunk import (
    ChatCompletionChunk,
    ChoiceDelta,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
)
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_message import ChatCompletionMessage
from openai.types.chat.chat_completion_message_function_tool_call import (
    ChatCompletionMessageFunctionToolCall,
    Function,
)

from tokentill.fakeai import agentic, ids
from tokentill.fakeai.catalog import snapshot_for
from tokentill.fakeai.errors import server_error
from tokentill.fakeai.request import RequestInfo
from tokentill.fakeai.sdk import build
from tokentill.fakeai.text import filler_text, split_deltas
from tokentill.fakeai.usage import UsagePlan, completion_usage, stopped_plan

FinishReason = Literal["stop", "length", "content_filter", "tool_calls"]
ChatOutcome = Literal["stop", "length", "content_filter", "failed"]

_OBFUSCATION: Final = "pQ8sXw2LzR4nVb7cJm0tYk"


@dataclass(slots=True)
class ChatDraft:
    """One chat completion, decided up front; the JSON and the chunks are views of it."""

    info: RequestInfo
    id: str
    created: int
    model: str
    outcome: ChatOutcome
    plan: UsagePlan
    texts: list[str]
    fingerprint: str
    tool_calls: list[list[ChatCompletionMessageFunctionToolCall]]
    """Per choice: the functions it calls (empty lists when it answers in text)."""

    @property
    def finish_reason(self) -> FinishReason:
        if self.outcome == "stop" and any(self.tool_calls):
            return "tool_calls"
        return "stop" if self.outcome == "failed" else self.outcome

    @property
    def billed_plan(self) -> UsagePlan | None:
        return None if self.outcome == "failed" else self.plan

    @property
    def status(self) -> str:
        """The ledger status: chat has none, so stop -> completed, length/filter -> incomplete."""
        if self.outcome == "failed":
            return "failed"
        return "completed" if self.outcome == "stop" else "incomplete"

    @property
    def incomplete_reason(self) -> str | None:
        return {"length": "max_output_tokens", "content_filter": "content_filter"}.get(self.outcome)

    def _common(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "id": self.id,
            "created": self.created,
            "model": self.model,
            "service_tier": self.info.service_tier,
            "system_fingerprint": self.fingerprint,
        }
        return fields

    def completion(self) -> ChatCompletion:
        choices = [
            build(
                Choice,
                index=index,
                message=build(
                    ChatCompletionMessage,
                    role="assistant",
                    content=text if not self.tool_calls[index] else None,
                    refusal=None,
                    annotations=[],
                    **({"tool_calls": self.tool_calls[index]} if self.tool_calls[index] else {}),
                ),
                logprobs=None,
                finish_reason=self.finish_reason,
            )
            for index, text in enumerate(self.texts)
        ]
        extra: dict[str, Any] = {}
        if self.info.metadata is not None:
            extra["metadata"] = self.info.metadata
        return build(
            ChatCompletion,
            **self._common(),
            object="chat.completion",
            choices=choices,
            usage=completion_usage(self.plan),
            **extra,
        )

    def _chunk(self, choices: list[ChunkChoice], **extra: Any) -> ChatCompletionChunk:
        fields = self._common()
        if self.info.include_usage:
            fields["usage"] = None
        fields.update(extra)
        if self.info.include_obfuscation:
            fields["obfuscation"] = _OBFUSCATION[: 3 + len(choices) * 5 % 19]
        return build(ChatCompletionChunk, **fields, object="chat.completion.chunk", choices=choices)

    def _tool_call_chunks(self, index: int) -> Iterator[ChatCompletionChunk]:
        """A choice's calls as OpenAI streams them: id and name first, then arguments."""
        for position, call in enumerate(self.tool_calls[index]):
            head = build(
                ChoiceDeltaToolCall,
                index=position,
                id=call.id,
                type="function",
                function=build(ChoiceDeltaToolCallFunction, name=call.function.name, arguments=""),
            )
            yield self._chunk([self._choice(index, build(ChoiceDelta, tool_calls=[head]), None)])
            for piece in split_deltas(call.function.arguments, 3):
                part = build(
                    ChoiceDeltaToolCall,
                    index=position,
                    function=build(ChoiceDeltaToolCallFunction, arguments=piece),
                )
                delta = build(ChoiceDelta, tool_calls=[part])
                yield self._chunk([self._choice(index, delta, None)])

    @staticmethod
    def _choice(index: int, delta: ChoiceDelta, finish: FinishReason | None) -> ChunkChoice:
        return build(ChunkChoice, index=index, delta=delta, logprobs=None, finish_reason=finish)

    def chunks(self) -> Iterator[ChatCompletionChunk | bytes]:
        """The stream's payloads in order; a failed stream ends with OpenAI's error
        object (raw JSON bytes) instead of a finish chunk."""
        for index in range(len(self.texts)):
            opening = build(ChoiceDelta, role="assistant", content="", refusal=None)
            if self.tool_calls[index]:
                opening = build(
                    ChoiceDelta, role="assistant", content=None, refusal=None, tool_calls=[]
                )
            yield self._chunk([self._choice(index, opening, None)])
            yield from self._tool_call_chunks(index)
        per_choice = [
            split_deltas(text, max(3, min(12, len(text) // 64))) if not calls else []
            for text, calls in zip(self.texts, self.tool_calls, strict=True)
        ]
        if self.outcome == "failed":
            per_choice = [deltas[: len(deltas) // 2] for deltas in per_choice]
        for index, deltas in enumerate(per_choice):
            for delta in deltas:
                yield self._chunk([self._choice(index, build(ChoiceDelta, content=delta), None)])
        if self.outcome == "failed":
            yield server_error().body()
            return
        for index in range(len(self.texts)):
            yield self._chunk(
                [
                    self._choice(
                        index,
                        build(
                            ChoiceDelta,
                        ),
                        self.finish_reason,
                    )
                ]
            )
        if self.info.include_usage:
            yield self._chunk([], usage=completion_usage(self.plan))


def draft_chat(
    info: RequestInfo,
    plan: UsagePlan,
    rng: random.Random,
    *,
    created: int,
    forced: ChatOutcome | None = None,
) -> ChatDraft:
    """Decide one completion; without a forced outcome a plan that hit the token limit
    finishes with ``length``."""
    outcome: ChatOutcome = forced or ("length" if plan.truncated else "stop")
    reason = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(outcome)
    plan = stopped_plan(plan, reason, info.max_output_tokens)
    choices = info.choices
    share, spare = divmod(plan.text_tokens, choices)
    texts = [filler_text(share + (1 if i < spare else 0), rng) for i in range(choices)]
    calls: list[list[ChatCompletionMessageFunctionToolCall]] = [[] for _ in range(choices)]
    if outcome == "stop":
        calls = [
            [
                build(
                    ChatCompletionMessageFunctionToolCall,
                    id=ids.tool_call_id(),
                    type="function",
                    function=build(
                        Function, name=tool.name, arguments=agentic.arguments_for(tool, rng)
                    ),
                )
                for tool in agentic.functions_to_call(info)
            ]
            for _ in range(choices)
        ]
    schema = agentic.structured_schema(info)
    if schema is not None:
        texts = [json.dumps(agentic.instance_of(schema, rng)) if t else t for t in texts]
    model = snapshot_for(info.model)
    return ChatDraft(
        info=info,
        id=ids.chat_completion_id(),
        created=created,
        model=model,
        outcome=outcome,
        plan=plan,
        texts=texts,
        fingerprint=ids.system_fingerprint(model),
        tool_calls=calls,
    )
