"""Pricing one response in the proxy, from an in-memory snapshot of the price catalog.

Quotas need spend within a second of a response finishing, so the proxy cannot wait for
the rollup job, and its hot path cannot query DuckDB. `PriceBook.build` (run off the hot
path, every `quota_price_refresh` seconds) turns the `prices` table into the rates in
force now, per resolved model and service tier, as integer pico-dollars per token. Then:

- `cost(event)` is the same rule as `warehouse.pricing.price_events`, in plain Python on
  one event (the tests check the two agree), so a restart, which seeds the quota counters
  from the warehouse, counts each response at the same price the proxy did;
- `worst_case(...)` is what a request may cost at most, given an upper bound of its input
  and output tokens: every input token at the dearest input rate (uncached, cache write),
  every output token at the output rate, long-context rates if the input may cross the
  threshold. Quotas reserve it before forwarding.

A price corrected in the catalog reaches the proxy at the next refresh; until then, the
live counters and the warehouse may differ by that correction (the warehouse is right).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import polars as pl

from tokentill.warehouse.events import UsageEvent
from tokentill.warehouse.pricing import (
    audio_cost_pico,
    catalog_names,
    effective_intervals,
    model_candidates,
)

_DEFAULT_TIERS = frozenset({None, "", "auto", "default"})


@dataclass(frozen=True, slots=True)
class Rates:
    """One (model, tier)'s prices in force, pico-dollars per token (per call: web search)."""

    input: int | None
    cached_input: int | None
    cache_write: int | None
    output: int | None
    tier_threshold: int | None
    tier_input: int | None
    tier_cached_input: int | None
    tier_cache_write: int | None
    tier_output: int | None
    web_search: int | None
    image_input: int | None
    image_cached_input: int | None
    image_output: int | None
    audio_input: int | None = None
    audio_cached_input: int | None = None
    audio_output: int | None = None
    audio_per_hour: int | None = None  # micro-dollars per hour
    per_character: int | None = None

    def _pick(self, over: bool, tier: int | None, base: int | None) -> int | None:
        return tier if over and tier is not None else base


def _rates(row: dict[str, object]) -> Rates:
    def get(name: str) -> int | None:
        value = row[name]
        return None if value is None else int(value)  # type: ignore[call-overload]

    return Rates(
        input=get("input_per_mtok"),
        cached_input=get("cached_input_per_mtok"),
        cache_write=get("cache_write_per_mtok"),
        output=get("output_per_mtok"),
        tier_threshold=get("tier_threshold"),
        tier_input=get("tier_input_per_mtok"),
        tier_cached_input=get("tier_cached_input_per_mtok"),
        tier_cache_write=get("tier_cache_write_per_mtok"),
        tier_output=get("tier_output_per_mtok"),
        web_search=get("web_search_per_call"),
        image_input=get("image_input_per_mtok"),
        image_cached_input=get("image_cached_input_per_mtok"),
        image_output=get("image_output_per_mtok"),
        audio_input=get("audio_input_per_mtok"),
        audio_cached_input=get("audio_cached_input_per_mtok"),
        audio_output=get("audio_output_per_mtok"),
        audio_per_hour=get("audio_per_hour"),
        per_character=get("input_per_mchar"),
    )


def _n(value: int | None) -> int:
    return value or 0


def _or(rate: int | None, fallback: int | None) -> int | None:
    return fallback if rate is None else rate


class PriceBook:
    """The catalog's rates in force at one instant. Immutable once built: a refresh
    builds a new book and swaps the reference (no locks on the hot path)."""

    def __init__(
        self,
        rates: dict[tuple[str, str], Rates],
        image_model: str,
        changes_at: datetime | None = None,
    ) -> None:
        self._rates = rates
        # The next instant a price starts or ends: the book is stale from then on.
        self.changes_at = changes_at
        self._keys, self._prefixes = catalog_names(m for m, _ in rates)
        self._candidates: dict[str, list[str]] = {}
        self._image = rates.get((image_model, "default"))

    @classmethod
    def build(cls, prices: pl.DataFrame, image_model: str, at: datetime | None = None) -> PriceBook:
        """From the `prices` table (`warehouse.prices.price_table`), the rates in force at `at`."""
        moment = at or datetime.now(UTC)
        rates: dict[tuple[str, str], Rates] = {}
        changes_at = None
        if prices.height:
            intervals = effective_intervals(prices)
            live = intervals.filter(
                (pl.col("valid_from") <= moment)
                & (pl.col("valid_to").is_null() | (pl.col("valid_to") > moment))
            )
            for row in live.to_dicts():
                rates[(str(row["price_model"]), str(row["service_tier"]))] = _rates(row)
            later = pl.concat([intervals["valid_from"], intervals["valid_to"]]).drop_nulls()
            changes_at = later.filter(later > moment).min()
        return cls(rates, image_model, changes_at)  # type: ignore[arg-type]

    def rates(self, model: str | None, service_tier: str | None) -> Rates | None:
        """The rates pricing `model` now: those of its most specific catalog name with a
        price in force for the tier (`warehouse.pricing.model_candidates`)."""
        if model is None:
            return None
        candidates = self._candidates.get(model)
        if candidates is None:
            candidates = model_candidates(model, self._keys, self._prefixes)
            if len(self._candidates) < 100_000:  # bounded: model names come from clients
                self._candidates[model] = candidates
        tier = "default" if service_tier in _DEFAULT_TIERS else str(service_tier)
        for name in candidates:
            found = self._rates.get((name, tier))
            if found is not None:
                return found
        return None

    def cost(self, event: UsageEvent) -> int | None:
        """The event's cost in pico-dollars; None when unpriced (as the warehouse says)."""
        inp, out = _n(event.input_tokens), _n(event.output_tokens)
        image_in, image_out = _n(event.image_gen_input_tokens), _n(event.image_gen_output_tokens)
        audio_ms, characters = _n(event.audio_ms), _n(event.input_characters)
        has_tokens, uses_image = inp + out > 0, image_in + image_out > 0
        if not (has_tokens or uses_image or audio_ms or characters or event.usage_unreported):
            return 0
        r = self.rates(event.model, event.service_tier)
        if r is None or event.usage_unreported:
            return None
        over = r.tier_threshold is not None and inp > r.tier_threshold
        input_rate = r._pick(over, r.tier_input, r.input)
        output_rate = r._pick(over, r.tier_output, r.output)
        cached_rate = _or(r._pick(over, r.tier_cached_input, r.cached_input), input_rate)
        write_rate = _or(r._pick(over, r.tier_cache_write, r.cache_write), input_rate)
        audio_cached_rate = _or(r.audio_cached_input, r.audio_input)
        image_in_rate = _or(r.image_input, input_rate)
        image_cached_rate = _or(r.image_cached_input, image_in_rate)
        image_out_rate = _or(r.image_output, output_rate)
        a_in, a_cached = _n(event.input_audio_tokens), _n(event.cached_audio_tokens)
        i_in, i_cached = _n(event.input_image_tokens), _n(event.cached_image_tokens)
        a_out, i_out = _n(event.output_audio_tokens), _n(event.output_image_tokens)
        written = _n(event.cache_write_tokens)
        text_cached = _n(event.cached_input_tokens) - a_cached - i_cached
        text_uncached = inp - a_in - i_in - text_cached - written
        parts = (
            (text_uncached, input_rate),
            (text_cached, cached_rate),
            (written, write_rate),
            (a_in - a_cached, r.audio_input),
            (a_cached, audio_cached_rate),
            (i_in - i_cached, image_in_rate),
            (i_cached, image_cached_rate),
            (out - a_out - i_out, output_rate),
            (a_out, r.audio_output),
            (i_out, image_out_rate),
        )
        # Every rate that must be there (as `price_events` checks them).
        if (
            (text_uncached + text_cached + written > 0 and input_rate is None)
            or (a_in > 0 and r.audio_input is None)
            or (a_cached > 0 and audio_cached_rate is None)
            or (i_in > 0 and image_in_rate is None)
            or (i_cached > 0 and image_cached_rate is None)
            or (out - a_out - i_out > 0 and output_rate is None)
            or (a_out > 0 and r.audio_output is None)
            or (i_out > 0 and image_out_rate is None)
            or (audio_ms > 0 and r.audio_per_hour is None)
            or (characters > 0 and r.per_character is None and not has_tokens)
        ):
            return None
        total = sum(count * rate for count, rate in parts if count > 0 and rate is not None)
        total += _n(event.web_search_calls) * _n(r.web_search)
        if audio_ms > 0 and r.audio_per_hour is not None:
            total += audio_cost_pico(audio_ms, r.audio_per_hour)
        total += characters * _n(r.per_character)
        if uses_image:
            image = self._image_cost(event)
            if image is None:
                return None
            total += image
        return total

    def _image_cost(self, event: UsageEvent) -> int | None:
        """Image generation tool tokens at the image model's rates (see pricing.py)."""
        i = self._image
        if i is None or i.input is None:
            return None
        out_rate = i.image_output if i.image_output is not None else i.output
        if out_rate is None:
            return None
        image_in = _n(event.image_gen_input_tokens)
        image_image = _n(event.image_gen_input_image_tokens)
        cached = _n(event.image_gen_cached_tokens)
        cached_image = min(cached, image_image)
        cached_text = cached - cached_image
        image_rate = i.image_input if i.image_input is not None else i.input
        return (
            (image_in - image_image - cached_text) * i.input
            + cached_text * (i.cached_input if i.cached_input is not None else i.input)
            + (image_image - cached_image) * image_rate
            + cached_image
            * (i.image_cached_input if i.image_cached_input is not None else image_rate)
            + _n(event.image_gen_output_tokens) * out_rate
        )

    def web_search_rate(self, model: str | None, service_tier: str | None) -> int:
        """The price of one web search call with `model` (0 when the catalog has none)."""
        r = self.rates(model, service_tier)
        return _n(r.web_search) if r is not None else 0

    def worst_case(
        self,
        model: str | None,
        service_tier: str | None,
        input_tokens: int,
        output_tokens: int,
        *,
        media: bool = False,
        characters: int = 0,
    ) -> int | None:
        """The most `input_tokens` in and `output_tokens` out can cost (None: unpriced).
        With `media` the tokens may be audio or image ones, at their own rates; speech
        priced by the character costs exactly its `characters`."""
        r = self.rates(model, service_tier)
        if r is None:
            return None
        if characters and r.per_character is not None:
            return characters * r.per_character
        over = r.tier_threshold is not None and input_tokens > r.tier_threshold
        candidates = [
            *(
                (r.tier_input, r.tier_cached_input, r.tier_cache_write)
                if over and r.tier_input is not None
                else (r.input, r.cached_input, r.cache_write)
            )
        ]
        outputs = [r._pick(over, r.tier_output, r.output)]
        if media:
            candidates += [r.audio_input, r.image_input]
            outputs += [r.audio_output, r.image_output]
        known = [rate for rate in candidates if rate is not None]
        known_out = [rate for rate in outputs if rate is not None]
        if not known or (output_tokens > 0 and not known_out):
            return None
        return input_tokens * max(known) + output_tokens * max(known_out, default=0)
