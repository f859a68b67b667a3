"""Turning tokens into money: pure functions from polars frames to frames.

Money is integer pico-dollars (1e-12 USD). A price of P USD per 1M tokens is P x 1e6
pico-dollars per token, an exact integer for any price with at most 6 decimals, so
every cost is an exact integer and sums are exact.

    cost = text input (input less its audio and image parts) at the input price,
           its cached part at the cached-input price (the input price where there is
           none), tokens written to the cache at the cache-write price (likewise)
         + audio input tokens at the audio input price, cached ones at the cached-audio
           price (the audio input price where there is none)
         + image input tokens at the image input price (the input price where there is
           none: a text model bills the images it reads as text), cached likewise
         + text output at the output price        (reasoning tokens are part of output)
         + audio output at the audio output price
         + image output at the image output price (the output price where there is none:
           genai-prices lists gpt-image-1's image output as plain output)
         + web search calls x price per call
         + image generation tool tokens at the image model's rates
         + audio transcribed x price per hour    (rounded to the pico-dollar)
         + characters spoken x price per 1M characters

When a request's input passes a model's long-context threshold, the tier rates apply to
all of its text tokens. An event is *unpriced* (counted, reported, its cost null, never
silently 0) when its model has no price in force at its `created_at`, when any part of
its usage has no rate (audio tokens with no audio price), or when the answer reported
no usage at all (`usage_unreported`).
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from typing import Any

import polars as pl

from tokentill.warehouse.events import MODALITY_COUNTS

PICO_PER_USD = 10**12
# The usage counts a cost is made of (what `price_events` needs besides model, tier, time).
PRICED_COUNTS = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "web_search_calls",
    "image_gen_input_tokens",
    "image_gen_input_image_tokens",
    "image_gen_cached_tokens",
    "image_gen_output_tokens",
    *MODALITY_COUNTS,
    "input_characters",  # asked for (speech): known from the request, not the answer
)
# With the counts: the flag of an answer that reported no usage (a boolean).
PRICED_FIELDS = (*PRICED_COUNTS, "usage_unreported")
_DATED = re.compile(r"^(?P<family>.+?)-(\d{4}-\d{2}-\d{2}|\d{4})$")

_TOKEN_RATES = ("input", "cached_input", "cache_write", "output")
_RATE_COLUMNS = (
    *(f"{r}_per_mtok" for r in _TOKEN_RATES),
    *(f"tier_{r}_per_mtok" for r in _TOKEN_RATES),
    "web_search_per_call",
    "image_input_per_mtok",
    "image_cached_input_per_mtok",
    "image_output_per_mtok",
    "audio_input_per_mtok",
    "audio_cached_input_per_mtok",
    "audio_output_per_mtok",
    "audio_per_hour",  # as integer micro-dollars per hour
    "input_per_mchar",  # as pico-dollars per character
)
MS_PER_HOUR = 3_600_000


def model_candidates(model: str, keys: set[str], prefixes: list[str]) -> list[str]:
    """The catalog names that may price `model`, most specific first: itself, then the
    prefixes it matches (fine-tunes, longest first), then, for a dated snapshot, its
    family's candidates (`gpt-4o-2024-08-06` -> `gpt-4o`). Which one prices an event is
    decided at the event's time (`price_events`): the first with a price in force then."""
    out: list[str] = []
    if model in keys:
        out.append(model)
    out += [prefix + "*" for prefix in prefixes if model.startswith(prefix)]  # longest first
    match = _DATED.match(model)
    if match:
        out += [c for c in model_candidates(match["family"], keys, prefixes) if c not in out]
    return out


def catalog_names(catalog_models: Iterable[str]) -> tuple[set[str], list[str]]:
    """The catalog's exact names, and its prefixes (longest first)."""
    names = set(catalog_models)
    keys = {m for m in names if not m.endswith("*")}
    prefixes = sorted((m[:-1] for m in names if m.endswith("*")), key=len, reverse=True)
    return keys, prefixes


def model_map(models: Iterable[str], catalog_models: Iterable[str]) -> pl.DataFrame:
    """model -> (price_model, rank) for every distinct model seen and each catalog name
    that may price it, rank 0 the most specific (a small frame; a model the catalog
    cannot price has no row)."""
    keys, prefixes = catalog_names(catalog_models)
    rows = [
        (model, name, rank)
        for model in sorted({m for m in models if m is not None})
        for rank, name in enumerate(model_candidates(model, keys, prefixes))
    ]
    return pl.DataFrame(
        rows,
        schema={"model": pl.String, "price_model": pl.String, "rank": pl.Int32},
        orient="row",
    )


def _pico_per_token(value: Decimal | None) -> int | None:
    # USD per 1M tokens -> pico-dollars per token (per call for web search: x 1e12).
    # The same factor turns USD per 1M characters into pico-dollars per character, and
    # USD per hour into micro-dollars per hour (kept so: see `audio_cost_pico`).
    return None if value is None else int(value * 1_000_000)


def audio_cost_pico(audio_ms: int, micro_per_hour: int) -> int:
    """Audio priced by the hour, in pico-dollars, rounded half up: the one rounding in
    pricing (an hour's price need not divide into pico-dollars per millisecond)."""
    return (audio_ms * micro_per_hour * 10 + 18) // 36


def _ends(rows: list[dict[str, Any]]) -> list[datetime | None]:
    """Where each row of one (model, tier) stops: its `effective_to`, else where the next
    price of at least its priority starts. So a correction (the same start, recorded
    later) replaces exactly the interval of the row it corrects, and a price "from now
    on" never reaches past a later price already listed."""
    ends: list[datetime | None] = []
    for row in rows:
        end = row["effective_to"]
        if end is None:
            later = [
                other["effective_from"]
                for other in rows
                if other["effective_from"] > row["effective_from"]
                and other["priority"] >= row["priority"]
            ]
            end = min(later, default=None)
        ends.append(end)
    return ends


def effective_intervals(prices: pl.DataFrame) -> pl.DataFrame:
    """Flatten the catalog into non-overlapping intervals per (model, tier), each with the
    row in force there: highest priority, then the latest recorded. A row is in force from
    its `effective_from` to its end (`_ends`). Rates become integer pico-dollars per
    token (per call for web search)."""
    out: list[dict[str, object]] = []
    for (model, tier), group in prices.group_by(["model", "service_tier"], maintain_order=True):
        rows = group.to_dicts()
        ends = _ends(rows)
        bounds = sorted({r["effective_from"] for r in rows} | {e for e in ends if e is not None})
        for i, start in enumerate(bounds):
            end: datetime | None = bounds[i + 1] if i + 1 < len(bounds) else None
            live = [
                r
                for r, stop in zip(rows, ends, strict=True)
                if r["effective_from"] <= start and (stop is None or stop > start)
            ]
            if not live:
                continue
            best = max(live, key=lambda r: (r["priority"], r["recorded_at"], r["price_id"]))
            record: dict[str, object] = {
                "price_model": model,
                "service_tier": tier,
                "valid_from": start,
                "valid_to": end,
                "price_id": best["price_id"],
                "tier_threshold": best.get("tier_threshold"),
            }
            for column in _RATE_COLUMNS:
                value = best.get(column)  # a catalog frame may predate a rate's column
                if column == "web_search_per_call":
                    record[column] = None if value is None else int(value * PICO_PER_USD)
                else:
                    record[column] = _pico_per_token(value)
            out.append(record)
    schema: dict[str, pl.DataType] = {
        "price_model": pl.String(),
        "service_tier": pl.String(),
        "valid_from": pl.Datetime("us", "UTC"),
        "valid_to": pl.Datetime("us", "UTC"),
        "price_id": pl.Int64(),
        "tier_threshold": pl.Int64(),
        **{c: pl.Int64() for c in _RATE_COLUMNS},
    }
    # Merge adjacent intervals held by the same row, so the frame stays small.
    frame = pl.DataFrame(out, schema=schema)
    return frame.sort("price_model", "service_tier", "valid_from")


def _rate(name: str) -> pl.Expr:
    """The rate in force for this event: the long-context tier's when it applies."""
    tier = pl.col(f"tier_{name}_per_mtok")
    base = pl.col(f"{name}_per_mtok")
    over = pl.col("tier_threshold").is_not_null() & (
        pl.col("input_tokens") > pl.col("tier_threshold")
    )
    return pl.when(over & tier.is_not_null()).then(tier).otherwise(base)


def _resolve(models: pl.LazyFrame, intervals: pl.LazyFrame) -> pl.LazyFrame:
    """Each event model's own price timeline, per tier: at every instant, the interval of
    its most specific catalog name with a price in force then (`model_map` ranks them).
    A snapshot's own price prices it from where it starts; before that (or after it
    ends) its family's or prefix's does. Computed on the small frames, never per event."""
    keys = ["model", "_tier"]
    candidates = models.join(
        intervals.rename({"service_tier": "_tier"}), on="price_model", how="inner"
    )
    starts = candidates.select(*keys, pl.col("valid_from").alias("_at"))
    ends = candidates.filter(pl.col("valid_to").is_not_null()).select(
        *keys, pl.col("valid_to").alias("_at")
    )
    segments = (
        pl.concat([starts, ends])
        .unique()
        .sort(*keys, "_at")
        .with_columns(pl.col("_at").shift(-1).over(keys).alias("_until"))
    )
    return (
        segments.join(candidates, on=keys, how="inner")
        .filter(
            (pl.col("valid_from") <= pl.col("_at"))
            & (pl.col("valid_to").is_null() | (pl.col("valid_to") > pl.col("_at")))
        )
        .sort(*keys, "_at", "rank")
        .group_by(*keys, "_at", maintain_order=True)
        .first()
        .drop("valid_from", "valid_to", "rank")
        .rename({"_at": "valid_from", "_until": "valid_to"})
    )


def _timeline(intervals: pl.LazyFrame) -> pl.LazyFrame:
    """The intervals of each (model, tier) and the gaps between them (rows with no price;
    a null `valid_from` is the beginning of time), so that every instant falls in exactly
    one row: an equi-join on model and tier and a range filter then price each event, with
    no sort of the events (an as-of join needs them sorted by time)."""
    pair = ["model", "_tier"]
    ordered = intervals.sort(*pair, "valid_from").with_columns(pl.lit(True).alias("_listed"))
    first = pl.col("valid_from") == pl.col("valid_from").min().over(pair)
    following = pl.col("valid_from").shift(-1).over(pair)
    before = ordered.filter(first).select(
        *pair,
        "_listed",
        pl.lit(None, pl.Datetime("us", "UTC")).alias("valid_from"),
        pl.col("valid_from").alias("valid_to"),
    )
    after = (
        ordered.with_columns(following.alias("_next"))
        .filter(
            pl.col("valid_to").is_not_null()
            & (pl.col("_next").is_null() | (pl.col("_next") > pl.col("valid_to")))
        )
        .select(
            *pair,
            "_listed",
            pl.col("valid_to").alias("valid_from"),
            pl.col("_next").alias("valid_to"),
        )
    )
    return pl.concat([ordered, before, after], how="diagonal_relaxed")


CHARGES = (
    "input",
    "cached_input",
    "cache_write",
    "output",
    "web_search",
    "audio_duration",
    "speech_characters",
    "image_generation",
)
"""What an event's cost is made of, as `charge_<name>_pico` (`price_events(charges=True)`):
tokens by kind (each modality's at its own rate), each hosted tool's calls, and the media
priced by other units. They sum to `cost_pico`, exactly."""


def price_events(
    events: pl.LazyFrame,
    models: pl.LazyFrame,
    intervals: pl.LazyFrame,
    image_model: str,
    *,
    charges: bool = False,
) -> pl.LazyFrame:
    """Add `price_model`, `price_id`, `cost_pico` (null when unpriced) and `unpriced` to
    each event (`price_model` null when no catalog row of its model and tier is in force);
    with `charges`, what the cost is made of too (`CHARGES`)."""
    # Counts a frame does not carry are none of them (a frame of text usage needs no audio).
    present = set(events.collect_schema().names())
    events = events.with_columns(
        pl.lit(None, pl.Boolean if c == "usage_unreported" else pl.Int64).alias(c)
        for c in PRICED_FIELDS
        if c not in present
    )
    tiered = events.with_columns(
        pl.col("service_tier").fill_null("default").replace({"auto": "default"}).alias("_tier"),
        *(pl.col(c).fill_null(0) for c in PRICED_COUNTS),
        pl.col("usage_unreported").fill_null(False),
    )
    # The catalog rows these events can need, keyed by the models they name: a small frame,
    # so that each event is priced by one join on (model, tier) and a range filter.
    span = events.select(
        pl.col("created_at").min().alias("_lo"), pl.col("created_at").max().alias("_hi")
    )
    lookup = (
        _timeline(_resolve(models, intervals))
        .join(span, how="cross")
        .filter(
            (pl.col("valid_to").is_null() | (pl.col("valid_to") > pl.col("_lo")))
            & (pl.col("valid_from").is_null() | (pl.col("valid_from") <= pl.col("_hi")))
        )
        .drop("_lo", "_hi")
    )
    joined = (
        tiered.join(lookup, on=["model", "_tier"], how="left")
        # One row per event: the one interval (or gap) of its model and tier holding its
        # created_at, or none when the catalog has nothing for that model and tier.
        .filter(
            pl.col("_listed").is_null()
            | (
                (pl.col("valid_from").is_null() | (pl.col("valid_from") <= pl.col("created_at")))
                & (pl.col("valid_to").is_null() | (pl.col("created_at") < pl.col("valid_to")))
            )
        )
    )
    image = (
        intervals.filter(
            (pl.col("price_model") == image_model) & (pl.col("service_tier") == "default")
        )
        .select(
            "valid_from",
            pl.col("valid_to").alias("_img_to"),
            pl.col("input_per_mtok").alias("_img_text"),
            pl.col("cached_input_per_mtok").alias("_img_text_cached"),
            pl.col("output_per_mtok").alias("_img_text_out"),
            pl.col("image_input_per_mtok").alias("_img_in"),
            pl.col("image_cached_input_per_mtok").alias("_img_cached"),
            pl.col("image_output_per_mtok").alias("_img_out"),
        )
        .sort("valid_from")
    )
    # Image generation is rare: only the events using it are sorted for the as-of join.
    uses_image = (pl.col("image_gen_input_tokens") + pl.col("image_gen_output_tokens")) > 0
    with_image = pl.concat(
        [
            joined.filter(uses_image)
            .sort("created_at")
            .join_asof(
                image.rename({"valid_from": "_img_from"}),
                left_on="created_at",
                right_on="_img_from",
                strategy="backward",
            ),
            joined.filter(~uses_image),
        ],
        how="diagonal_relaxed",
    )
    input_rate = _rate("input")
    cached_rate = pl.coalesce(_rate("cached_input"), input_rate)
    write_rate = pl.coalesce(_rate("cache_write"), input_rate)
    output_rate = _rate("output")
    audio_in_rate = pl.col("audio_input_per_mtok")
    audio_cached_rate = pl.coalesce(pl.col("audio_cached_input_per_mtok"), audio_in_rate)
    audio_out_rate = pl.col("audio_output_per_mtok")
    image_in_rate = pl.coalesce(pl.col("image_input_per_mtok"), input_rate)
    image_cached_rate = pl.coalesce(pl.col("image_cached_input_per_mtok"), image_in_rate)
    image_out_rate = pl.coalesce(pl.col("image_output_per_mtok"), output_rate)
    audio_in, audio_cached = pl.col("input_audio_tokens"), pl.col("cached_audio_tokens")
    image_in, image_cached = pl.col("input_image_tokens"), pl.col("cached_image_tokens")
    audio_out, image_out = pl.col("output_audio_tokens"), pl.col("output_image_tokens")
    text_cached = pl.col("cached_input_tokens") - audio_cached - image_cached
    text_in = pl.col("input_tokens") - audio_in - image_in
    text_uncached = text_in - text_cached - pl.col("cache_write_tokens")
    text_out = pl.col("output_tokens") - audio_out - image_out
    audio_ms, characters = pl.col("audio_ms"), pl.col("input_characters")

    def part(count: pl.Expr, rate: pl.Expr) -> pl.Expr:
        # A part with nothing in it costs nothing, whether or not it has a rate.
        return pl.when(count > 0).then(count * rate).otherwise(0)

    parts = {
        "input": part(text_uncached, input_rate)
        + part(audio_in - audio_cached, audio_in_rate)
        + part(image_in - image_cached, image_in_rate),
        "cached_input": part(text_cached, cached_rate)
        + part(audio_cached, audio_cached_rate)
        + part(image_cached, image_cached_rate),
        "cache_write": part(pl.col("cache_write_tokens"), write_rate),
        "output": part(text_out, output_rate)
        + part(audio_out, audio_out_rate)
        + part(image_out, image_out_rate),
        "web_search": pl.col("web_search_calls") * pl.col("web_search_per_call").fill_null(0),
        "audio_duration": pl.when(audio_ms > 0)
        .then((audio_ms * pl.col("audio_per_hour") * 10 + 18) // 36)
        .otherwise(0),
        "speech_characters": part(characters, pl.col("input_per_mchar").fill_null(0)),
    }
    # Summed with `+`: a part without its rate (null) makes the whole null, as it must.
    token_cost = functools.reduce(operator.add, parts.values())
    gen_in = pl.col("image_gen_input_tokens")
    gen_image = pl.col("image_gen_input_image_tokens")
    # Cached tokens are part of the input: image tokens first, the rest text.
    gen_cached_image = pl.min_horizontal(pl.col("image_gen_cached_tokens"), gen_image)
    gen_cached_text = pl.col("image_gen_cached_tokens") - gen_cached_image
    gen_image_rate = pl.coalesce(pl.col("_img_in"), pl.col("_img_text"))
    image_cost = (
        (gen_in - gen_image - gen_cached_text) * pl.col("_img_text")
        + gen_cached_text * pl.coalesce(pl.col("_img_text_cached"), pl.col("_img_text"))
        + (gen_image - gen_cached_image) * gen_image_rate
        + gen_cached_image * pl.coalesce(pl.col("_img_cached"), gen_image_rate)
        # The image model's output rate: its image-output price where the catalog has one
        # (genai-prices lists gpt-image-1's as plain output), never an input price.
        + pl.col("image_gen_output_tokens")
        * pl.coalesce(pl.col("_img_out"), pl.col("_img_text_out"))
    )
    has_tokens = (pl.col("input_tokens") + pl.col("output_tokens")) > 0
    has_usage = has_tokens | (audio_ms > 0) | (characters > 0)

    def rated(count: pl.Expr, rate: pl.Expr) -> pl.Expr:
        return (count <= 0) | rate.is_not_null()

    priced = (
        pl.col("price_id").is_not_null()
        & ~pl.col("usage_unreported")
        & rated(text_uncached + text_cached + pl.col("cache_write_tokens"), input_rate)
        & rated(audio_in, audio_in_rate)
        & rated(audio_cached, audio_cached_rate)
        & rated(image_in, image_in_rate)
        & rated(image_cached, image_cached_rate)
        & rated(text_out, output_rate)
        & rated(audio_out, audio_out_rate)
        & rated(image_out, image_out_rate)
        & rated(audio_ms, pl.col("audio_per_hour"))
        # Characters are the measure only where the model is priced by them; speech from
        # a token-priced model that reported no tokens is unpriced.
        & (rated(characters, pl.col("input_per_mchar")) | has_tokens)
    )
    image_priced = ~uses_image | (
        pl.col("_img_text").is_not_null()
        & pl.coalesce(pl.col("_img_out"), pl.col("_img_text_out")).is_not_null()
        & (pl.col("_img_to").is_null() | (pl.col("created_at") < pl.col("_img_to")))
    )
    billed = has_usage | uses_image | pl.col("usage_unreported")
    cost = (
        pl.when(~billed)
        .then(pl.lit(0, pl.Int64))
        .when(priced & image_priced)
        .then(token_cost + pl.when(uses_image).then(image_cost).otherwise(0))
        .otherwise(None)
    )
    if charges:
        parts["image_generation"] = pl.when(uses_image).then(image_cost).otherwise(0)
        with_image = with_image.with_columns(
            pl.when(~billed)
            .then(pl.lit(0, pl.Int64))
            .when(priced & image_priced)
            .then(expr)
            .otherwise(None)
            .cast(pl.Int64)
            .alias(f"charge_{name}_pico")
            for name, expr in parts.items()
        )
    return with_image.with_columns(
        cost.cast(pl.Int64).alias("cost_pico"),
        (billed & ~(priced & image_priced)).cast(pl.Int64).alias("unpriced"),
    ).drop(
        "_tier",
        "_listed",
        "valid_from",
        "valid_to",
        "tier_threshold",
        *_RATE_COLUMNS,
        "_img_from",
        "_img_to",
        "_img_text",
        "_img_text_cached",
        "_img_text_out",
        "_img_in",
        "_img_cached",
        "_img_out",
        strict=False,
    )
