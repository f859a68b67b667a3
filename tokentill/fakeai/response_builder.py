"""Responses API payloads: the `Response` object in each of its states and its SSE events.

A `ResponseDraft` fixes everything about one response up front (ids, usage, text,
outcome); the JSON answer, the stored copy, the background snapshots and the stream
events are all views of it, so they always agree.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal

from openai import BaseModel
from openai.types.responses.response import Conversation, IncompleteDetails, Response
from openai.types.responses.response_completed_event import ResponseCompletedEvent
from openai.types.responses.response_content_part_added_event import (
    ResponseContentPartAddedEvent,
)
from openai.types.responses.response_content_part_done_event import ResponseContentPartDoneEvent
from openai.types.responses.response_created_event import ResponseCreatedEvent
from openai.types.responses.response_error import ResponseError
from openai.types.responses.response_failed_event import ResponseFailedEvent
from openai.types.responses.response_function_call_arguments_delta_event import (
    ResponseFunctionCallArgumentsDeltaEvent,
)
from openai.types.responses.response_function_call_arguments_done_event import (
    ResponseFunctionCallArgumentsDoneEvent,
)
from openai.types.responses.response_function_tool_call import ResponseFunctionToolCall
from openai.types.responses.response_function_web_search import (
    ActionSearch,
    ResponseFunctionWebSearch,
)
from openai.types.responses.response_image_gen_call_completed_event import (
    ResponseImageGenCallCompletedEvent,
)
from openai.types.responses.response_image_gen_call_generating_event import (
    ResponseImageGenCallGeneratingEvent,
)
from openai.types.responses.response_image_gen_call_in_progress_event import (
    ResponseImageGenCallInProgressEvent,
)
from openai.types.responses.response_in_progress_event import ResponseInProgressEvent
from openai.types.responses.response_incomplete_event import ResponseIncompleteEvent
from openai.types.responses.response_output_item import ImageGenerationCall
from openai.types.responses.response_output_item_added_event import ResponseOutputItemAddedEvent
from openai.types.responses.response_output_item_done_event import ResponseOutputItemDoneEvent
from openai.types.responses.response_output_message import ResponseOutputMessage
from openai.types.responses.response_output_text import ResponseOutputText
from openai.types.responses.response_queued_event import ResponseQueuedEvent
from openai.types.responses.response_reasoning_item import ResponseReasoningItem
from openai.types.responses.response_text_config import ResponseTextConfig
from openai.types.responses.response_text_delta_event import ResponseTextDeltaEvent
from openai.types.responses.response_text_done_event import ResponseTextDoneEvent
from openai.types.responses.response_web_search_call_completed_event import (
    ResponseWebSearchCallCompletedEvent,
)
from openai.types.responses.response_web_search_call_in_progress_event import (
    ResponseWebSearchCallInProgressEvent,
)
from openai.types.responses.response_web_search_call_searching_event import (
    ResponseWebSearchCallSearchingEvent,
)
from openai.types.shared.reasoning import Reasoning
from openai.types.shared.response_format_text import ResponseFormatText

from tokentill.fakeai import agentic, ids
from tokentill.fakeai.catalog import snapshot_for
from tokentill.fakeai.request import RequestInfo
from tokentill.fakeai.sdk import build, coerce
from tokentill.fakeai.text import filler_text, split_deltas
from tokentill.fakeai.usage import UsagePlan, response_usage, stopped_plan, tool_usage

Outcome = Literal["completed", "incomplete", "failed"]
IncompleteReason = Literal["max_output_tokens", "content_filter"]

TERMINAL_EVENT: Final[dict[str, str]] = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "failed": "response.failed",
}
_TOOL_CHOICES: Final = frozenset({"auto", "none", "required"})
_TINY_PNG: Final = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)
_OBFUSCATION: Final = "Xq3vT9bLmA7cRz0pKsW2hYdNf4uJ"
_FAILED_MESSAGE: Final = (
    "An error occurred while processing your request. You can retry your request, or contact "
    "us through our help center at help.openai.com if the error persists. Please include the "
    "request ID {request_id} in your message."
)
_TOOL_DEFAULTS: Final[dict[str, dict[str, object]]] = {
    "function": {"strict": True, "description": None},
    "web_search": {
        "filters": None,
        "search_context_size": "medium",
        "user_location": {
            "type": "approximate",
            "city": None,
            "country": "US",
            "region": None,
            "timezone": None,
        },
    },
    "web_search_preview": {"search_context_size": "medium", "user_location": None},
    "image_generation": {
        "background": "auto",
        "moderation": "auto",
        "output_compression": 100,
        "output_format": "png",
        "quality": "auto",
        "size": "auto",
    },
}


def _echo_tools(tools: object) -> list[dict[str, object]]:
    """The request's tools with the defaults OpenAI fills in when it echoes them."""
    if not isinstance(tools, list):
        return []
    echoed = []
    for tool in tools:
        if isinstance(tool, dict):
            defaults = _TOOL_DEFAULTS.get(str(tool.get("type")), {})
            echoed.append({**defaults, **tool})
    return echoed


_DEFAULT_TEXT: Final = build(
    ResponseTextConfig, format=build(ResponseFormatText, type="text"), verbosity="medium"
)


def _text_config(value: object) -> ResponseTextConfig:
    if not isinstance(value, dict):
        return _DEFAULT_TEXT
    return coerce(ResponseTextConfig, {"format": {"type": "text"}, "verbosity": "medium", **value})


def _from_json(field: str, value: object) -> Any:
    """A Response field's value from request JSON (dicts become the SDK's models)."""
    return getattr(coerce(Response, {field: value}), field)


def _number(value: object, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return default


def _echoed_fields(info: RequestInfo, response_id: str, created_at: int) -> dict[str, Any]:
    """The request-derived fields every state of the Response carries."""
    body = info.body
    reasoning = body.get("reasoning")
    summary = reasoning.get("summary") if isinstance(reasoning, dict) else None
    conversation = body.get("conversation")
    tool_choice = body.get("tool_choice")
    fields: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": None,
        "background": info.background,
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions")
        if isinstance(body.get("instructions"), str)
        else None,
        "max_output_tokens": info.max_output_tokens,
        "max_tool_calls": body.get("max_tool_calls")
        if isinstance(body.get("max_tool_calls"), int)
        else None,
        "model": snapshot_for(info.model),
        "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "previous_response_id": info.previous_response_id,
        "prompt_cache_key": info.prompt_cache_key,
        "prompt_cache_retention": body.get("prompt_cache_retention")
        if body.get("prompt_cache_retention") in ("in_memory", "24h")
        else None,
        "reasoning": build(
            Reasoning,
            effort=(info.reasoning_effort or "medium") if info.reasoning else None,
            summary=summary,
        ),
        "safety_identifier": info.safety_identifier,
        "service_tier": info.service_tier,
        "temperature": _number(body.get("temperature"), 1.0),
        "text": _text_config(body.get("text")),
        "tool_choice": tool_choice
        if isinstance(tool_choice, str) and tool_choice in _TOOL_CHOICES
        else _from_json("tool_choice", tool_choice)
        if isinstance(tool_choice, dict)
        else "auto",
        "tools": _from_json("tools", _echo_tools(body.get("tools"))) if body.get("tools") else [],
        "top_logprobs": body.get("top_logprobs")
        if isinstance(body.get("top_logprobs"), int)
        else 0,
        "top_p": _number(body.get("top_p"), 1.0),
        "truncation": "auto" if body.get("truncation") == "auto" else "disabled",
        "usage": None,
        "tool_usage": None,
        "user": info.user,
        "metadata": info.metadata or {},
        "store": info.store,
        "billing": {"payer": "developer"},
    }
    if isinstance(conversation, str):
        fields["conversation"] = build(Conversation, id=conversation)
    elif isinstance(conversation, dict) and isinstance(conversation.get("id"), str):
        fields["conversation"] = build(Conversation, id=conversation["id"])
    return fields


@dataclass(slots=True)
class ResponseDraft:
    """One response, decided: its final object plus what is needed to replay it."""

    info: RequestInfo
    id: str
    request_id: str
    created_at: int
    outcome: Outcome
    incomplete_reason: IncompleteReason | None
    plan: UsagePlan
    """The usage this response spent (also for a failed one, which is not billed)."""
    text: str
    deltas: list[str]
    fields: dict[str, Any]
    reasoning_item: ResponseReasoningItem | None
    web_searches: list[ResponseFunctionWebSearch]
    image_call: ImageGenerationCall | None
    message_id: str | None
    function_calls: list[ResponseFunctionToolCall]
    _final: Response | None = None

    @property
    def billed_plan(self) -> UsagePlan | None:
        return None if self.outcome == "failed" else self.plan

    @property
    def model(self) -> str:
        model: str = self.fields["model"]
        return model

    def message(
        self, status: Literal["in_progress", "completed", "incomplete"]
    ) -> ResponseOutputMessage:
        assert self.message_id is not None
        content = [] if status == "in_progress" else [self.output_text(self.text)]
        return build(
            ResponseOutputMessage,
            id=self.message_id,
            type="message",
            status=status,
            content=content,
            role="assistant",
        )

    @staticmethod
    def output_text(text: str) -> ResponseOutputText:
        return build(ResponseOutputText, type="output_text", annotations=[], logprobs=[], text=text)

    def output_items(self) -> list[BaseModel]:
        items: list[BaseModel] = []
        if self.reasoning_item is not None:
            items.append(self.reasoning_item)
        items.extend(self.function_calls)
        items.extend(self.web_searches)
        if self.image_call is not None:
            items.append(self.image_call)
        if self.message_id is not None:
            items.append(self.message("completed" if self.outcome == "completed" else "incomplete"))
        return items

    def final(self, *, completed_at: int | None = None) -> Response:
        """The terminal Response, built once (`completed_at` defaults to now)."""
        if self._final is not None:
            return self._final
        fields = dict(self.fields, status=self.outcome)
        if self.outcome == "failed":
            fields["error"] = build(
                ResponseError,
                code="server_error",
                message=_FAILED_MESSAGE.format(request_id=self.request_id),
            )
        else:
            fields["output"] = self.output_items()
            fields["usage"] = response_usage(self.plan)
            fields["tool_usage"] = tool_usage(self.plan)
        if self.incomplete_reason is not None:
            fields["incomplete_details"] = build(IncompleteDetails, reason=self.incomplete_reason)
        if self.outcome == "completed":
            fields["completed_at"] = int(time.time()) if completed_at is None else completed_at
        else:
            fields["completed_at"] = None
        self._final = build(Response, **fields)
        return self._final

    def pending(self, status: Literal["queued", "in_progress"]) -> Response:
        """The Response before it finishes: no output, no usage."""
        return build(Response, **dict(self.fields, status=status))

    def cancelled(self) -> Response:
        """A cancelled background response. Like OpenAI, it reports no output and
        ``usage: null``; the fake therefore bills nothing for it."""
        return build(Response, **dict(self.fields, status="cancelled"))

    def events(self) -> Iterator[BaseModel]:
        """The SSE events of this response in OpenAI's order, numbered from 0."""
        seq = itertools.count()
        background = self.info.background
        first = self.pending("queued" if background else "in_progress")
        yield build(
            ResponseCreatedEvent, type="response.created", sequence_number=next(seq), response=first
        )
        if background:
            yield build(
                ResponseQueuedEvent,
                type="response.queued",
                sequence_number=next(seq),
                response=first,
            )
        yield build(
            ResponseInProgressEvent,
            type="response.in_progress",
            sequence_number=next(seq),
            response=self.pending("in_progress"),
        )
        index = itertools.count()
        if self.reasoning_item is not None:
            position = next(index)
            yield _item_event(ADDED, seq, position, self.reasoning_item)
            yield _item_event(DONE, seq, position, self.reasoning_item)
        for function_call in self.function_calls:
            yield from _function_call_events(function_call, seq, next(index))
        failed = self.outcome == "failed"
        if not failed:
            for call in self.web_searches:
                yield from _tool_call_events(call, _WEB_SEARCH_PHASES, seq, next(index))
            if self.image_call is not None:
                yield from _tool_call_events(self.image_call, _IMAGE_PHASES, seq, next(index))
        if self.message_id is not None:
            yield from self._message_events(seq, next(index))
        final = self.final()
        terminal = _TERMINAL_EVENTS[self.outcome]
        yield build(
            terminal, type=TERMINAL_EVENT[self.outcome], sequence_number=next(seq), response=final
        )

    def _message_events(self, seq: Iterator[int], index: int) -> Iterator[BaseModel]:
        assert self.message_id is not None
        item_id = self.message_id
        yield _item_event(ADDED, seq, index, self.message("in_progress"))
        yield build(
            ResponseContentPartAddedEvent,
            type="response.content_part.added",
            sequence_number=next(seq),
            item_id=item_id,
            output_index=index,
            content_index=0,
            part=self.output_text(""),
        )
        failed = self.outcome == "failed"
        deltas = self.deltas[: len(self.deltas) // 2] if failed else self.deltas
        obfuscate = self.info.include_obfuscation
        for delta in deltas:
            extra: dict[str, Any] = (
                {"obfuscation": _OBFUSCATION[: 4 + len(delta) % 20]} if obfuscate else {}
            )
            yield build(
                ResponseTextDeltaEvent,
                type="response.output_text.delta",
                sequence_number=next(seq),
                item_id=item_id,
                output_index=index,
                content_index=0,
                delta=delta,
                logprobs=[],
                **extra,
            )
        if failed:
            return
        yield build(
            ResponseTextDoneEvent,
            type="response.output_text.done",
            sequence_number=next(seq),
            item_id=item_id,
            output_index=index,
            content_index=0,
            text=self.text,
            logprobs=[],
        )
        yield build(
            ResponseContentPartDoneEvent,
            type="response.content_part.done",
            sequence_number=next(seq),
            item_id=item_id,
            output_index=index,
            content_index=0,
            part=self.output_text(self.text),
        )
        status: Literal["completed", "incomplete"] = (
            "completed" if self.outcome == "completed" else "incomplete"
        )
        yield _item_event(DONE, seq, index, self.message(status))


ADDED: Final = "response.output_item.added"
DONE: Final = "response.output_item.done"
_TERMINAL_EVENTS: Final[dict[str, type[BaseModel]]] = {
    "completed": ResponseCompletedEvent,
    "incomplete": ResponseIncompleteEvent,
    "failed": ResponseFailedEvent,
}
_Phases = tuple[tuple[type[BaseModel], str], ...]
_WEB_SEARCH_PHASES: Final[_Phases] = (
    (ResponseWebSearchCallInProgressEvent, "response.web_search_call.in_progress"),
    (ResponseWebSearchCallSearchingEvent, "response.web_search_call.searching"),
    (ResponseWebSearchCallCompletedEvent, "response.web_search_call.completed"),
)
_IMAGE_PHASES: Final[_Phases] = (
    (ResponseImageGenCallInProgressEvent, "response.image_generation_call.in_progress"),
    (ResponseImageGenCallGeneratingEvent, "response.image_generation_call.generating"),
    (ResponseImageGenCallCompletedEvent, "response.image_generation_call.completed"),
)


def _item_event(event_type: str, seq: Iterator[int], index: int, item: BaseModel) -> BaseModel:
    event = ResponseOutputItemAddedEvent if event_type == ADDED else ResponseOutputItemDoneEvent
    return build(event, type=event_type, sequence_number=next(seq), output_index=index, item=item)


def _function_call_events(
    call: ResponseFunctionToolCall, seq: Iterator[int], index: int
) -> Iterator[BaseModel]:
    """A function call: item added with no arguments, the arguments in deltas, done."""
    assert call.id is not None
    yield _item_event(
        ADDED, seq, index, call.model_copy(update={"arguments": "", "status": "in_progress"})
    )
    for delta in split_deltas(call.arguments, 3):
        yield build(
            ResponseFunctionCallArgumentsDeltaEvent,
            type="response.function_call_arguments.delta",
            sequence_number=next(seq),
            item_id=call.id,
            output_index=index,
            delta=delta,
        )
    yield build(
        ResponseFunctionCallArgumentsDoneEvent,
        type="response.function_call_arguments.done",
        sequence_number=next(seq),
        item_id=call.id,
        output_index=index,
        arguments=call.arguments,
    )
    yield _item_event(DONE, seq, index, call)


def _tool_call_events(
    call: ResponseFunctionWebSearch | ImageGenerationCall,
    phases: _Phases,
    seq: Iterator[int],
    index: int,
) -> Iterator[BaseModel]:
    """A hosted tool call: item added (in progress), its three phase events, item done."""
    update: dict[str, object] = {"status": "in_progress"}
    if isinstance(call, ImageGenerationCall):
        update["result"] = None
    yield _item_event(ADDED, seq, index, call.model_copy(update=update))
    for event, event_type in phases:
        yield build(
            event, type=event_type, sequence_number=next(seq), output_index=index, item_id=call.id
        )
    yield _item_event(DONE, seq, index, call)


def draft_response(
    info: RequestInfo,
    plan: UsagePlan,
    rng: random.Random,
    *,
    created_at: int,
    forced: Outcome | None = None,
    forced_reason: IncompleteReason | None = None,
) -> ResponseDraft:
    """Decide one response: `forced` outcomes come from the scenario header, otherwise a
    plan that hit `max_output_tokens` ends incomplete."""
    outcome: Outcome
    reason: IncompleteReason | None
    if forced is not None:
        outcome, reason = forced, forced_reason
    elif plan.truncated:
        outcome, reason = "incomplete", "max_output_tokens"
    else:
        outcome, reason = "completed", None
    plan = stopped_plan(plan, reason, info.max_output_tokens)
    response_id = ids.response_id()
    text = filler_text(plan.text_tokens, rng)
    calls = []
    if outcome == "completed":
        calls = [
            build(
                ResponseFunctionToolCall,
                id=ids.function_call_id(),
                call_id=ids.tool_call_id(),
                type="function_call",
                name=tool.name,
                arguments=agentic.arguments_for(tool, rng),
                status="completed",
            )
            for tool in agentic.functions_to_call(info)
        ]
    schema = agentic.structured_schema(info)
    if calls:
        text = ""  # the turn is the call; the answer comes with its output
    elif schema is not None and text:
        text = json.dumps(agentic.instance_of(schema, rng))
    include = info.body.get("include")
    encrypted = isinstance(include, list) and "reasoning.encrypted_content" in include
    reasoning_item = None
    if info.reasoning:
        extra: dict[str, Any] = (
            {"encrypted_content": "gAAAAA" + ids.request_id()[4:]} if encrypted else {}
        )
        reasoning_item = build(
            ResponseReasoningItem, id=ids.reasoning_id(), type="reasoning", summary=[], **extra
        )
    searches = [
        build(
            ResponseFunctionWebSearch,
            id=ids.web_search_id(),
            type="web_search_call",
            status="completed",
            action=build(ActionSearch, type="search", query=text[:40] or "search"),
        )
        for _ in range(plan.web_search_calls)
    ]
    image_call = None
    if plan.image_gen is not None:
        image_call = build(
            ImageGenerationCall,
            id=ids.image_generation_id(),
            type="image_generation_call",
            status="completed",
            output_format="png",
            result=_TINY_PNG,
        )
    return ResponseDraft(
        info=info,
        id=response_id,
        request_id=ids.request_id(),
        created_at=created_at,
        outcome=outcome,
        incomplete_reason=reason,
        plan=plan,
        text=text,
        deltas=split_deltas(text, max(3, min(12, plan.text_tokens // 16))),
        fields=_echoed_fields(info, response_id, created_at),
        reasoning_item=reasoning_item,
        web_searches=searches,
        image_call=image_call,
        message_id=ids.message_id() if text else None,
        function_calls=calls,
    )
