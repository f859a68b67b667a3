"""OpenAI's bill, as `warehouse.reconcile` compares it: fetched from OpenAI's organization
Costs API (and its Usage API, for request counts) with an admin key, or read from the
cost export (CSV) of OpenAI's usage dashboard.

Amounts are parsed as `Decimal` (never float) and turned into pico-dollars once.

Failures: `BillUnavailableError` (OpenAI unreachable, or it refused or garbled the
answer: the API says 502) and `ExportError` (a CSV that cannot be read: 422), each with
a message that says what to fix.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import httpx
import polars as pl

from tokentill.warehouse.reconcile import (
    OPENAI_REQUESTS_SCHEMA,
    OPENAI_SCHEMA,
    model_of_line_item,
    usd_to_pico,
)

COSTS_PATH = "/v1/organization/costs"
USAGE_PATH = "/v1/organization/usage/completions"


class BillUnavailableError(Exception):
    """OpenAI could not be reached, or did not answer with a bill."""


class ExportError(ValueError):
    """A cost export that cannot be read."""


@dataclass(frozen=True)
class Bill:
    costs: pl.DataFrame
    """`OPENAI_SCHEMA`: one row per day x line item."""
    requests: pl.DataFrame | None
    """`OPENAI_REQUESTS_SCHEMA`, or None (a cost export has no request counts)."""


def _day_of(seconds: int) -> date:
    return datetime.fromtimestamp(seconds, UTC).date()


def _midnight(day: date) -> int:
    return int(datetime.combine(day, time(), tzinfo=UTC).timestamp())


async def _pages(
    client: httpx.AsyncClient, url: str, key: str, params: dict[str, Any]
) -> AsyncIterator[dict[str, Any]]:
    """Every bucket of a paginated organization endpoint, following `next_page`."""
    query = dict(params)
    for _ in range(10_000):  # a cursor that never ends must not hang a request
        try:
            response = await client.get(
                url, params=query, headers={"Authorization": f"Bearer {key}"}
            )
        except httpx.TimeoutException as exc:
            raise BillUnavailableError(f"OpenAI did not answer in time at {url}") from exc
        except httpx.TransportError as exc:
            raise BillUnavailableError(f"OpenAI is unreachable at {url}: {exc}") from exc
        if response.status_code != 200:
            raise BillUnavailableError(
                f"OpenAI answered {response.status_code} at {url}: {_error_message(response)}"
            )
        try:
            page = json.loads(response.content, parse_float=Decimal)
            buckets: list[dict[str, Any]] = page["data"]
        except (ValueError, KeyError, TypeError) as exc:
            raise BillUnavailableError(f"OpenAI's answer at {url} is not a page") from exc
        for bucket in buckets:
            yield bucket
        if not page.get("has_more"):
            return
        query["page"] = page["next_page"]
    raise BillUnavailableError(f"OpenAI's pages at {url} never end")


def _error_message(response: httpx.Response) -> str:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase
    return str(message)


def _cost_rows(bucket: dict[str, Any]) -> list[dict[str, Any]]:
    day = _day_of(int(bucket["start_time"]))
    rows = []
    for result in bucket.get("results", []):
        amount = result["amount"]
        if str(amount.get("currency", "usd")).lower() != "usd":
            raise BillUnavailableError(f"OpenAI billed in {amount['currency']!r}, not USD")
        rows.append(
            {
                "day": day,
                "model": model_of_line_item(result.get("line_item") or ""),
                "openai_pico": usd_to_pico(Decimal(amount["value"])),
            }
        )
    return rows


async def fetch_bill(
    client: httpx.AsyncClient, base_url: str, admin_key: str, start: date, end: date
) -> Bill:
    """OpenAI's costs per day x line item, and its request counts per day x model, for the
    UTC days [start, end]."""
    window = {
        "start_time": _midnight(start),
        "end_time": _midnight(end + timedelta(days=1)),
        "bucket_width": "1d",
    }
    costs: list[dict[str, Any]] = []
    requests: list[dict[str, Any]] = []
    try:
        async for bucket in _pages(
            client,
            base_url + COSTS_PATH,
            admin_key,
            {**window, "group_by": "line_item", "limit": 180},
        ):
            costs.extend(_cost_rows(bucket))
        async for bucket in _pages(
            client, base_url + USAGE_PATH, admin_key, {**window, "group_by": "model", "limit": 31}
        ):
            day = _day_of(int(bucket["start_time"]))
            requests.extend(
                {
                    "day": day,
                    "model": result.get("model") or "",
                    "openai_requests": int(result["num_model_requests"]),
                }
                for result in bucket.get("results", [])
            )
    except (KeyError, TypeError, ValueError, ArithmeticError, AttributeError) as exc:
        raise BillUnavailableError(f"OpenAI's answer is not the expected shape: {exc!r}") from exc
    return Bill(
        pl.DataFrame(costs, schema=OPENAI_SCHEMA),
        pl.DataFrame(requests, schema=OPENAI_REQUESTS_SCHEMA),
    )


# -- the cost export ----------------------------------------------------------------------

_DAY_COLUMNS = ("start_time", "start_time_iso", "date", "day")
_AMOUNT_COLUMNS = ("amount_value", "amount", "cost", "cost_usd")
_LINE_COLUMNS = ("line_item", "model")
_CURRENCY_COLUMNS = ("amount_currency", "currency")


def _pick(header: list[str], names: tuple[str, ...], *, required: bool) -> str | None:
    for name in names:
        if name in header:
            return name
    if required:
        raise ExportError(
            "the export has no " + " / ".join(repr(n) for n in names) + " column "
            f"(columns found: {', '.join(header) or 'none'})"
        )
    return None


def _parse_day(value: str, line: int) -> date:
    text = value.strip()
    try:
        if text.lstrip("-").isdigit():
            return _day_of(int(text))  # Unix seconds, as the Costs API gives them
        return datetime.fromisoformat(text.replace("Z", "+00:00")).date()
    except (ValueError, OverflowError, OSError):
        raise ExportError(f"line {line}: {value!r} is not a date or a Unix time") from None


def read_cost_export(data: bytes) -> Bill:
    """OpenAI's cost export (CSV): one row per day (x line item, x project), with the
    Costs API's fields as columns: a day (`start_time` in Unix seconds, or
    `start_time_iso` / `date`), `amount_value` (USD) and `line_item`
    (`"<model>, <kind>"`; a `model` column also works); `amount_currency`, when present,
    must be usd. Other columns (project, organization...) are ignored."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ExportError("the export is not UTF-8 text") from None
    # newline="": the csv module reads line ends itself (a CR alone, or inside a quoted
    # field, is text, not a line of its own).
    try:
        return _read_cost_rows(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as exc:  # a NUL byte, an unbalanced quote at the end...
        raise ExportError(f"the export is not valid CSV: {exc}") from None


def _read_cost_rows(reader: csv.DictReader[str]) -> Bill:
    header = [name.strip().lower() for name in reader.fieldnames or []]
    reader.fieldnames = header
    day_column = _pick(header, _DAY_COLUMNS, required=True)
    amount_column = _pick(header, _AMOUNT_COLUMNS, required=True)
    line_column = _pick(header, _LINE_COLUMNS, required=True)
    currency_column = _pick(header, _CURRENCY_COLUMNS, required=False)
    rows: list[dict[str, Any]] = []
    for number, record in enumerate(reader, start=2):
        raw_day, raw_amount = record.get(day_column or ""), record.get(amount_column or "")
        if raw_day is None or raw_amount is None:
            raise ExportError(f"line {number}: fewer fields than the header names")
        if currency_column and (record.get(currency_column) or "usd").strip().lower() != "usd":
            raise ExportError(f"line {number}: currency {record[currency_column]!r}, not usd")
        try:
            amount = Decimal(raw_amount.strip() or "0")
            if not amount.is_finite():
                raise InvalidOperation
        except InvalidOperation:
            raise ExportError(f"line {number}: amount {raw_amount!r} is not a number") from None
        rows.append(
            {
                "day": _parse_day(raw_day, number),
                "model": model_of_line_item((record.get(line_column or "") or "").strip()),
                "openai_pico": usd_to_pico(amount),
            }
        )
    if not rows:
        raise ExportError("the export has a header but no rows")
    return Bill(pl.DataFrame(rows, schema=OPENAI_SCHEMA), None)
