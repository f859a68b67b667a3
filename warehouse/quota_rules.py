"""Quotas' vocabulary, shared by the proxy's quota book (warehouse/quota_book.py), the service
that owns it and the admin API: what is limited (a unit over a period, hard or soft), on
whom (a subject: an end user or a metadata tag's value), and the windows periods cut
time into."""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Literal, get_args

from tokentill.warehouse.pricing import PICO_PER_USD

Unit = Literal["usd", "tokens", "requests"]
Period = Literal["minute", "day", "month", "total"]
Mode = Literal["hard", "soft"]
UNITS: tuple[Unit, ...] = get_args(Unit)
PERIODS: tuple[Period, ...] = get_args(Period)
THRESHOLDS = (50, 80, 100)
_US_MINUTE = 60_000_000
_US_DAY = 86_400_000_000
FOREVER = 2**62  # the end of a `total` window (microseconds)

# ("user", user_id, "") or ("tag", key, value)
Subject = tuple[str, str, str]


def user_subject(user_id: str) -> Subject:
    return ("user", user_id, "")


def tag_subject(key: str, value: str) -> Subject:
    return ("tag", key, value)


def subject_label(subject: Subject) -> str:
    return f"user:{subject[1]}" if subject[0] == "user" else f"tag:{subject[1]}={subject[2]}"


@dataclass(frozen=True, slots=True)
class Limit:
    unit: Unit
    period: Period
    amount: int  # pico-dollars for usd, else a count
    mode: Mode = "hard"

    def describe(self, value: int) -> str:
        if self.unit == "usd":
            return f"${usd(value)}"
        return f"{value} {self.unit}"


def usd(pico: int) -> Decimal:
    """Pico-dollars as an exact Decimal of USD, without trailing zeros past the cent."""
    value = Decimal(pico) / PICO_PER_USD
    return value.quantize(Decimal("0.01")) if value == value.quantize(Decimal("0.01")) else value


def window(period: Period, t_us: int) -> tuple[int, int]:
    """The UTC window [start, end) in microseconds holding `t_us`."""
    if period == "minute":
        start = t_us - t_us % _US_MINUTE
        return start, start + _US_MINUTE
    if period == "day":
        start = t_us - t_us % _US_DAY
        return start, start + _US_DAY
    if period == "month":
        moment = datetime.fromtimestamp(t_us / 1e6, UTC)
        first = datetime(moment.year, moment.month, 1, tzinfo=UTC)
        days = calendar.monthrange(moment.year, moment.month)[1]
        start = int(first.timestamp()) * 1_000_000
        return start, start + days * _US_DAY
    return 0, FOREVER
