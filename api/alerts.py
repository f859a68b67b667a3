"""Alerts (quota thresholds, abuse flags): list them, filtered, and acknowledge one."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel

from tokentill.api.deps import RuntimeDep
from tokentill.api.params import IsoTime
from tokentill.warehouse.alerts import (
    SEVERITIES,
    Severity,
    acknowledge,
    alert_by_id,
    list_alerts,
)

router = APIRouter(
    prefix="/alerts", tags=["alerts"], responses={404: {"description": "No such alert"}}
)


class AlertOut(BaseModel):
    alert_id: int
    kind: str
    rule: str
    severity: Severity
    message: str
    user_id: str | None
    subject: str | None
    window_start: datetime | None
    window_end: datetime | None
    evidence: dict[str, Any]
    created_at: datetime
    acknowledged_at: datetime | None
    acknowledged_by: str | None


class AckIn(BaseModel):
    by: str | None = None


@router.get("", response_model=list[AlertOut])
async def get_alerts(
    runtime: RuntimeDep,
    user_id: str | None = None,
    kind: Literal["quota_threshold", "abuse", "quota_store", "billing_sink"] | None = None,
    severity: Annotated[list[Severity] | None, Query()] = None,
    min_severity: Severity | None = None,
    since: IsoTime | None = None,
    until: IsoTime | None = None,
    acknowledged: bool | None = None,
    limit: int = Query(100, ge=1, le=1000),
) -> list[AlertOut]:
    wanted = list(severity or [])
    if min_severity is not None:
        floor = SEVERITIES.index(min_severity)
        wanted = [s for s in (wanted or SEVERITIES) if SEVERITIES.index(s) >= floor]
        if not wanted:
            return []

    def read() -> list[AlertOut]:
        conn = runtime.connect()
        try:
            frame = list_alerts(
                conn,
                user_id=user_id,
                kind=kind,
                severities=wanted,
                since=since,
                until=until,
                acknowledged=acknowledged,
                limit=limit,
            )
        finally:
            conn.close()
        rows = frame.drop("dedupe_key").to_dicts()
        for row in rows:
            row["evidence"] = json.loads(row["evidence"]) if row["evidence"] else {}
        return [AlertOut.model_validate(row) for row in rows]

    return await asyncio.to_thread(read)


@router.post("/{alert_id}/acknowledge", response_model=AlertOut)
async def ack(runtime: RuntimeDep, alert_id: int, body: AckIn | None = None) -> AlertOut:
    def write() -> AlertOut | None:
        conn = runtime.connect()
        try:
            if not acknowledge(conn, alert_id, body.by if body else None):
                return None
            row = alert_by_id(conn, alert_id)
        finally:
            conn.close()
        return None if row is None else AlertOut.model_validate(row)

    found = await asyncio.to_thread(write)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no alert {alert_id}")
    return found
