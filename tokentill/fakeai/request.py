"""Reading and validating a request body the way OpenAI does (400s in its exact shape)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from tokentill.fakeai import errors
from tokentill.fakeai.catalog import is_reasoning_model

Endpoint = Literal["responses", "chat"]

METADATA_MAX_PAIRS: Final = 16
METADATA_MAX_KEY: Final = 64
METADATA_MAX_VALUE: Final = 512
MIN_MAX_OUTPUT_TOKENS: Final = 16
"""The Responses API rejects ``max_output_tokens`` below 16."""

_TIER_ECHO: Final = {
    None: "default",
    "auto": "default",
    "default": "default",
    "flex": "flex",
    "scale": "scale",
    "priority": "priority",
    "fast": "priority",
    "ultrafast": "ultrafast",
}
_WEB_SEARCH_TOOLS: Final = frozenset(
    {"web_search", "web_search_2025_08_26", "web_search_preview", "web_search_preview_2025_03_11"}
)
_COUNTED_KEYS: Final = ("instructions", "input", "messages", "tools", "prompt")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object in a request body, or OpenAI's "could not parse" 400."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise errors.invalid_json() from None
    if not isinstance(body, dict):
        raise errors.invalid_json()
    return body


def validate_metadata(value: object) -> dict[str, str] | None:
    """OpenAI's metadata rules: at most 16 string pairs, keys <= 64 and values <= 512 chars."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise errors.invalid_type("metadata", "an object", _json_type(value))
    if len(value) > METADATA_MAX_PAIRS:
        raise errors.invalid_value(
            "metadata",
            "Invalid 'metadata': too many properties. Expected an object with at most "
            f"{METADATA_MAX_PAIRS} properties, but got an object with {len(value)} properties "
            "instead.",
            code="object_above_max_properties",
        )
    for key, item in value.items():
        if len(key) > METADATA_MAX_KEY:
            raise errors.invalid_value(
                "metadata",
                "Invalid 'metadata': string too long. Expected a key with maximum length "
                f"{METADATA_MAX_KEY}, but got a key with length {len(key)} instead.",
                code="string_above_max_length",
            )
        if not isinstance(item, str):
            raise errors.invalid_type(
                f"metadata.{key}", "a string", _json_type(item), report_param="metadata"
            )
        if len(item) > METADATA_MAX_VALUE:
            raise errors.invalid_value(
                "metadata",
                f"Invalid 'metadata.{key}': string too long. Expected a string with maximum "
                f"length {METADATA_MAX_VALUE}, but got a string with length {len(item)} instead.",
                code="string_above_max_length",
            )
    return value


def _optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None or isinstance(value, str):
        return value
    raise errors.invalid_type(name, "a string", _json_type(value))


def _optional_int(body: dict[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise errors.invalid_type(name, "an integer", _json_type(value))
    if value < minimum:
        raise errors.invalid_value(
            name,
            f"Invalid '{name}': integer below minimum value. Expected a value >= {minimum}, "
            f"but got {value} instead.",
            code="integer_below_min_value",
        )
    return value


def _service_tier(body: dict[str, Any]) -> str:
    requested = body.get("service_tier")
    tier = _TIER_ECHO.get(requested) if requested is None or isinstance(requested, str) else None
    if tier is None:
        raise errors.invalid_value(
            "service_tier",
            f"Invalid value: {requested!r}. Supported values are: 'auto', 'default', 'flex', "
            "'scale', and 'priority'.",
        )
    return tier


def count_chars(body: dict[str, Any]) -> tuple[int, int]:
    """Characters of prompt text (every string under the prompt-bearing keys) and the
    number of input items/messages, for a rough token estimate."""
    chars = 0
    stack: list[object] = [body.get(key) for key in _COUNTED_KEYS]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
    items = body.get("input") if "messages" not in body else body.get("messages")
    return chars, len(items) if isinstance(items, list) else 1


def _tool_types(body: dict[str, Any]) -> frozenset[str]:
    tools = body.get("tools")
    if not isinstance(tools, list):
        return frozenset()
    return frozenset(
        tool["type"]
        for tool in tools
        if isinstance(tool, dict) and isinstance(tool.get("type"), str)
    )


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What the fake needs from a validated request; `body` keeps the rest for echoing."""

    endpoint: Endpoint
    body: dict[str, Any]
    model: str
    """The model as requested (the answer carries its snapshot)."""
    reasoning: bool
    stream: bool
    background: bool
    store: bool
    metadata: dict[str, str] | None
    user: str | None
    safety_identifier: str | None
    previous_response_id: str | None
    service_tier: str
    prompt_cache_key: str | None
    cache_ttl: str | None
    """``"30m"``/``"12h"`` when the request pins the cache lifetime, else None."""
    max_output_tokens: int | None
    reasoning_effort: str | None
    input_chars: int
    input_items: int
    web_search: bool
    image_generation: bool
    choices: int
    include_usage: bool
    include_obfuscation: bool


def _reasoning_effort(body: dict[str, Any]) -> str | None:
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("effort"), str):
        effort: str = reasoning["effort"]
        return effort
    effort_param = body.get("reasoning_effort")
    return effort_param if isinstance(effort_param, str) else None


def _cache_ttl(body: dict[str, Any]) -> str | None:
    options = body.get("prompt_cache_options")
    if isinstance(options, dict) and options.get("ttl") in ("30m", "12h"):
        ttl: str = options["ttl"]
        return ttl
    retention = body.get("prompt_cache_retention")
    if retention == "24h":
        return "12h"
    if retention == "in_memory":
        return "30m"
    return None


def read_request(body: dict[str, Any], endpoint: Endpoint) -> RequestInfo:
    """Validate `body` like OpenAI (first problem wins) and extract what the fake uses."""
    model = body.get("model")
    if model is None:
        if endpoint == "chat":
            raise errors.OpenAIError(400, "you must provide a model parameter")
        raise errors.missing_parameter("model")
    if not isinstance(model, str):
        raise errors.invalid_type("model", "a string", _json_type(model))
    reasoning = is_reasoning_model(model)
    metadata = validate_metadata(body.get("metadata"))
    tier = _service_tier(body)
    stream = body.get("stream") is True
    include_usage = False
    include_obfuscation = True
    choices = 1
    if endpoint == "chat":
        messages = body.get("messages")
        if messages is None:
            raise errors.missing_parameter("messages")
        if not isinstance(messages, list):
            raise errors.invalid_type("messages", "an array", _json_type(messages))
        if not messages:
            raise errors.invalid_value(
                "messages",
                "Invalid 'messages': empty array. Expected an array with minimum length 1, "
                "but got an empty array instead.",
                code="empty_array",
            )
        options = body.get("stream_options")
        if options is not None:
            if not stream:
                raise errors.invalid_value(
                    "stream_options",
                    "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                )
            if isinstance(options, dict):
                include_usage = options.get("include_usage") is True
                include_obfuscation = options.get("include_obfuscation") is not False
        if reasoning and body.get("max_tokens") is not None:
            raise errors.invalid_value(
                "max_tokens",
                "Unsupported parameter: 'max_tokens' is not supported with this model. "
                "Use 'max_completion_tokens' instead.",
                code="unsupported_parameter",
            )
        limit = _optional_int(body, "max_completion_tokens", 1)
        if limit is None:
            limit = _optional_int(body, "max_tokens", 1)
        choices = _optional_int(body, "n", 1) or 1
    else:
        limit = _optional_int(body, "max_output_tokens", MIN_MAX_OUTPUT_TOKENS)
        options = body.get("stream_options")
        if isinstance(options, dict):
            include_obfuscation = options.get("include_obfuscation") is not False
    chars, items = count_chars(body)
    tool_types = _tool_types(body)
    return RequestInfo(
        endpoint=endpoint,
        body=body,
        model=model,
        reasoning=reasoning,
        stream=stream,
        background=endpoint == "responses" and body.get("background") is True,
        store=body.get("store") is not False,
        metadata=metadata,
        user=_optional_str(body, "user"),
        safety_identifier=_optional_str(body, "safety_identifier"),
        previous_response_id=_optional_str(body, "previous_response_id"),
        service_tier=tier,
        prompt_cache_key=_optional_str(body, "prompt_cache_key"),
        cache_ttl=_cache_ttl(body),
        max_output_tokens=limit,
        reasoning_effort=_reasoning_effort(body),
        input_chars=chars,
        input_items=items,
        web_search=not tool_types.isdisjoint(_WEB_SEARCH_TOOLS),
        image_generation="image_generation" in tool_types,
        choices=choices,
        include_usage=include_usage,
        include_obfuscation=include_obfuscation,
    )
