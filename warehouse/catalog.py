"""The published price catalog: OpenAI's prices, with their history, from genai-prices.

genai-prices (pydantic's maintained, offline price database) describes each model with
match clauses, dated prices (`ConditionalPrice` with a start date), per-service-tier and
batch variants, and long-context tiers. `published_prices()` flattens that into rows of
the `prices` table: one row per model id x service tier x period. The package version is
recorded as each row's `source`, so every cost can be traced to the list it came from.

Dated snapshots that genai-prices lists under a family (`gpt-4o-2024-08-06` under
`gpt-4o`) get rows of their own with the family's prices; a snapshot with its own price
(`gpt-4o-2024-05-13`) keeps it. Prefix clauses (`ft:gpt-4o-mini-2024-...`) become rows
whose model ends in `*`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from decimal import Decimal
from importlib import metadata
from typing import Any

log = logging.getLogger(__name__)

EPOCH = datetime(2020, 1, 1, tzinfo=UTC)
PUBLISHED_PRIORITY = 0
OVERRIDE_PRIORITY = 100

# Our column -> genai-prices' ModelPrice attribute.
_TOKEN_PRICES = {
    "input_per_mtok": "input_mtok",
    "cached_input_per_mtok": "cache_read_mtok",
    "cache_write_per_mtok": "cache_write_mtok",
    "output_per_mtok": "output_mtok",
}
_IMAGE_PRICES = {
    "image_input_per_mtok": "input_image_mtok",
    "image_cached_input_per_mtok": "cache_image_read_mtok",
    "image_output_per_mtok": "output_image_mtok",
}
_AUDIO_PRICES = {
    "audio_input_per_mtok": "input_audio_mtok",
    "audio_cached_input_per_mtok": "cache_audio_read_mtok",
    "audio_output_per_mtok": "output_audio_mtok",
    "input_per_mchar": "input_mchars",
}
PRICE_COLUMNS = (
    *_TOKEN_PRICES,
    "tier_threshold",
    *(f"tier_{c}" for c in _TOKEN_PRICES),
    "web_search_per_call",
    *_IMAGE_PRICES,
    *_AUDIO_PRICES,
    "audio_per_hour",
)
# How the rows are read out of genai-prices: a new reading (new columns) is a new source,
# so a warehouse seeded by an older one gets the rows again, with what they now carry.
CATALOG_FORMAT = 2


@dataclass(frozen=True)
class PriceRow:
    model: str
    service_tier: str
    effective_from: datetime
    effective_to: datetime | None
    prices: dict[str, Decimal | int | None] = field(default_factory=dict)
    source: str = ""
    priority: int = PUBLISHED_PRIORITY
    note: str | None = None

    def as_record(self) -> dict[str, Any]:
        record: dict[str, Any] = dict.fromkeys(PRICE_COLUMNS)
        record.update(self.prices)
        record.update(
            model=self.model,
            service_tier=self.service_tier,
            effective_from=self.effective_from,
            effective_to=self.effective_to,
            source=self.source,
            priority=self.priority,
            note=self.note,
        )
        return record


def source_version() -> str:
    return f"genai-prices {metadata.version('genai-prices')} (format {CATALOG_FORMAT})"


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _flatten(model_price: Any) -> dict[str, Decimal | int | None]:
    """A genai-prices ModelPrice -> our price columns (None where it has no price)."""
    out: dict[str, Decimal | int | None] = {}
    threshold: int | None = None
    for column, attribute in _TOKEN_PRICES.items():
        value = getattr(model_price, attribute, None)
        if value is None:
            continue
        if isinstance(value, Decimal):
            out[column] = value
            continue
        # TieredPrices: a base rate and, past a threshold of input tokens, another.
        out[column] = value.base
        if value.tiers:
            first = value.tiers[0]
            threshold = first.start if threshold is None else min(threshold, first.start)
            out[f"tier_{column}"] = first.price
    if threshold is not None:
        out["tier_threshold"] = threshold
    per_thousand = getattr(model_price, "web_searches_kcount", None)
    if isinstance(per_thousand, Decimal):
        out["web_search_per_call"] = per_thousand / 1000
    for column, attribute in (_IMAGE_PRICES | _AUDIO_PRICES).items():
        value = getattr(model_price, attribute, None)
        if isinstance(value, Decimal):
            out[column] = value
    # Transcription by the hour: genai-prices lists the input audio's rate and, for the
    # same models, the same rate as audio of any direction; one of them is charged.
    for attribute in ("input_audio_hours", "audio_hours"):
        value = getattr(model_price, attribute, None)
        if isinstance(value, Decimal):
            out["audio_per_hour"] = value
            break
    return out


def _model_ids(match: Any) -> tuple[list[str], list[str]]:
    """Exact ids and prefixes a genai-prices match clause names (regexes are skipped:
    the ones OpenAI's list uses are dated-snapshot patterns, which our resolution of a
    snapshot to its family already covers)."""
    exact: list[str] = []
    prefixes: list[str] = []
    kind = type(match).__name__
    if kind == "ClauseEquals":
        exact.append(match.equals)
    elif kind == "ClauseStartsWith":
        prefixes.append(match.starts_with)
    elif kind == "ClauseOr":
        for clause in match.or_:
            more_exact, more_prefixes = _model_ids(clause)
            exact += more_exact
            prefixes += more_prefixes
    return exact, prefixes


def _periods(model: Any) -> list[tuple[datetime, datetime | None, Any]]:
    """The model's base prices over time: [(from, to, ModelPrice)]."""
    prices = model.prices
    if not isinstance(prices, list):
        return [(EPOCH, None, prices)]
    dated = []
    for conditional in prices:
        constraint = conditional.constraint
        start = EPOCH
        if constraint is not None and hasattr(constraint, "start_date"):
            start = _midnight(constraint.start_date)
        dated.append((start, conditional.prices))
    dated.sort(key=lambda pair: pair[0])
    return [
        (start, dated[i + 1][0] if i + 1 < len(dated) else None, price)
        for i, (start, price) in enumerate(dated)
    ]


def _tier_of(when: dict[str, str]) -> str | None:
    if when.get("processing") == "batch":
        return "batch"
    tier = when.get("service_tier")
    return tier if tier in ("default", "flex", "priority", "scale") else None


def published_prices(provider: str = "openai") -> list[PriceRow]:
    """Every OpenAI price genai-prices knows, as `prices` rows."""
    from genai_prices import data_snapshot

    snapshot = data_snapshot.get_snapshot()
    source = source_version()
    found = [p for p in snapshot.providers if p.id == provider]
    if not found:
        raise LookupError(f"genai-prices has no provider {provider!r}")
    rows: list[PriceRow] = []
    for model in found[0].models:
        exact, prefixes = _model_ids(model.match)
        names = [*dict.fromkeys(exact), *(p + "*" for p in dict.fromkeys(prefixes))]
        if not names:
            log.info("genai-prices model %s has no usable match clause; skipped", model.id)
            continue
        base = [
            PriceRow(name, "default", start, end, _flatten(price), source)
            for start, end, price in _periods(model)
            for name in names
        ]
        rows += base
        for variant in model.price_variants or ():
            tier = _tier_of(variant.when)
            if tier is None or tier == "default":
                continue
            starts = EPOCH
            constraint = variant.constraint
            if constraint is not None and hasattr(constraint, "start_date"):
                starts = _midnight(constraint.start_date)
            overrides = _flatten(variant.prices)
            for row in base:
                end = row.effective_to
                if end is not None and end <= starts:
                    continue
                rows.append(
                    replace(
                        row,
                        service_tier=tier,
                        effective_from=max(row.effective_from, starts),
                        # A variant names the rates that differ; the rest are the model's.
                        prices={**row.prices, **overrides},
                    )
                )
    return rows
