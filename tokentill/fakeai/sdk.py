"""Building and serialising the openai SDK's models quickly.

The SDK overrides pydantic's ``model_construct`` with a recursive ``construct`` that
coerces every nested value (and validates unions) — the right tool for JSON dicts
(`coerce`), but far slower than needed when the nested values are already SDK
models. `build` does what ``model_construct`` does, the way the SDK's ``construct``
does it (fill ``__dict__``, mark the given fields as set, keep unknown keys as
extras), with the per-class defaults computed once. No validation happens here;
the test suite validates every payload with the SDK's types.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Final, TypeVar

from openai import BaseModel
from pydantic.fields import FieldInfo

M = TypeVar("M", bound=BaseModel)

# The SDK types timestamps as float, so pydantic writes 1700000000.0; OpenAI sends ints.
_FLOAT_TIMESTAMP: Final = re.compile(rb'"(created_at|completed_at)":(\d+)\.0(?=[,}])')


_IMMUTABLE: Final = (type(None), bool, int, float, str, tuple, frozenset)


@functools.cache
def _layout(
    cls: type[BaseModel],
) -> tuple[dict[str, Any], tuple[tuple[str, FieldInfo], ...], frozenset[str]]:
    """`cls`'s shareable (immutable) defaults, the fields needing a fresh default on
    every instance, and all its field names."""
    defaults: dict[str, Any] = {}
    fresh: list[tuple[str, FieldInfo]] = []
    for name, info in cls.model_fields.items():
        if info.is_required():
            continue
        default = info.get_default(call_default_factory=True)
        if isinstance(default, _IMMUTABLE):
            defaults[name] = default
        else:
            fresh.append((name, info))
    return defaults, tuple(fresh), frozenset(cls.model_fields)


def build(cls: type[M], **fields: Any) -> M:
    """An instance of `cls` from already-built values, without validation."""
    defaults, fresh, names = _layout(cls)
    values: dict[str, Any] = {}  # the given fields first, so JSON keeps their order
    extra: dict[str, Any] = {}
    for name, value in fields.items():
        if name in names:
            values[name] = value
        else:
            extra[name] = value
    for name, default in defaults.items():
        values.setdefault(name, default)
    for name, info in fresh:
        if name not in values:
            values[name] = info.get_default(call_default_factory=True)
    model = cls.__new__(cls)
    object.__setattr__(model, "__dict__", values)
    object.__setattr__(model, "__pydantic_fields_set__", fields.keys() - extra.keys())
    object.__setattr__(model, "__pydantic_extra__", extra)
    object.__setattr__(model, "__pydantic_private__", None)
    return model


def coerce(cls: type[M], value: dict[str, Any]) -> M:
    """An instance of `cls` from plain JSON data (nested dicts become models)."""
    return cls.construct(**value)


def dump(model: BaseModel) -> bytes:
    """A model as OpenAI sends it: the fields set on it, compact JSON, integer times."""
    raw = model.model_dump_json(exclude_unset=True).encode()
    return _FLOAT_TIMESTAMP.sub(rb'"\1":\2', raw)
