"""What the fake bills: its ledger priced into OpenAI's cost line items.

Priced with genai-prices directly (its model match, dated prices and service-tier
variants, and its own per-unit arithmetic), never with tokentill's catalog or pricing
code, so that a reconciliation compares two independent computations.

A line item is OpenAI's: ``"<model as answered>, <kind>"`` with kinds ``input``
(uncached), ``cached input``, ``cache write``, ``output`` and ``web search``. A model
genai-prices does not know (a model newer than the public price list) is still billed,
as OpenAI would bill it, at `UNLISTED_RATES`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Final

from genai_prices import Usage, calc_price
from genai_prices.types import ModelPrice, calc_unit_price

from tokentill.fakeai.ledger import LedgerEntry

_MTOK: Final = 1_000_000
UNLISTED_RATES: Final[dict[str, Decimal]] = {
    "input_mtok": Decimal("1"),
    "cache_read_mtok": Decimal("0.5"),
    "output_mtok": Decimal("4"),
}
"""USD per 1M tokens for models genai-prices does not list."""


@dataclass(frozen=True, slots=True)
class LineItem:
    created_at: int
    """When the response was created (Unix seconds): the day it is billed on."""
    model: str
    kind: str
    amount: Decimal
    """USD, exact."""

    @property
    def name(self) -> str:
        return f"{self.model}, {self.kind}"


def billable(entry: LedgerEntry) -> bool:
    """Whether OpenAI bills this answer: it carried usage (failed and cancelled did not)."""
    return entry.input_tokens is not None


def _model_price(entry: LedgerEntry) -> ModelPrice:
    tier = entry.service_tier
    context = {"service_tier": tier} if tier not in ("default", "auto") else None
    try:
        found = calc_price(
            Usage(input_tokens=0, output_tokens=0),
            entry.model,
            provider_id="openai",
            genai_request_timestamp=datetime.fromtimestamp(entry.created_at, UTC),
            price_context=context,
        )
    except LookupError:
        return ModelPrice(**UNLISTED_RATES)
    return found.model_price


def line_items(entry: LedgerEntry) -> Iterator[LineItem]:
    """The line items one ledger entry adds to the bill (none when it is not billed).
    Long-context tiers are chosen by the request's whole input, as genai-prices does."""
    if not billable(entry):
        return
    price = _model_price(entry)
    total_input = entry.input_tokens or 0
    cached = entry.cached_input_tokens or 0
    written = entry.cache_write_tokens or 0
    input_rate = price.input_mtok
    counts = (
        ("input", input_rate, total_input - cached - written),
        ("cached input", price.cache_read_mtok or input_rate, cached),
        ("cache write", price.cache_write_mtok or input_rate, written),
        ("output", price.output_mtok, entry.output_tokens or 0),
    )
    for kind, rate, count in counts:
        if count:
            amount = calc_unit_price(rate, count, total_input, _MTOK)
            yield LineItem(entry.created_at, entry.model, kind, amount)
    searches = entry.web_search_calls or 0
    per_thousand = getattr(price, "web_searches_kcount", None)
    if searches and per_thousand is not None:
        amount = calc_unit_price(per_thousand, searches, total_input, 1000)
        yield LineItem(entry.created_at, entry.model, "web search", amount)
