"""What agents and structured-output libraries need from the fake: function calls when
tools are offered, and JSON that satisfies a requested schema.

Turn rule (both APIs): a function tool is called when the request offers one, its
`tool_choice` allows it (`auto` or `required`, or an object naming the function), and
the turn is not already answering a call (the last input item is a
`function_call_output`, or the last chat message has role `tool`); `required` and a
named function force a call even then. Otherwise the model answers in text: prose,
or, with `text.format` / `response_format` of type `json_schema`, a JSON document
that validates against the schema (`json_object`: a JSON object).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Final

from tokentill.fakeai.request import RequestInfo

_MAX_DEPTH: Final = 6
_WORDS: Final = ("alpha", "beta", "gamma", "delta", "omega", "kappa")


@dataclass(frozen=True, slots=True)
class FunctionTool:
    name: str
    parameters: dict[str, Any]


def offered_functions(info: RequestInfo) -> list[FunctionTool]:
    """The function tools of the request, in both APIs' spellings."""
    tools = info.body.get("tools")
    found: list[FunctionTool] = []
    if not isinstance(tools, list):
        return found
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            continue
        spec = tool.get("function") if info.endpoint == "chat" else tool
        if isinstance(spec, dict) and isinstance(spec.get("name"), str):
            params = spec.get("parameters")
            found.append(FunctionTool(spec["name"], params if isinstance(params, dict) else {}))
    return found


def functions_to_call(info: RequestInfo) -> list[FunctionTool]:
    """The functions this turn calls (empty: it answers in text)."""
    offered = offered_functions(info)
    if not offered:
        return []
    choice = info.body.get("tool_choice", "auto")
    if isinstance(choice, dict):
        name = choice.get("name")
        if name is None and isinstance(choice.get("function"), dict):
            name = choice["function"].get("name")  # chat's spelling
        named = [tool for tool in offered if tool.name == name]
        return named[:1]
    if choice == "none":
        return []
    if choice == "required":
        return offered[:1]
    return [] if _answers_a_call(info) else offered[:1]


def _answers_a_call(info: RequestInfo) -> bool:
    if info.endpoint == "chat":
        messages = info.body.get("messages")
        last = messages[-1] if isinstance(messages, list) and messages else None
        return isinstance(last, dict) and last.get("role") == "tool"
    items = info.body.get("input")
    last = items[-1] if isinstance(items, list) and items else None
    return isinstance(last, dict) and last.get("type") == "function_call_output"


def structured_schema(info: RequestInfo) -> dict[str, Any] | None:
    """The JSON schema the answer must satisfy (`{}` for `json_object`), or None."""
    if info.endpoint == "chat":
        fmt = info.body.get("response_format")
        spec = fmt.get("json_schema") if isinstance(fmt, dict) else None
    else:
        text = info.body.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
        spec = fmt
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_object":
        return {"type": "object"}
    if fmt.get("type") != "json_schema" or not isinstance(spec, dict):
        return None
    schema = spec.get("schema")
    return schema if isinstance(schema, dict) else {}


def arguments_for(tool: FunctionTool, rng: random.Random) -> str:
    """A call's arguments: a JSON object that satisfies the function's parameters."""
    return json.dumps(instance_of(tool.parameters or {"type": "object"}, rng))


def instance_of(schema: dict[str, Any], rng: random.Random) -> Any:
    """A value valid against `schema` (the subset strict mode allows, `$ref`s into
    `$defs`/`definitions` included)."""
    return _instance(schema, schema, rng, 0)


def _instance(schema: Any, root: dict[str, Any], rng: random.Random, depth: int) -> Any:
    if not isinstance(schema, dict):
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return _instance(target, root, rng, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return rng.choice(schema["enum"])
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            # allOf: the first part is the usual spelling of a single referenced model.
            return _instance(options[0], root, rng, depth + 1)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties")
        if not isinstance(props, dict) or depth >= _MAX_DEPTH:
            return {}
        return {name: _instance(sub, root, rng, depth + 1) for name, sub in props.items()}
    if kind == "array":
        count = max(int(schema.get("minItems", 1)), 1)
        count = min(count, int(schema.get("maxItems", count)))
        if depth >= _MAX_DEPTH:
            count = int(schema.get("minItems", 0))
        return [_instance(schema.get("items", {}), root, rng, depth + 1) for _ in range(count)]
    if kind == "integer":
        low = int(schema.get("minimum", 0))
        high = int(schema.get("maximum", low + 100))
        return rng.randint(low, max(low, high))
    if kind == "number":
        floor = float(schema.get("minimum", 0))
        return round(floor + rng.random() * 10, 2)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    text = rng.choice(_WORDS)
    minimum = int(schema.get("minLength", 0))
    text = (text * (1 + minimum // len(text)))[: max(minimum, len(text))]
    return text[: int(schema.get("maxLength", len(text)))]
