"""Quotas: set, read and remove the limits of an end user, of every user (the default) and
of a metadata tag; read what each has used in its current period, its burn rate and when
it would reach its limit at that rate.

Amounts are decimal strings: USD for `usd`, counts for `tokens` and `requests`.
`PUT` takes one limit (`{"limit_usd": "5.00", "period": "day"}`) or several
(`{"limits": [...]}`), and replaces all of the subject's limits.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Response, status
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from tokentill.api.deps import RuntimeDep
from tokentill.warehouse.events import now_us
from tokentill.warehouse.identity import BadUserId, end_user_id
from tokentill.warehouse.pricing import PICO_PER_USD
from tokentill.warehouse.quota_book import QuotaBook
from tokentill.warehouse.quota_rules import (
    Limit,
    Mode,
    Period,
    Subject,
    Unit,
    subject_label,
    tag_subject,
    user_subject,
)
from tokentill.warehouse.quota_service import QuotaService

router = APIRouter(
    prefix="/quotas", tags=["quotas"], responses={404: {"description": "No such quota or block"}}
)

_FOREVER_US = 2**62
UserId = Path(min_length=1, max_length=256)


def _canonical_user(runtime: RuntimeDep, user_id: str = UserId) -> str:
    """The end user's id as the proxy reads it (NFC, trimmed, case-folded if so set), so
    a quota set on ` QA-Alice` is the quota of the user the proxy calls `qa-alice`."""
    try:
        return end_user_id(user_id, case_fold=runtime.settings.user_id_case_fold)
    except BadUserId as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"the user id {exc}") from None


CanonicalUser = Annotated[str, Depends(_canonical_user)]


class LimitIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    period: Period
    mode: Mode = "hard"
    limit_usd: Decimal | None = Field(None, ge=0, le=10**9, decimal_places=12)
    limit_tokens: StrictInt | None = Field(None, ge=0, le=10**18)
    limit_requests: StrictInt | None = Field(None, ge=0, le=10**18)

    @model_validator(mode="after")
    def _one_amount(self) -> LimitIn:
        given = [self.limit_usd, self.limit_tokens, self.limit_requests]
        if sum(value is not None for value in given) != 1:
            raise ValueError("give exactly one of limit_usd, limit_tokens, limit_requests")
        return self

    def to_limit(self) -> Limit:
        if self.limit_usd is not None:
            return Limit("usd", self.period, int(self.limit_usd * PICO_PER_USD), self.mode)
        if self.limit_tokens is not None:
            return Limit("tokens", self.period, self.limit_tokens, self.mode)
        return Limit("requests", self.period, self.limit_requests or 0, self.mode)


class LimitsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limits: list[LimitIn] = Field(max_length=12)

    @model_validator(mode="after")
    def _distinct(self) -> LimitsIn:
        keys = [(limit.to_limit().unit, limit.period) for limit in self.limits]
        if len(set(keys)) != len(keys):
            raise ValueError("at most one limit per unit and period")
        return self


class LimitOut(BaseModel):
    unit: Unit
    period: Period
    mode: Mode
    limit: Decimal
    used: Decimal | None = None
    reserved: Decimal | None = None
    remaining: Decimal | None = None
    percent_used: Decimal | None = None
    window_start: datetime | None = None
    resets_at: datetime | None = None
    burn_rate_per_hour: Decimal | None = Field(
        None, description="over the last 15 minutes (or since the counter began)"
    )
    projected_limit_at: datetime | None = Field(
        None, description="when the limit is reached at the current burn rate, if before reset"
    )


class QuotaOut(BaseModel):
    subject: str  # user:<id>, tag:<key>=<value>, default
    scope: Literal["user", "tag", "default"]
    user_id: str | None = None
    tag_key: str | None = None
    tag_value: str | None = None
    source: Literal["own", "default", "none"] = "own"
    limits: list[LimitOut]


def _service(runtime: RuntimeDep) -> QuotaService:
    if runtime.quotas is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT, "quotas are disabled (TOKENTILL_QUOTAS_ENABLED=false)"
        )
    return runtime.quotas


def _amount(unit: Unit, value: int) -> Decimal:
    return Decimal(value) / PICO_PER_USD if unit == "usd" else Decimal(value)


def _status(book: QuotaBook, subject: Subject, limit: Limit, now: int) -> LimitOut:
    meter = book.meter(subject, now)
    current = meter.current(limit.period, now)
    used = current.used.of(limit.unit)
    reserved = meter.reserved.of(limit.unit)
    remaining = max(0, limit.amount - used)
    rate = meter.burn_per_hour(limit.unit, now)
    projected = None
    if rate > 0 and remaining > 0:
        at_us = now + int(Decimal(remaining) / rate * 3_600_000_000)
        if at_us < current.end:
            projected = datetime.fromtimestamp(at_us / 1e6, UTC)
    elif remaining == 0 and used > 0:
        projected = datetime.fromtimestamp(now / 1e6, UTC)
    per_hour = rate / PICO_PER_USD if limit.unit == "usd" else rate
    return LimitOut(
        unit=limit.unit,
        period=limit.period,
        mode=limit.mode,
        limit=_amount(limit.unit, limit.amount),
        used=_amount(limit.unit, used),
        reserved=_amount(limit.unit, reserved),
        remaining=_amount(limit.unit, remaining),
        percent_used=(
            (Decimal(used * 100) / limit.amount).quantize(Decimal("0.01")) if limit.amount else None
        ),
        window_start=datetime.fromtimestamp(current.start / 1e6, UTC),
        resets_at=(
            None if current.end >= _FOREVER_US else datetime.fromtimestamp(current.end / 1e6, UTC)
        ),
        burn_rate_per_hour=per_hour.quantize(Decimal("0.000001")),
        projected_limit_at=projected,
    )


def _view(book: QuotaBook, subject: Subject) -> QuotaOut:
    limits, source = book.limits_of(subject)
    now = now_us()
    out = QuotaOut(
        subject=subject_label(subject),
        scope="user" if subject[0] == "user" else "tag",
        source=source,
        limits=[_status(book, subject, limit, now) for limit in limits],
    )
    if subject[0] == "user":
        out.user_id = subject[1]
    else:
        out.tag_key, out.tag_value = subject[1], subject[2]
    return out


def _default_view(book: QuotaBook) -> QuotaOut:
    return QuotaOut(
        subject="default",
        scope="default",
        limits=[
            LimitOut(
                unit=limit.unit,
                period=limit.period,
                mode=limit.mode,
                limit=_amount(limit.unit, limit.amount),
            )
            for limit in book.default_limits
        ],
    )


def _limits(body: LimitIn | LimitsIn) -> list[Limit]:
    return [body.to_limit()] if isinstance(body, LimitIn) else [x.to_limit() for x in body.limits]


def _tag(runtime: RuntimeDep, key: str, value: str) -> Subject:
    keys = runtime.settings.quota_tag_keys
    if key not in keys:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            f"metadata key {key!r} is not counted for quotas; TOKENTILL_QUOTA_TAG_KEYS is "
            f"{list(keys)}",
        )
    if not 0 < len(value) <= 512:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "a tag value is 1 to 512 characters")
    return tag_subject(key, value)


@router.get("", response_model=list[QuotaOut])
async def list_quotas(runtime: RuntimeDep) -> list[QuotaOut]:
    service = _service(runtime)
    book = service.book
    out = [_default_view(book)] if book.default_limits else []
    subjects = sorted(book.subjects_with_limits())
    await service.current(subjects)
    return out + [_view(book, subject) for subject in subjects]


# -- temporary blocks (critical abuse flags, TOKENTILL_ABUSE_BLOCK_SECONDS) -----------------


class BlockOut(BaseModel):
    user_id: str
    until: datetime


@router.get("/blocks", response_model=list[BlockOut])
async def list_blocks(runtime: RuntimeDep) -> list[BlockOut]:
    blocks = _service(runtime).book.blocks(now_us())
    return [
        BlockOut(user_id=user, until=datetime.fromtimestamp(until / 1e6, UTC))
        for user, until in sorted(blocks.items())
    ]


@router.delete("/blocks/{user_id:path}", status_code=status.HTTP_204_NO_CONTENT)
async def lift_block(runtime: RuntimeDep, user_id: CanonicalUser) -> Response:
    if not await _service(runtime).unblock(user_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"user {user_id!r} is not blocked")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# -- the default ----------------------------------------------------------------------------


@router.get("/default", response_model=QuotaOut)
async def get_default(runtime: RuntimeDep) -> QuotaOut:
    book = _service(runtime).book
    if not book.default_limits:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no default quota")
    return _default_view(book)


@router.put("/default", response_model=QuotaOut)
async def put_default(runtime: RuntimeDep, body: LimitIn | LimitsIn) -> QuotaOut:
    service = _service(runtime)
    await service.replace(None, _limits(body))
    return _default_view(service.book)


@router.delete("/default", status_code=status.HTTP_204_NO_CONTENT)
async def delete_default(runtime: RuntimeDep) -> Response:
    if not await _service(runtime).replace(None, []):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no default quota")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# -- one user -------------------------------------------------------------------------------


@router.get("/users/{user_id:path}", response_model=QuotaOut)
async def get_user(runtime: RuntimeDep, user_id: CanonicalUser) -> QuotaOut:
    service = _service(runtime)
    await service.current([user_subject(user_id)])
    view = _view(service.book, user_subject(user_id))
    if view.source == "none":
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no quota applies to user {user_id!r}")
    return view


@router.put("/users/{user_id:path}", response_model=QuotaOut)
async def put_user(
    runtime: RuntimeDep, body: LimitIn | LimitsIn, user_id: CanonicalUser
) -> QuotaOut:
    service = _service(runtime)
    subject = user_subject(user_id)
    await service.replace(subject, _limits(body))
    await service.current([subject])
    return _view(service.book, subject)


@router.delete("/users/{user_id:path}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_user(runtime: RuntimeDep, user_id: CanonicalUser) -> Response:
    if not await _service(runtime).replace(user_subject(user_id), []):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"user {user_id!r} has no quota of its own")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# -- one tag --------------------------------------------------------------------------------


@router.get("/tags/{key}/{value:path}", response_model=QuotaOut)
async def get_tag(runtime: RuntimeDep, key: str, value: str) -> QuotaOut:
    service = _service(runtime)
    subject = _tag(runtime, key, value)
    await service.current([subject])
    view = _view(service.book, subject)
    if view.source == "none":
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no quota for {key}={value}")
    return view


@router.put("/tags/{key}/{value:path}", response_model=QuotaOut)
async def put_tag(runtime: RuntimeDep, key: str, value: str, body: LimitIn | LimitsIn) -> QuotaOut:
    service = _service(runtime)
    subject = _tag(runtime, key, value)
    await service.replace(subject, _limits(body))
    await service.current([subject])
    return _view(service.book, subject)


@router.delete("/tags/{key}/{value:path}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_tag(runtime: RuntimeDep, key: str, value: str) -> Response:
    if not await _service(runtime).replace(_tag(runtime, key, value), []):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no quota for {key}={value}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
