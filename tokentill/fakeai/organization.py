"""OpenAI's organization Costs and Usage endpoints, computed from the fake's ledger.

``GET /v1/organization/costs`` and ``GET /v1/organization/usage/completions`` answer
what the fake actually billed: every response it finished with usage, whether or not
the client received it whole, and whoever sent it (through tokentill or straight to the
fake). Shapes, parameters, defaults, limits and the page cursor follow OpenAI's
reference; they need an admin key (``sk-admin-...``), as OpenAI's do.

Costs: ``bucket_width`` is ``1d`` only; ``group_by`` ``line_item`` and/or ``project_id``;
``limit`` 1 to 180 buckets (default 7). Usage: ``bucket_width`` ``1m`` / ``1h`` / ``1d``
(limits 1440 / 168 / 31, defaults 60 / 24 / 7); ``group_by`` any of ``project_id``,
``user_id``, ``api_key_id``, ``model``, ``batch``, ``service_tier``; filter ``models``.
A bucket covers [start, start + width) from ``start_time`` rounded down to the width, and
empty buckets are listed too. Amounts are exact decimals (JSON numbers).
"""

from __future__ import annotations

import base64
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

import orjson
from starlette.datastructures import QueryParams

from tokentill.fakeai import errors
from tokentill.fakeai.billing import billable, line_items
from tokentill.fakeai.ledger import Ledger, LedgerEntry

PROJECT_ID: Final = "proj_fakeupstream"
_WIDTHS: Final = {"1m": 60, "1h": 3600, "1d": 86_400}
# bucket width -> (default limit, max limit), from OpenAI's Usage reference.
_USAGE_LIMITS: Final = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}
_COST_GROUPS: Final = ("project_id", "line_item")
_USAGE_GROUPS: Final = ("project_id", "user_id", "api_key_id", "model", "batch", "service_tier")
_NO_SCOPE_MESSAGE: Final = (
    "You have insufficient permissions for this operation. Missing scopes: api.usage.read. "
    "Check that you have the correct role in your organization (Owner), and if you're using "
    "a restricted API key, that it has the necessary scopes."
)


def require_admin_key(key: str) -> None:
    """Organization endpoints take admin keys only (OpenAI's start ``sk-admin-``)."""
    if not key.startswith("sk-admin-"):
        raise errors.OpenAIError(401, _NO_SCOPE_MESSAGE)


@dataclass(frozen=True)
class Window:
    start: int
    end: int
    width: int
    limit: int
    group_by: tuple[str, ...]

    def buckets(self) -> list[int]:
        """Every bucket start of this page (at most `limit`)."""
        first = self.start - self.start % self.width
        starts = range(first, self.end, self.width)
        return list(starts[: self.limit])

    def next_page(self, shown: list[int]) -> str | None:
        if not shown or shown[-1] + self.width >= self.end:
            return None
        return _cursor(shown[-1] + self.width)


def _cursor(start: int) -> str:
    return "page_" + base64.urlsafe_b64encode(start.to_bytes(8, "big")).decode()


def _from_cursor(value: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(value.removeprefix("page_").encode())
        if len(raw) != 8 or not value.startswith("page_"):
            raise ValueError(value)
    except ValueError:
        raise errors.invalid_value("page", f"Invalid page cursor: {value!r}.") from None
    return int.from_bytes(raw, "big")


def _integer(params: QueryParams, name: str) -> int | None:
    raw = params.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise errors.invalid_type(name, "an integer", "a string") from None


def _list(params: QueryParams, name: str) -> list[str]:
    """Array parameters as OpenAI takes them: ``name=a&name=b`` or ``name[]=a``."""
    values: list[str] = [*params.getlist(name), *params.getlist(name + "[]")]
    return [part for value in values for part in value.split(",") if part]


def read_window(
    params: QueryParams,
    *,
    widths: dict[str, tuple[int, int]],
    groups: tuple[str, ...],
    now: int,
) -> Window:
    """Parse start_time, end_time, bucket_width, group_by, limit and page, or raise
    OpenAI's 400 naming the parameter."""
    start = _integer(params, "start_time")
    if start is None:
        raise errors.missing_parameter("start_time")
    end = _integer(params, "end_time")
    end = now if end is None else end
    if start < 0 or end <= start:
        raise errors.invalid_value("end_time", "end_time must be greater than start_time.")
    width_name = params.get("bucket_width", "1d")
    if width_name not in widths:
        allowed = ", ".join(repr(w) for w in widths)
        raise errors.invalid_value(
            "bucket_width", f"Invalid value: {width_name!r}. Supported values are: {allowed}."
        )
    default_limit, max_limit = widths[width_name]
    limit = _integer(params, "limit")
    limit = default_limit if limit is None else limit
    if not 1 <= limit <= max_limit:
        raise errors.invalid_value(
            "limit", f"Invalid value for 'limit': must be between 1 and {max_limit}."
        )
    group_by = tuple(dict.fromkeys(_list(params, "group_by")))
    for name in group_by:
        if name not in groups:
            raise errors.invalid_value(
                "group_by",
                f"Invalid value for 'group_by': {name!r}. Supported values are: "
                + ", ".join(repr(g) for g in groups)
                + ".",
            )
    page = params.get("page")
    if page is not None:
        start = max(start, _from_cursor(page))
        if start >= end:
            raise errors.invalid_value("page", f"Invalid page cursor: {page!r}.")
    return Window(start, end, _WIDTHS[width_name], limit, group_by)


def _page(window: Window, results: Callable[[int, int], list[dict[str, Any]]]) -> bytes:
    shown = window.buckets()
    data = [
        {
            "object": "bucket",
            "start_time": bucket,
            "end_time": bucket + window.width,
            "results": results(max(bucket, window.start), min(bucket + window.width, window.end)),
        }
        for bucket in shown
    ]
    following = window.next_page(shown)
    return orjson.dumps(
        {"object": "page", "data": data, "has_more": following is not None, "next_page": following}
    )


def _within(entries: Iterable[LedgerEntry], start: int, end: int) -> list[LedgerEntry]:
    return [e for e in entries if billable(e) and start <= e.created_at < end]


def costs_page(ledger: Ledger, params: QueryParams, now: int) -> bytes:
    window = read_window(params, widths={"1d": (7, 180)}, groups=_COST_GROUPS, now=now)
    entries = ledger.entries()
    by_line = "line_item" in window.group_by
    by_project = "project_id" in window.group_by

    def results(start: int, end: int) -> list[dict[str, Any]]:
        sums: dict[str | None, Decimal] = defaultdict(Decimal)
        for entry in _within(entries, start, end):
            for item in line_items(entry):
                sums[item.name if by_line else None] += item.amount
        return [
            {
                "object": "organization.costs.result",
                # Exact: the sum of exact per-unit prices, written as a JSON number.
                "amount": {"value": orjson.Fragment(str(amount)), "currency": "usd"},
                "line_item": line,
                "project_id": PROJECT_ID if by_project else None,
            }
            for line, amount in sorted(sums.items(), key=lambda kv: kv[0] or "")
        ]

    return _page(window, results)


def usage_page(ledger: Ledger, params: QueryParams, now: int) -> bytes:
    window = read_window(params, widths=_USAGE_LIMITS, groups=_USAGE_GROUPS, now=now)
    models = set(_list(params, "models"))
    entries = [e for e in ledger.entries() if not models or e.model in models]
    group_by = window.group_by

    def key_of(entry: LedgerEntry) -> tuple[Any, ...]:
        values = {
            "project_id": PROJECT_ID,
            "user_id": None,  # OpenAI's org user of the key, which the fake does not have
            "api_key_id": entry.key_fingerprint,
            "model": entry.model,
            "batch": False,
            "service_tier": entry.service_tier,
        }
        return tuple(values[name] for name in group_by)

    def results(start: int, end: int) -> list[dict[str, Any]]:
        sums: dict[tuple[Any, ...], dict[str, int]] = {}
        for entry in _within(entries, start, end):
            total = sums.setdefault(
                key_of(entry),
                dict.fromkeys(
                    ("input_tokens", "output_tokens", "input_cached_tokens", "num_model_requests"),
                    0,
                ),
            )
            total["input_tokens"] += entry.input_tokens or 0
            total["output_tokens"] += entry.output_tokens or 0
            total["input_cached_tokens"] += entry.cached_input_tokens or 0
            total["num_model_requests"] += 1
        out = []
        for key, total in sorted(sums.items(), key=lambda kv: tuple(str(v) for v in kv[0])):
            grouped = dict(zip(group_by, key, strict=True))
            out.append(
                {
                    "object": "organization.usage.completions.result",
                    **total,
                    "input_audio_tokens": 0,
                    "output_audio_tokens": 0,
                    **{name: grouped.get(name) for name in _USAGE_GROUPS},
                }
            )
        return out

    return _page(window, results)
