"""Money on the wire: exact USD decimal strings from integer pico-dollars.

JSON numbers are read as binary floats by most clients; a string keeps every digit
(`"12.000150000001"`). Finance exports add cents that add up (see warehouse/finance.py).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

from pydantic import Field

PICO_DIGITS = 12  # warehouse.pricing.PICO_PER_USD = 10**12

USD = Annotated[
    str,
    Field(
        description="Exact USD as a decimal string (pico-dollar precision).",
        examples=["12.345678"],
        pattern=r"^-?\d+(\.\d+)?$",
    ),
]


def usd(pico: int | Decimal | None) -> str:
    """Exact USD from pico-dollars, without exponent or trailing zeros."""
    text = format(Decimal(int(pico or 0)).scaleb(-PICO_DIGITS), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text
