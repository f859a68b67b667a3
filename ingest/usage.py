"""Reading usage out of OpenAI's objects: pure functions from a parsed body to event fields.

Responses: `usage.input_tokens` (of which `input_tokens_details.cached_tokens` read
from cache and `cache_write_tokens` written to it), `usage.output_tokens` (of which
`output_tokens_details.reasoning_tokens`), and hosted tools in `tool_usage`.
Chat Completions map prompt/completion tokens onto the same fields.
"""

from __future__ import annotations

from typing import Any

from tokentill.warehouse.events import UsageEvent


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
    event.input_audio_tokens = _int(prompt.get("audio_tokens"))  # gpt-audio and kin
    event.output_tokens = _int(usage.get("completion_tokens"))
    event.reasoning_tokens = _int(completion.get("reasoning_tokens")) or 0
    event.output_audio_tokens = _int(completion.get("audio_tokens"))
    event.total_tokens = _int(usage.get("total_tokens"))


def apply_images(event: UsageEvent, obj: dict[str, Any]) -> None:
    """An `ImagesResponse`, or the `image_generation.completed` / `image_edit.completed`
    event that ends an images stream. Only the gpt-image models report usage (the
    answer names no model: the request's stands); a dall-e answer reports none."""
    event.created_at_us = (
        _seconds_to_us(obj.get("created")) or _seconds_to_us(obj.get("created_at"))
    ) or event.created_at_us
    event.status = "completed"
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        event.usage_unreported = True
        return
    inputs = _dict(usage.get("input_tokens_details"))
    event.input_tokens = _int(usage.get("input_tokens"))
    event.input_image_tokens = _int(inputs.get("image_tokens"))
    event.output_tokens = _int(usage.get("output_tokens"))
    details = usage.get("output_tokens_details")
    # Without the split, every output token is an image token (gpt-image-1's answers).
    event.output_image_tokens = (
        _int(_dict(details).get("image_tokens")) if details is not None else event.output_tokens
    )
    event.total_tokens = _int(usage.get("total_tokens"))


def apply_transcription(event: UsageEvent, obj: dict[str, Any]) -> None:
    """A `Transcription` (or translation, or the `transcript.text.done` event that ends a
    transcription stream): usage in tokens (the gpt-4o transcription models) or in
    seconds of audio (whisper-1); none when the answer has no usage."""
    event.status = "completed"
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        event.usage_unreported = True
        return
    apply_transcription_usage(event, usage)


def apply_transcription_usage(event: UsageEvent, usage: dict[str, Any]) -> None:
    if usage.get("type") == "duration":
        seconds = usage.get("seconds")
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds >= 0:
            event.audio_ms = round(seconds * 1000)
        else:
            event.usage_unreported = True
        return
    details = _dict(usage.get("input_token_details"))
    event.input_tokens = inputs = _int(usage.get("input_tokens"))
    audio, text = _int(details.get("audio_tokens")), _int(details.get("text_tokens"))
    if audio is None and inputs is not None:
        # The input is the audio, less the prompt's text where the answer says it.
        audio = inputs - (text or 0)
    event.input_audio_tokens = audio
    event.output_tokens = _int(usage.get("output_tokens"))
    event.total_tokens = _int(usage.get("total_tokens"))
    if inputs is None and event.output_tokens is None:
        event.usage_unreported = True


def apply_speech_usage(event: UsageEvent, usage: dict[str, Any]) -> None:
    """The `speech.audio.done` event's usage (speech asked for as SSE): text tokens in,
    audio tokens out, at the model's input and output prices."""
    event.input_tokens = _int(usage.get("input_tokens"))
    event.output_tokens = _int(usage.get("output_tokens"))
    event.total_tokens = _int(usage.get("total_tokens"))


def apply_realtime_response(event: UsageEvent, response: dict[str, Any]) -> None:
    """A Realtime `response` (`response.created`, `response.done`): text, audio and image
    tokens in, their cached parts, text and audio tokens out."""
    event.response_id = _str(response.get("id")) or event.response_id
    status = _str(response.get("status"))
    if status:
        event.status = status
    event.conversation_id = _str(response.get("conversation_id")) or event.conversation_id
    details = _dict(response.get("status_details"))
    reason = _str(details.get("reason"))
    if status == "incomplete" or (status == "cancelled" and reason):
        event.incomplete_reason = reason
    error = _dict(details.get("error"))
    if error:
        event.error_type = _str(error.get("type")) or "response_failed"
        event.error_code = _str(error.get("code"))
    usage = response.get("usage")
    if not isinstance(usage, dict):
        # `response.created` has none yet; a response that ended with output has one.
        event.usage_unreported = status in ("completed", "incomplete")
        return
    event.usage_unreported = False
    inputs = _dict(usage.get("input_token_details"))
    cached = _dict(inputs.get("cached_tokens_details"))
    outputs = _dict(usage.get("output_token_details"))
    event.input_tokens = _int(usage.get("input_tokens"))
    event.cached_input_tokens = _int(inputs.get("cached_tokens")) or 0
    event.input_audio_tokens = _int(inputs.get("audio_tokens"))
    event.input_image_tokens = _int(inputs.get("image_tokens"))
    event.cached_audio_tokens = _int(cached.get("audio_tokens"))
    event.cached_image_tokens = _int(cached.get("image_tokens"))
    event.output_tokens = _int(usage.get("output_tokens"))
    event.output_audio_tokens = _int(outputs.get("audio_tokens"))
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
