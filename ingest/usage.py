"""Reading usage out of OpenAI's objects: pure functions from a parsed body to event fields.

Responses: `usage.input_tokens` (of which `input_tokens_details.cached_tokens` read
from cache and `cache_write_tokens` written to it), `usage.output_tokens` (of which
`output_tokens_details.reasoning_tokens`), and hosted tools in `tool_usage`.
Chat Completions map prompt/completion tokens onto the same fields.
"""

from __future__ import annotations

from typing import Any

from ingest.events import UsageEvent


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int | None:
    # bool is an int in Python; a token count never is.
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _seconds_to_us(value: Any) -> int | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return int(value * 1_000_000)
    return None


def apply_response(event: UsageEvent, obj: dict[str, Any]) -> None:
    """Fill `event` from a Responses API `Response` object."""
    event.response_id = _str(obj.get("id")) or event.response_id
    event.model = _str(obj.get("model")) or event.model
    status = _str(obj.get("status"))
    if status:
        event.status = status
    event.created_at_us = _seconds_to_us(obj.get("created_at")) or event.created_at_us
    event.completed_at_us = _seconds_to_us(obj.get("completed_at")) or event.completed_at_us
    event.service_tier = _str(obj.get("service_tier")) or event.service_tier
    event.previous_response_id = _str(obj.get("previous_response_id")) or event.previous_response_id
    event.conversation_id = _str(_dict(obj.get("conversation")).get("id")) or event.conversation_id
    if obj.get("background") is True:
        event.background = True
    event.incomplete_reason = _str(_dict(obj.get("incomplete_details")).get("reason"))
    error = _dict(obj.get("error"))
    if error:
        event.error_code = _str(error.get("code"))
        event.error_type = _str(error.get("type")) or "response_failed"

    usage = obj.get("usage")
    if isinstance(usage, dict):
        apply_response_usage(event, usage)
    tool_usage = obj.get("tool_usage")
    if isinstance(tool_usage, dict):
        apply_tool_usage(event, tool_usage)


def apply_response_usage(event: UsageEvent, usage: dict[str, Any]) -> None:
    inputs = _dict(usage.get("input_tokens_details"))
    writes = _dict(inputs.get("cache_write_tokens_details"))
    outputs = _dict(usage.get("output_tokens_details"))
    event.input_tokens = _int(usage.get("input_tokens"))
    event.cached_input_tokens = _int(inputs.get("cached_tokens")) or 0
    event.cache_write_tokens = _int(inputs.get("cache_write_tokens")) or 0
    event.cache_write_30m_tokens = _int(writes.get("ttl_30m_tokens"))
    event.cache_write_12h_tokens = _int(writes.get("ttl_12h_tokens"))
    event.output_tokens = _int(usage.get("output_tokens"))
    event.reasoning_tokens = _int(outputs.get("reasoning_tokens")) or 0
    event.total_tokens = _int(usage.get("total_tokens"))


def apply_tool_usage(event: UsageEvent, tool_usage: dict[str, Any]) -> None:
    web = _dict(tool_usage.get("web_search"))
    event.web_search_calls = _int(web.get("num_requests"))
    image = _dict(tool_usage.get("image_gen"))
    if image:
        event.image_gen_input_tokens = _int(image.get("input_tokens"))
        event.image_gen_input_image_tokens = _int(
            _dict(image.get("input_tokens_details")).get("image_tokens")
        )
        event.image_gen_cached_tokens = _int(image.get("cached_tokens"))
        event.image_gen_output_tokens = _int(image.get("output_tokens"))


def apply_chat_completion(event: UsageEvent, obj: dict[str, Any]) -> None:
    """Fill `event` from a `ChatCompletion` or a `ChatCompletionChunk` (or a legacy
    `Completion`, which has the same fields where usage is concerned)."""
    event.response_id = _str(obj.get("id")) or event.response_id
    event.model = _str(obj.get("model")) or event.model
    event.created_at_us = _seconds_to_us(obj.get("created")) or event.created_at_us
    event.service_tier = _str(obj.get("service_tier")) or event.service_tier
    for choice in obj.get("choices") or ():
        if _dict(choice).get("finish_reason") == "content_filter":
            event.incomplete_reason = "content_filter"
        elif _dict(choice).get("finish_reason") == "length" and event.incomplete_reason is None:
            event.incomplete_reason = "max_output_tokens"
    usage = obj.get("usage")
    if isinstance(usage, dict):
        apply_chat_usage(event, usage)


def apply_embedding(event: UsageEvent, obj: dict[str, Any]) -> None:
    """Fill `event` from a `CreateEmbeddingResponse`: input tokens only, and no id (the
    event gets one of tokentill's)."""
    event.model = _str(obj.get("model")) or event.model
    usage = _dict(obj.get("usage"))
    event.input_tokens = _int(usage.get("prompt_tokens"))
    event.output_tokens = 0
    event.total_tokens = _int(usage.get("total_tokens"))
    event.status = "completed"


def apply_moderation(event: UsageEvent, obj: dict[str, Any]) -> None:
    """A `ModerationCreateResponse`: free, counted (no usage to read)."""
    event.response_id = _str(obj.get("id")) or event.response_id
    event.model = _str(obj.get("model")) or event.model
    event.status = "completed"


def apply_chat_usage(event: UsageEvent, usage: dict[str, Any]) -> None:
    prompt = _dict(usage.get("prompt_tokens_details"))
    completion = _dict(usage.get("completion_tokens_details"))
    event.input_tokens = _int(usage.get("prompt_tokens"))
    event.cached_input_tokens = _int(prompt.get("cached_tokens")) or 0
    event.cache_write_tokens = _int(prompt.get("cache_write_tokens")) or 0
    event.output_tokens = _int(usage.get("completion_tokens"))
    event.reasoning_tokens = _int(completion.get("reasoning_tokens")) or 0
    event.total_tokens = _int(usage.get("total_tokens"))


def chat_status(event: UsageEvent) -> str:
    """Chat Completions have no status: a finished one with usage is completed, or
    incomplete when it stopped on length or a content filter."""
    return "incomplete" if event.incomplete_reason else "completed"


def apply_error_body(event: UsageEvent, obj: Any) -> None:
    """Fill error fields from OpenAI's `{"error": {...}}` shape (anything else is ignored)."""
    error = _dict(_dict(obj).get("error"))
    event.error_type = _str(error.get("type"))
    code = error.get("code")
    event.error_code = _str(code) if code is not None else None
