"""Costs in FOCUS, the FinOps Foundation's Open Cost and Usage Specification: one row per
UTC day x end user x model x service tier x metadata tags x charge (uncached input,
cached input, cache write, output, each hosted tool, media priced by time or characters,
image generation), with the columns of FOCUS 1.2 (token-priced SaaS charges) and those of
1.0 and its validator's earlier names beside them, so that tools of either version read it.

The rows are the events' own costs (`pricing.price_events(charges=True)`: the parts of
each event's cost sum to it exactly), so `BilledCost` summed over any day, user or model
is the costs report's priced cost to the pico-dollar. Unpriced usage (no price in force)
is exported with its quantities and zero costs, flagged `x_Unpriced` (FOCUS 1.0 has no
null cost: its validator requires one), and counted by the caller.

A pure pipeline: `focus_rows(events, prices, ...)` takes the events and the price table
and returns the rows; `read_focus` reads them for a range of days.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Protocol

import duckdb
import orjson
import polars as pl

from tokentill.warehouse import pricing
from tokentill.warehouse.db import query_frame
from tokentill.warehouse.periods import closed_periods, next_month
from tokentill.warehouse.prices import price_table

PICO = 10**12
SERVICE_NAME = "OpenAI API"
PROVIDER = "OpenAI"

# Per charge: its quantity (from the event's counts) and the unit it is priced by.
_QUANTITIES: dict[str, tuple[pl.Expr, str]] = {
    "input": (
        pl.col("input_tokens") - pl.col("cached_input_tokens") - pl.col("cache_write_tokens"),
        "Tokens",
    ),
    "cached_input": (pl.col("cached_input_tokens"), "Tokens"),
    "cache_write": (pl.col("cache_write_tokens"), "Tokens"),
    "output": (pl.col("output_tokens"), "Tokens"),
    "web_search": (pl.col("web_search_calls"), "Calls"),
    "audio_duration": (pl.col("audio_ms"), "Seconds"),  # counted in ms, shown in seconds
    "speech_characters": (pl.col("input_characters"), "Characters"),
    "image_generation": (
        pl.col("image_gen_input_tokens") + pl.col("image_gen_output_tokens"),
        "Tokens",
    ),
}
_DESCRIPTIONS = {
    "input": "input tokens, not cached",
    "cached_input": "cached input tokens",
    "cache_write": "cache write tokens",
    "output": "output tokens (reasoning included)",
    "web_search": "web search calls",
    "audio_duration": "audio, by duration",
    "speech_characters": "speech, by characters",
    "image_generation": "image generation tokens",
}
assert set(_QUANTITIES) == set(pricing.CHARGES)

# The columns, in order: FOCUS 1.2's and 1.0's, the 1.0 validator's older spellings, then
# tokentill's own (`x_`).
COLUMNS = (
    "AvailabilityZone",
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargeFrequency",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "ChargeType",
    "CommitmentDiscountCategory",
    "CommitmentDiscountId",
    "CommitmentDiscountName",
    "CommitmentDiscountStatus",
    "CommitmentDiscountType",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ContractedCost",
    "ContractedUnitPrice",
    "EffectiveCost",
    "InvoiceIssuer",
    "InvoiceIssuerName",
    "ListCost",
    "ListUnitPrice",
    "PricingCategory",
    "PricingQuantity",
    "PricingUnit",
    "Provider",
    "ProviderName",
    "Publisher",
    "PublisherName",
    "RegionId",
    "RegionName",
    "ResourceID",
    "ResourceId",
    "ResourceName",
    "ResourceType",
    "ServiceCategory",
    "ServiceName",
    "SkuId",
    "SkuPriceId",
    "SubAccountId",
    "SubAccountName",
    "Tags",
    "x_EndUser",
    "x_Model",
    "x_ServiceTier",
    "x_Charge",
    "x_Requests",
    "x_Unpriced",
    "x_CostPico",
)
MONEY = ("BilledCost", "EffectiveCost", "ListCost", "ContractedCost")


@dataclass(frozen=True)
class FocusExport:
    rows: pl.DataFrame  # COLUMNS; money as Decimal(38, 12) USD
    unpriced_rows: int


class FocusSettings(Protocol):
    """What an export reads of the settings (tokentill's `Settings` has them)."""

    @property
    def image_gen_model(self) -> str: ...
    @property
    def rollup_tag_keys(self) -> tuple[str, ...]: ...
    @property
    def focus_billing_account(self) -> str: ...


# The grain every export is made of (and a closed month is kept in, `closed_focus`): one
# row per day x end user x model x tier x tags (a JSON object of the rolled-up tag keys)
# x charge x whether it was priced, with its quantity, requests and cost (0 unpriced).
GRAIN: dict[str, pl.DataType] = {
    "day": pl.Date(),
    "user_id": pl.String(),
    "model": pl.String(),
    "tier": pl.String(),
    "tags": pl.String(),
    "charge": pl.String(),
    "unit": pl.String(),
    "quantity": pl.Int64(),
    "requests": pl.Int64(),
    "cost_pico": pl.Decimal(38, 0),
    "unpriced": pl.Boolean(),
}
GRAIN_KEYS = ("day", "user_id", "model", "tier", "tags", "charge", "unit", "unpriced")
GRAIN_SUMS = ("quantity", "requests", "cost_pico")


def read_focus(
    conn: duckdb.DuckDBPyConnection, start: date, end: date, settings: FocusSettings
) -> FocusExport:
    """The FOCUS rows of the UTC days [start, end): a closed month's as they were at its
    close (`closed_focus`), an open month's from the events, and the corrections posted
    on those days to months closed before (`ChargeClass` Correction, billed in the month
    they were posted: `warehouse/focus_close.py`). A closed month's export never changes."""
    closed = {p.period for p in closed_periods(conn)}
    parts = [live_grain(conn, lo, hi, settings) for lo, hi in _open_spans(start, end, closed)]
    parts.append(
        query_frame(
            conn,
            f"SELECT {', '.join(GRAIN)} FROM closed_focus WHERE day >= ? AND day < ?",
            [start, end],
        ).cast(GRAIN)  # type: ignore[arg-type]
    )
    corrections = query_frame(
        conn,
        f"""SELECT {", ".join(GRAIN)}, posted_period FROM focus_adjustments
            WHERE posted_day >= ? AND posted_day < ?
            ORDER BY posted_at, day, user_id NULLS LAST, model, tier, tags, charge, unit,
                     unpriced""",
        [start, end],
    )
    grain = pl.concat(parts, how="vertical").sort(GRAIN_KEYS, nulls_last=True)
    return focus_rows(grain, settings.focus_billing_account, corrections=corrections)


def live_grain(
    conn: duckdb.DuckDBPyConnection, start: date, end: date, settings: FocusSettings
) -> pl.DataFrame:
    """The grain of the UTC days [start, end), from the events as they are now."""
    counts = ", ".join(pricing.PRICED_FIELDS)
    events = query_frame(
        conn,
        f"""SELECT user_id, model, service_tier, created_at, metadata, {counts}
            FROM usage_events WHERE created_at >= ? AND created_at < ?""",
        [_midnight(start), _midnight(end)],
    )
    return focus_grain(
        events,
        price_table(conn),
        image_model=settings.image_gen_model,
        tag_keys=settings.rollup_tag_keys,
    )


def _open_spans(start: date, end: date, closed: set[date]) -> list[tuple[date, date]]:
    """The parts of [start, end) in months not closed."""
    spans: list[tuple[date, date]] = []
    day = start
    while day < end:
        month = day.replace(day=1)
        following = next_month(month)
        stop = min(end, following)
        if month not in closed:
            if spans and spans[-1][1] == day:
                spans[-1] = (spans[-1][0], stop)
            else:
                spans.append((day, stop))
        day = stop
    return spans


def focus_grain(
    events: pl.DataFrame,
    prices: pl.DataFrame,
    *,
    image_model: str,
    tag_keys: Sequence[str],
) -> pl.DataFrame:
    """Events priced and split into their charges, summed to the grain (`GRAIN`)."""
    if events.height == 0:
        return pl.DataFrame(schema=GRAIN)
    models = pricing.model_map(
        events["model"].drop_nulls().unique().to_list(), prices["model"].unique().to_list()
    )
    priced = pricing.price_events(
        events.lazy(),
        models.lazy(),
        pricing.effective_intervals(prices).lazy(),
        image_model,
        charges=True,
    )
    # Each tag a column of its own, grouped on as the other keys are (the JSON object
    # `tags` is written once per row of the grain, not once per event).
    tags = {f"tag:{key}": key for key in tag_keys if key.isidentifier()}
    keys = ["day", "user_id", "model", "tier", *tags]
    base = priced.with_columns(
        pl.col("created_at").dt.date().alias("day"),
        pl.col("model").fill_null("unknown"),
        pl.col("service_tier").fill_null("default").alias("tier"),
        *(pl.col("metadata").str.json_path_match(f"$.{k}").alias(c) for c, k in tags.items()),
    )
    long = pl.concat(
        [
            base.select(
                *keys,
                pl.lit(charge).alias("charge"),
                pl.lit(unit).alias("unit"),
                quantity.fill_null(0).cast(pl.Int64).alias("quantity"),
                pl.col(f"charge_{charge}_pico").alias("cost_pico"),
                (pl.col("unpriced").cast(pl.Int64) > 0).alias("unpriced"),
            )
            for charge, (quantity, unit) in _QUANTITIES.items()
        ]
    ).filter(pl.col("quantity") > 0)
    # Unpriced events apart from priced ones of the same key: a row of priced usage keeps
    # its cost when some other event of its day, user and model had no price.
    grouped = (
        long.group_by(*keys, "charge", "unit", "unpriced")
        .agg(
            pl.col("quantity").sum(),
            pl.len().cast(pl.Int64).alias("requests"),
            pl.col("cost_pico").cast(pl.Int128).sum().alias("cost_pico"),
        )
        .collect()
    )
    as_json = [
        orjson.dumps(
            {key: row[column] for column, key in tags.items() if row[column] is not None},
            option=orjson.OPT_SORT_KEYS,
        ).decode()
        for row in grouped.select(list(tags)).iter_rows(named=True)
    ]
    return (
        grouped.with_columns(
            pl.Series("tags", as_json, pl.String),
            # Unpriced: exported at zero cost (FOCUS 1.0 has no null cost), flagged.
            pl.when(pl.col("unpriced"))
            .then(0)
            .otherwise(pl.col("cost_pico").fill_null(0))
            .cast(pl.Decimal(38, 0))
            .alias("cost_pico"),
        )
        .select(list(GRAIN))
        .sort(GRAIN_KEYS, nulls_last=True)
    )


def focus_rows(
    grain: pl.DataFrame, billing_account: str, *, corrections: pl.DataFrame | None = None
) -> FocusExport:
    """The grain as FOCUS rows; `corrections` (the grain's columns and `posted_period`)
    after them, as `ChargeClass` Correction rows billed in the month they were posted."""
    rows = [_row(r, billing_account) for r in grain.iter_rows(named=True)]
    if corrections is not None:
        rows += [
            _row(r, billing_account, posted=r["posted_period"])
            for r in corrections.iter_rows(named=True)
        ]
    frame = pl.DataFrame(rows, schema=_schema(), orient="row") if rows else _empty()
    return FocusExport(frame, int(grain["unpriced"].sum()) if grain.height else 0)


def _row(r: dict[str, object], account: str, posted: object = None) -> tuple[object, ...]:
    """One FOCUS row of a grain row (`posted`: the month a correction was posted in)."""
    day = r["day"]
    assert isinstance(day, date)
    billed = posted if isinstance(posted, date) else day
    month = billed.replace(day=1)
    following = next_month(month)
    unpriced = bool(r["unpriced"])
    pico = int(str(r["cost_pico"]))
    cost = Decimal(pico) / PICO
    counted = int(str(r["quantity"]))
    in_ms = r["charge"] == "audio_duration"  # counted in ms, shown in seconds
    quantity = Decimal(counted) / 1000 if in_ms else Decimal(counted)
    unit_price = None
    if posted is None and not unpriced and counted and pico % counted == 0 and not in_ms:
        unit_price = Decimal(pico // counted) / PICO  # one rate for every unit in the row
    model, tier, charge, user = r["model"], r["tier"], r["charge"], r["user_id"]
    tags: dict[str, object] = orjson.loads(str(r["tags"]))
    if user is not None:
        tags["tokentill/end-user"] = user
    tags["tokentill/service-tier"] = tier
    sku = f"{model}/{charge}"
    values: dict[str, object] = {
        "AvailabilityZone": None,
        "BilledCost": cost,
        "BillingAccountId": account,
        "BillingAccountName": account,
        "BillingCurrency": "USD",
        "BillingPeriodEnd": _moment(following),
        "BillingPeriodStart": _moment(month),
        "ChargeCategory": "Usage",
        "ChargeClass": None if posted is None else "Correction",
        "ChargeDescription": f"{model} ({tier}): {_DESCRIPTIONS[str(charge)]}"
        + ("" if posted is None else f", corrected after {day:%Y-%m} was closed"),
        "ChargeFrequency": "Usage-Based",
        "ChargePeriodEnd": _moment(day + timedelta(days=1)),
        "ChargePeriodStart": _moment(day),
        "ChargeType": "Usage",
        "CommitmentDiscountCategory": None,
        "CommitmentDiscountId": None,
        "CommitmentDiscountName": None,
        "CommitmentDiscountStatus": None,
        "CommitmentDiscountType": None,
        "ConsumedQuantity": quantity,
        "ConsumedUnit": r["unit"],
        "ContractedCost": cost,
        "ContractedUnitPrice": unit_price,
        "EffectiveCost": cost,
        "InvoiceIssuer": PROVIDER,
        "InvoiceIssuerName": PROVIDER,
        "ListCost": cost,
        "ListUnitPrice": unit_price,
        "PricingCategory": "Standard",
        "PricingQuantity": quantity,
        "PricingUnit": r["unit"],
        "Provider": PROVIDER,
        "ProviderName": PROVIDER,
        "Publisher": PROVIDER,
        "PublisherName": PROVIDER,
        "RegionId": None,
        "RegionName": None,
        "ResourceID": str(model),
        "ResourceId": str(model),
        "ResourceName": str(model),
        "ResourceType": "Model",
        "ServiceCategory": "AI and Machine Learning",
        "ServiceName": SERVICE_NAME,
        "SkuId": sku,
        "SkuPriceId": f"{sku}/{tier}",
        "SubAccountId": None,
        "SubAccountName": None,
        "Tags": orjson.dumps(tags, option=orjson.OPT_SORT_KEYS).decode(),
        "x_EndUser": user,
        "x_Model": model,
        "x_ServiceTier": tier,
        "x_Charge": charge,
        "x_Requests": r["requests"],
        "x_Unpriced": unpriced,
        "x_CostPico": Decimal(pico),
    }
    return tuple(values[c] for c in COLUMNS)


def _schema() -> dict[str, pl.DataType]:
    money = pl.Decimal(38, 12)
    out: dict[str, pl.DataType] = {}
    for column in COLUMNS:
        if column in MONEY or column in ("ListUnitPrice", "ContractedUnitPrice"):
            out[column] = money
        elif column in ("ConsumedQuantity", "PricingQuantity"):
            # With decimals even when whole: FOCUS's quantities are decimals (its 1.0
            # validator reads a column of whole numbers as integers, and refuses it).
            out[column] = pl.Decimal(38, 3)
        elif column == "x_CostPico":
            out[column] = pl.Decimal(38, 0)
        elif column == "x_Requests":
            out[column] = pl.Int64()
        elif column == "x_Unpriced":
            out[column] = pl.Boolean()
        else:
            out[column] = pl.String()
    return out


def _empty() -> pl.DataFrame:
    return pl.DataFrame(schema=_schema())


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def _moment(day: date) -> str:
    """A day's start as FOCUS writes a date-time: ISO 8601 in UTC, with its Z."""
    return f"{day.isoformat()}T00:00:00Z"
