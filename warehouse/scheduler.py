"""The in-server schedule: APScheduler 3 runs the rollup job every `rollup_interval`
seconds (and the abuse job every `abuse_interval`), never two runs of one job at once
(and a run the server was too busy to start is coalesced)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from tokentill.warehouse.jobs import RollupJob


def start_scheduler(
    rollup: RollupJob,
    interval: float,
    others: dict[str, tuple[Callable[[], Any], float]] | None = None,
    then: Callable[[], object] | None = None,
    compaction: tuple[int, float] | None = None,
    leads: Callable[[], bool] | None = None,
) -> BackgroundScheduler:
    """`others`: more jobs, each (run, every seconds). `then` runs after each rollup run
    (posting closed periods' adjustments). `compaction` (max parts, seconds): after each
    run, fold the days with more parts than that, and the days ended that long ago (off
    the request path, and never beside a run: same thread, same lock). `leads`: asked
    before each run, which is skipped while it says no (a lake's standby worker)."""
    scheduler = BackgroundScheduler(
        timezone=UTC,
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
    )

    def leading(run: Callable[[], Any]) -> Callable[[], None]:
        def gated() -> None:
            if leads is None or leads():
                run()

        return gated

    def cycle() -> None:
        rollup.run()
        if compaction is not None:
            max_parts, after = compaction
            rollup.compact(
                max_parts=max_parts, older_than=datetime.now(UTC) - timedelta(seconds=after)
            )
        if then is not None:
            then()

    scheduler.add_job(
        leading(cycle),
        IntervalTrigger(seconds=interval, timezone=UTC),
        id="rollup",
        name="rollup",
        next_run_time=datetime.now(UTC) + timedelta(seconds=min(2.0, interval)),
    )
    for name, (run, every) in (others or {}).items():
        scheduler.add_job(
            leading(run),
            IntervalTrigger(seconds=every, timezone=UTC),
            id=name,
            name=name,
            next_run_time=datetime.now(UTC) + timedelta(seconds=min(5.0, every)),
        )
    scheduler.start()
    return scheduler


def stop_scheduler(scheduler: BackgroundScheduler, rollup: RollupJob) -> bool:
    """Stop: a run in progress ends after its current chunk of days, whether the schedule
    or the API started it. False when one is still running after 5 s."""
    rollup.cancel()
    scheduler.shutdown(wait=True)
    return rollup.stop(timeout=5.0)
