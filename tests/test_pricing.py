"""Cost rules against hand-computed figures, and the catalog built from genai-prices."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pytest

from tokentill.warehouse.catalog import EPOCH, OVERRIDE_PRIORITY, PriceRow, source_version
from tokentill.warehouse.db import fetch_one, open_warehouse
from tokentill.warehouse.prices import (
    PriceFileError,
    insert_rows,
    load_price_file,
    price_table,
    seed_published,
)
from tokentill.warehouse.pricing import CHARGES, effective_intervals, model_map, price_events

NOON = datetime(2026, 3, 10, 12, tzinfo=UTC)
D = Decimal


def row(model: str, tier: str = "default", start: datetime = EPOCH, **prices: Any) -> PriceRow:
    return PriceRow(
        model,
        tier,
        start,
        None,
        {k: D(str(v)) if k != "tier_threshold" else v for k, v in prices.items()},
        "test",
    )


CATALOG = [
    row(
        "gpt-4o",
        input_per_mtok=2.5,
        cached_input_per_mtok=1.25,
        output_per_mtok=10,
        web_search_per_call="0.01",
    ),
    # A price change at noon on 2026-03-10.
    row("gpt-4o", start=NOON, input_per_mtok=2, cached_input_per_mtok=1, output_per_mtok=8),
    row("gpt-4o-2024-05-13", input_per_mtok=5, output_per_mtok=15),
    row("gpt-5", input_per_mtok=1.25, cached_input_per_mtok=0.125, output_per_mtok=10),
    row("gpt-5", "flex", input_per_mtok=0.625, cached_input_per_mtok=0.0625, output_per_mtok=5),
    row("gpt-5", "priority", input_per_mtok=2.5, cached_input_per_mtok=0.25, output_per_mtok=20),
    row("o4-mini", input_per_mtok=1.1, cached_input_per_mtok=0.275, output_per_mtok=4.4),
    row(
        "ft:gpt-4o-mini-2024-*", input_per_mtok=0.3, cached_input_per_mtok=0.15, output_per_mtok=1.2
    ),
    row(
        "long-ctx",
        input_per_mtok=2,
        cached_input_per_mtok=0.2,
        cache_write_per_mtok=2.5,
        output_per_mtok=10,
        tier_threshold=272000,
        tier_input_per_mtok=4,
        tier_cached_input_per_mtok=0.4,
        tier_cache_write_per_mtok=5,
        tier_output_per_mtok=15,
    ),
    row(
        # As genai-prices lists it: image output at the plain output rate, no
        # image_output_per_mtok of its own.
        "gpt-image-1",
        input_per_mtok=5,
        cached_input_per_mtok=1.25,
        output_per_mtok=40,
        image_input_per_mtok=10,
        image_cached_input_per_mtok=2.5,
    ),
]


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    connection = open_warehouse(tmp_path / "prices.duckdb")
    insert_rows(connection, CATALOG)
    yield connection
    connection.close()


def price(
    conn: duckdb.DuckDBPyConnection, events: list[dict[str, Any]], *, charges: bool = False
) -> list[dict[str, Any]]:
    defaults: dict[str, Any] = {
        "service_tier": "default",
        "status": "completed",
        "created_at": datetime(2026, 3, 10, 9, tzinfo=UTC),
        "input_tokens": 0,
        "cached_input_tokens": 0,
        "cache_write_tokens": 0,
        "output_tokens": 0,
        "reasoning_tokens": 0,
        "web_search_calls": 0,
        "image_gen_input_tokens": 0,
        "image_gen_input_image_tokens": 0,
        "image_gen_cached_tokens": 0,
        "image_gen_output_tokens": 0,
    }
    frame = pl.DataFrame(
        [{**defaults, **e} for e in events],
        schema_overrides={"created_at": pl.Datetime("us", "UTC")},
    )
    prices = price_table(conn)
    result = price_events(
        frame.lazy(),
        model_map(frame["model"].to_list(), prices["model"].to_list()).lazy(),
        effective_intervals(prices).lazy(),
        "gpt-image-1",
        charges=charges,
    ).collect()
    by_model = {
        (r["model"], r["created_at"], r["service_tier"], r["input_tokens"]): r
        for r in result.to_dicts()
    }
    return [
        by_model[
            (
                e["model"],
                e.get("created_at", defaults["created_at"]),
                e.get("service_tier", "default"),
                e.get("input_tokens", 0),
            )
        ]
        for e in events
    ]


# (event, cost in pico-dollars: tokens x USD per 1M tokens x 1e6), computed by hand.
CASES: list[tuple[str, dict[str, Any], int | None]] = [
    (
        "cached input at the cached rate",
        {"model": "gpt-4o", "input_tokens": 1000, "cached_input_tokens": 200, "output_tokens": 500},
        800 * 2_500_000 + 200 * 1_250_000 + 500 * 10_000_000,
    ),
    (
        "reasoning tokens are inside output: priced once",
        {"model": "o4-mini", "input_tokens": 100, "output_tokens": 1000, "reasoning_tokens": 800},
        100 * 1_100_000 + 1000 * 4_400_000,
    ),
    (
        "flex tier",
        {
            "model": "gpt-5",
            "service_tier": "flex",
            "input_tokens": 1000,
            "cached_input_tokens": 400,
            "output_tokens": 100,
        },
        600 * 625_000 + 400 * 62_500 + 100 * 5_000_000,
    ),
    (
        "priority tier",
        {"model": "gpt-5", "service_tier": "priority", "input_tokens": 1000, "output_tokens": 100},
        1000 * 2_500_000 + 100 * 20_000_000,
    ),
    (
        "auto is priced as default",
        {"model": "gpt-5", "service_tier": "auto", "input_tokens": 10, "output_tokens": 10},
        10 * 1_250_000 + 10 * 10_000_000,
    ),
    (
        "a dated snapshot resolves to its family",
        {"model": "gpt-4o-2024-08-06", "input_tokens": 1000, "output_tokens": 1000},
        1000 * 2_500_000 + 1000 * 10_000_000,
    ),
    (
        "a snapshot with a price of its own keeps it",
        {"model": "gpt-4o-2024-05-13", "input_tokens": 1000, "output_tokens": 1000},
        1000 * 5_000_000 + 1000 * 15_000_000,
    ),
    (
        "a fine-tune resolves to its fine-tune price",
        {
            "model": "ft:gpt-4o-mini-2024-07-18:acme::abc123",
            "input_tokens": 1000,
            "cached_input_tokens": 100,
            "output_tokens": 10,
        },
        900 * 300_000 + 100 * 150_000 + 10 * 1_200_000,
    ),
    (
        "an unknown model is unpriced, never 0",
        {"model": "gpt-99-turbo", "input_tokens": 1000, "output_tokens": 10},
        None,
    ),
    (
        "a price change at noon: before it, the old price",
        {
            "model": "gpt-4o",
            "created_at": datetime(2026, 3, 10, 11, 59, tzinfo=UTC),
            "input_tokens": 1000,
            "output_tokens": 100,
        },
        1000 * 2_500_000 + 100 * 10_000_000,
    ),
    (
        "a price change at noon: after it, the new price",
        {
            "model": "gpt-4o",
            "created_at": datetime(2026, 3, 10, 12, 1, tzinfo=UTC),
            "input_tokens": 1000,
            "output_tokens": 100,
        },
        1000 * 2_000_000 + 100 * 8_000_000,
    ),
    (
        "under the long-context threshold: base rates, cache writes at their own rate",
        {
            "model": "long-ctx",
            "input_tokens": 1000,
            "cached_input_tokens": 100,
            "cache_write_tokens": 300,
            "output_tokens": 10,
        },
        600 * 2_000_000 + 100 * 200_000 + 300 * 2_500_000 + 10 * 10_000_000,
    ),
    (
        "past the threshold: tier rates for all tokens",
        {
            "model": "long-ctx",
            "input_tokens": 300_000,
            "cached_input_tokens": 100_000,
            "cache_write_tokens": 0,
            "output_tokens": 1000,
        },
        200_000 * 4_000_000 + 100_000 * 400_000 + 1000 * 15_000_000,
    ),
    (
        "no cache-write price: cache writes at the input price",
        {"model": "gpt-5", "input_tokens": 1000, "cache_write_tokens": 300, "output_tokens": 0},
        1000 * 1_250_000,
    ),
    (
        "web search calls at their own price",
        {"model": "gpt-4o", "input_tokens": 100, "output_tokens": 10, "web_search_calls": 3},
        100 * 2_500_000 + 10 * 10_000_000 + 3 * 10_000_000_000,
    ),
    (
        "image generation tokens at the image model's rates",
        {
            "model": "gpt-4o",
            "input_tokens": 100,
            "output_tokens": 10,
            "image_gen_input_tokens": 50,
            "image_gen_input_image_tokens": 20,
            "image_gen_output_tokens": 1000,
        },
        100 * 2_500_000 + 10 * 10_000_000 + 30 * 5_000_000 + 20 * 10_000_000 + 1000 * 40_000_000,
    ),
    (
        "cached image generation tokens at the cached image rate",
        {
            "model": "gpt-4o",
            "input_tokens": 101,
            "output_tokens": 10,
            "image_gen_input_tokens": 50,
            "image_gen_input_image_tokens": 20,
            "image_gen_cached_tokens": 25,
            "image_gen_output_tokens": 1000,
        },
        101 * 2_500_000
        + 10 * 10_000_000
        + 25 * 5_000_000  # text: 30, of which 5 cached
        + 5 * 1_250_000
        + 20 * 2_500_000  # image: 20, all cached
        + 1000 * 40_000_000,
    ),
    (
        "an error without tokens costs nothing and is not unpriced",
        {"model": "gpt-99-turbo", "status": "error"},
        0,
    ),
]


@pytest.mark.parametrize(("case", "event", "expected"), CASES, ids=[c[0] for c in CASES])
def test_cost_rules(
    conn: duckdb.DuckDBPyConnection, case: str, event: dict[str, Any], expected: int | None
) -> None:
    (priced,) = price(conn, [event])
    assert priced["cost_pico"] == expected, case
    has_tokens = event.get("input_tokens", 0) + event.get("output_tokens", 0) > 0
    assert priced["unpriced"] == (1 if expected is None and has_tokens else 0)


@pytest.mark.parametrize(("case", "event", "expected"), CASES, ids=[c[0] for c in CASES])
def test_charges_add_up_to_the_cost(
    conn: duckdb.DuckDBPyConnection, case: str, event: dict[str, Any], expected: int | None
) -> None:
    """What a cost is made of (a FOCUS export's charges): the parts sum to it, exactly;
    an unpriced event has no parts."""
    (priced,) = price(conn, [event], charges=True)
    parts = [priced[f"charge_{name}_pico"] for name in CHARGES]
    if expected is None:
        assert parts == [None] * len(CHARGES), case
    else:
        assert sum(parts) == priced["cost_pico"] == expected, case
        assert all(part >= 0 for part in parts), case


def test_overrides_win_and_corrections_replace(conn: duckdb.DuckDBPyConnection) -> None:
    event = {"model": "gpt-4o", "input_tokens": 1_000_000, "output_tokens": 0}
    assert price(conn, [event])[0]["cost_pico"] == 2_500_000 * 1_000_000
    negotiated = PriceRow(
        "gpt-4o",
        "default",
        EPOCH,
        None,
        {"input_per_mtok": D("2.0"), "output_per_mtok": D("9")},
        "file:prices.toml",
        OVERRIDE_PRIORITY,
    )
    insert_rows(conn, [negotiated])
    assert price(conn, [event])[0]["cost_pico"] == 2_000_000 * 1_000_000
    corrected = PriceRow(
        "gpt-4o",
        "default",
        EPOCH,
        None,
        {"input_per_mtok": D("1.9"), "output_per_mtok": D("9")},
        "api:finance",
        OVERRIDE_PRIORITY,
    )
    insert_rows(conn, [corrected])
    assert price(conn, [event])[0]["cost_pico"] == 1_900_000 * 1_000_000
    # Rows are only added: the whole history stays.
    assert fetch_one(conn, "SELECT count(*) FROM prices WHERE model = 'gpt-4o'") == (4,)


def test_published_catalog_from_genai_prices(tmp_path: Path) -> None:
    conn = open_warehouse(tmp_path / "published.duckdb")
    added = seed_published(conn)
    assert added > 200
    assert seed_published(conn) == 0  # once per genai-prices version
    prices = price_table(conn)
    assert set(prices["source"]) == {source_version()}

    def current(model: str, tier: str = "default") -> dict[str, Any]:
        rows = prices.filter(
            (pl.col("model") == model)
            & (pl.col("service_tier") == tier)
            & pl.col("effective_to").is_null()
        )
        assert rows.height == 1, (model, tier, rows)
        return rows.row(0, named=True)

    gpt4o = current("gpt-4o")
    assert (gpt4o["input_per_mtok"], gpt4o["cached_input_per_mtok"], gpt4o["output_per_mtok"]) == (
        D("2.5"),
        D("1.25"),
        D("10"),
    )
    assert gpt4o["web_search_per_call"] == D("0.01")
    assert current("gpt-4o-2024-08-06")["input_per_mtok"] == D("2.5")
    assert current("gpt-4o-2024-05-13")["input_per_mtok"] == D("5")
    assert current("gpt-5", "flex")["input_per_mtok"] == D("0.625")
    assert current("gpt-5", "priority")["output_per_mtok"] == D("20")
    assert current("ft:gpt-4o-mini-2024-*")["input_per_mtok"] == D("0.3")
    # History: o3's price was cut on 2025-06-10, and both periods are there.
    o3 = prices.filter((pl.col("model") == "o3") & (pl.col("service_tier") == "default"))
    assert sorted(o3["input_per_mtok"].to_list()) == [D("2"), D("10")]
    # Long-context tiers carry their threshold.
    assert prices.filter(pl.col("tier_threshold").is_not_null()).height > 0
    conn.close()


def test_price_file_is_validated(tmp_path: Path) -> None:
    good = tmp_path / "prices.toml"
    good.write_text(
        """
[[price]]
model = "ft:gpt-4o-mini-2024-07-18:acme::*"
effective_from = 2026-01-01
input_per_mtok = 0.25
output_per_mtok = 1.0
note = "negotiated"
"""
    )
    (parsed,) = load_price_file(good)
    assert parsed.model == "ft:gpt-4o-mini-2024-07-18:acme::*"
    assert parsed.priority == OVERRIDE_PRIORITY and parsed.source == "file:prices.toml"
    assert parsed.prices["input_per_mtok"] == D("0.25")
    for body, message in [
        ('[[price]]\nmodel = "x"\nnote = "free?"\n', "names no rate"),
        ('[[price]]\nmodel = "x"\ninput_per_mtok = -1\noutput_per_mtok = 1\n', ">= 0"),
        ('[[price]]\nmodel = "x"\ninput_per_mtok = 0.0000001\noutput_per_mtok = 1\n', "6 decimals"),
        (
            '[[price]]\nmodel = "x"\nservice_tier = "gold"\n'
            "input_per_mtok = 1\noutput_per_mtok = 1\n",
            "service_tier",
        ),
        ('[[price]]\nmodel = "x"\nprice = 1\n', "unknown keys"),
        ("[[price]\n", "prices.toml"),
    ]:
        bad = tmp_path / "prices.toml"
        bad.write_text(body)
        with pytest.raises(PriceFileError, match=message):
            load_price_file(bad)
