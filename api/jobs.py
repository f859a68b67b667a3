"""Jobs: their recent runs (freshness), and running one now."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Literal

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from tokentill.api.deps import RuntimeDep
from tokentill.api.runtime import AdminRuntime
from tokentill.warehouse.billing_usage import sink_states
from tokentill.warehouse.jobs import freshness as read_freshness
from tokentill.warehouse.jobs import last_runs

router = APIRouter(prefix="/jobs", tags=["jobs"])


class JobRun(BaseModel):
    run_id: int
    job: str
    mode: str
    started_at: datetime
    finished_at: datetime | None
    rows_in: int | None
    rows_out: int | None
    watermark: int | None
    price_mark: int | None
    error: str | None


class RunResultOut(BaseModel):
    job: str
    mode: str
    rows_in: int
    rows_out: int
    days: int
    watermark: int
    price_mark: int
    error: str | None
    seconds: float


@router.get("", response_model=list[JobRun])
async def list_runs(runtime: RuntimeDep, limit: int = Query(20, ge=1, le=1000)) -> list[JobRun]:
    def read() -> list[JobRun]:
        conn = runtime.connect()
        try:
            frame = last_runs(conn, limit)
        finally:
            conn.close()
        return [JobRun.model_validate(row) for row in frame.to_dicts()]

    return await asyncio.to_thread(read)


class AbuseRunOut(BaseModel):
    job: str
    flags: int = Field(description="Flags this run found, all stored when it answers.")
    new: int = Field(description="Of them, flags not raised before in their window.")
    repeats: int = Field(description="Of them, flags already raised in their window.")
    error: str | None
    seconds: float


def _runs_jobs(runtime: AdminRuntime) -> None:
    """On a lake, an api instance runs no job: the active worker does, on its schedule
    (one job at a time in the cluster)."""
    if not runtime.settings.works:
        raise HTTPException(
            409,
            f"this tokentill instance plays role {runtime.settings.role!r}: jobs run on "
            "the active worker, on its schedule",
        )


@router.post(
    "/abuse/run",
    response_model=AbuseRunOut,
    responses={409: {"description": "An api instance of a cluster: the worker runs jobs"}},
)
async def run_abuse(runtime: RuntimeDep) -> AbuseRunOut:
    """Score users now (new flags are stored as alerts, and sent to the webhook)."""
    _runs_jobs(runtime)
    clock = time.perf_counter()
    run = await asyncio.to_thread(runtime.abuse.run)
    return AbuseRunOut(
        job="abuse",
        flags=len(run.flags),
        new=len(run.new),
        repeats=len(run.flags) - len(run.new),
        error=run.error,
        seconds=round(time.perf_counter() - clock, 3),
    )


@router.post(
    "/{job}/run",
    response_model=RunResultOut,
    responses={409: {"description": "An api instance of a cluster: the worker runs jobs"}},
)
async def run_job(runtime: RuntimeDep, job: Literal["rollup"], full: bool = False) -> RunResultOut:
    _runs_jobs(runtime)
    result = await asyncio.to_thread(runtime.rollup.run, full=full)
    return RunResultOut(
        job=result.job,
        mode=result.mode,
        rows_in=result.rows_in,
        rows_out=result.rows_out,
        days=result.days,
        watermark=result.watermark,
        price_mark=result.price_mark,
        error=result.error,
        seconds=round(result.seconds, 3),
    )


class SinkFreshness(BaseModel):
    name: str = Field(description="The billing sink (TOKENTILL_BILLING_SINKS).")
    delivered: int = Field(description="Events its receiver accepted (or already held).")
    skipped: int = Field(description="Settled responses not its own (no subject, filtered).")
    rejected: int = Field(description="Events its receiver refused, set aside.")
    events_behind: int = Field(description="Events committed after its mark.")
    lag_seconds: float = Field(description="Age of the oldest of them (0: caught up).")
    caught_up_at: datetime | None = Field(description="The last run that reached the newest.")
    last_error: str | None = Field(description="Why its last run stopped short, if it did.")


class Freshness(BaseModel):
    last_event_at: datetime | None = Field(description="Newest usage event in the warehouse.")
    last_rollup_at: datetime | None = Field(description="End of the last successful rollup.")
    last_rollup_error: str | None = Field(description="The newest run's error, if it failed.")
    events_not_rolled_up: int = Field(description="Events written since the last rollup.")
    parts_awaiting_compaction: int = Field(
        description="Partial sums appended by incremental runs, not yet folded (a day's "
        "are folded once it has more than TOKENTILL_ROLLUP_COMPACT_PARTS, or has ended)."
    )
    journal_backlog: int = Field(description="Events journaled, not yet in DuckDB.")
    billing_sinks: list[SinkFreshness] = Field(
        description="Each billing sink that has run: how far behind the warehouse it is."
    )


@router.get("/freshness", response_model=Freshness, summary="How fresh the reports are")
async def freshness(runtime: RuntimeDep) -> Freshness:
    def read() -> Freshness:
        conn = runtime.connect()
        try:
            found = read_freshness(conn)
            sinks = sink_states(conn)
        finally:
            conn.close()
        now = datetime.now(UTC)
        return Freshness(
            last_event_at=found.last_event_at,
            last_rollup_at=found.last_rollup_at,
            last_rollup_error=found.last_rollup_error,
            events_not_rolled_up=found.events_not_rolled_up,
            parts_awaiting_compaction=found.parts_awaiting_compaction,
            journal_backlog=runtime.writer.backlog,
            billing_sinks=[
                SinkFreshness(
                    name=mark.sink,
                    delivered=mark.delivered,
                    skipped=mark.skipped,
                    rejected=mark.rejected,
                    events_behind=late.events,
                    lag_seconds=round(late.lag_seconds(now), 1),
                    caught_up_at=mark.caught_up_at,
                    last_error=mark.last_error,
                )
                for mark, late in sinks
            ],
        )

    return await asyncio.to_thread(read)
