"""The FOCUS export of real traffic, checked by the FinOps Foundation's own validator
(focus-validator 1.0.0, in an environment of its own: tests/focus_validator), and by the
costs report: `BilledCost` adds up to it for every day, user and model, to the
micro-dollar and below."""

from __future__ import annotations

import io
import itertools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import polars as pl

from tests.conftest import Running
from tests.traffic import demo_traffic
from tokentill.warehouse.catalog import EPOCH, PriceRow
from tokentill.warehouse.db import open_warehouse
from tokentill.warehouse.focus import focus_grain, focus_rows
from tokentill.warehouse.prices import insert_rows, price_table

ROOT = Path(__file__).resolve().parent.parent
VALIDATOR = ROOT / "tests" / "focus_validator"
USERS = ("ana", "bo", "=cmd")  # a user id a spreadsheet would run as a formula, defused
MODELS = ("gpt-4o", "gpt-4o-mini", "tt-unlisted-model")  # the last has no price
TEAMS = ("search", "ads")


def _uv() -> str:
    found = shutil.which("uv") or str(ROOT / ".tools" / "bin" / "uv")
    assert Path(found).exists(), "uv is bootstrapped by make"
    return found


def _validate(csv: Path) -> subprocess.CompletedProcess[str]:
    """focus-validator on `csv`, as FOCUS 1.0. It reads its currency list by a path relative
    to the directory holding its package: it runs from there."""
    run = [_uv(), "run", "--project", str(VALIDATOR), "--frozen", "--quiet"]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_PROJECT")}
    # Its environment lives beside uv's own (.tools, ignored), out of the source tree.
    env["UV_PROJECT_ENVIRONMENT"] = str(ROOT / ".tools" / "focus-validator")
    where = subprocess.run(
        [
            *run,
            "python",
            "-c",
            "import focus_validator as v, os; print(os.path.dirname(os.path.dirname(v.__file__)))",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=True,
    ).stdout.strip()
    return subprocess.run(
        [*run, "focus-validator", "--data-file", str(csv), "--validate-version", "1.0"],
        capture_output=True,
        text=True,
        env=env,
        cwd=where,
        timeout=600,
    )


def test_the_focus_export_passes_the_validator_and_adds_up_to_the_costs_report(
    make_tokentill: Callable[..., Running], tmp_path: Path
) -> None:
    running = make_tokentill()
    client = running.client()
    for i, (user, model, team) in enumerate(itertools.product(USERS, MODELS, TEAMS)):
        client.responses.create(
            model=model, input=f"question {i}", user=user, metadata={"team": team}
        )
    demo_traffic(running.url, 80, seed=5)  # and the demo's: every kind, tier and scenario
    today = datetime.now(UTC).date()
    window = {"start": str(today - timedelta(days=1)), "end": str(today + timedelta(days=1))}

    def pending() -> int:  # background responses still running upstream
        running.flush()
        ran = httpx.post(f"{running.url}/api/jobs/rollup/run", timeout=60)
        assert ran.status_code == 200, ran.text
        by_status = httpx.get(
            f"{running.url}/api/costs", params={**window, "group_by": ["status"]}, timeout=60
        ).json()
        waiting = ("queued", "in_progress")
        return sum(r["requests"] for r in by_status["rows"] if r["group"]["status"] in waiting)

    deadline = time.monotonic() + 60
    while pending() and time.monotonic() < deadline:
        time.sleep(0.5)

    answer = httpx.get(f"{running.url}/api/exports/focus", params=window, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/csv")
    assert "attachment" in answer.headers["content-disposition"]
    csv = tmp_path / "focus.csv"
    csv.write_bytes(answer.content)
    checked = _validate(csv)
    assert checked.returncode == 0 and "Validation succeeded" in checked.stdout, (
        checked.stdout[-3000:] + checked.stderr[-2000:]
    )

    rows = pl.read_csv(io.BytesIO(answer.content), infer_schema=False)
    # Unpriced usage: its quantities, zero costs, flagged, and counted in a header.
    unpriced = rows.filter(pl.col("x_Unpriced") == "true")
    assert unpriced.height == int(answer.headers["x-tokentill-unpriced-rows"]) > 0
    # The model no price list knows, and tiers a model has no price for (the demo asks
    # gpt-4o for flex, which OpenAI does not list).
    default = unpriced.filter(pl.col("x_ServiceTier") == "default")
    assert set(default["x_Model"]) == {"tt-unlisted-model"}
    assert set(unpriced["x_ServiceTier"]) <= {"default", "flex", "priority"}
    assert set(unpriced["BilledCost"].map_elements(Decimal, return_dtype=pl.Object)) == {0}
    assert {"input", "output"} <= set(rows["x_Charge"])
    assert "'=cmd" in set(rows["x_EndUser"])  # defused, as the finance export does

    # BilledCost adds up to the costs report for every day, user and model.
    costs = httpx.get(
        f"{running.url}/api/costs",
        params={**window, "group_by": ["user", "model"], "bucket": "day"},
        timeout=60,
    ).json()
    expected: dict[tuple[str, str, str], Decimal] = {}
    for row in costs["rows"]:
        user = row["group"]["user"]
        key = (row["bucket"][:10], "'" + user if user.startswith("=") else user)
        expected[(*key, row["group"]["model"])] = Decimal(row["priced_cost_usd"])
    exported: dict[tuple[str, str, str], Decimal] = {}
    for row in rows.iter_rows(named=True):
        key = (row["ChargePeriodStart"][:10], row["x_EndUser"], row["x_Model"])
        exported[key] = exported.get(key, Decimal(0)) + Decimal(row["BilledCost"])
    # (Responses with no usage at all, failed ones, are in the report at zero, not exported.)
    assert exported == {k: v for k, v in expected.items() if v or k in exported}
    assert sum(expected.values()) > 0

    # The command line asks the running server, which holds the file, for the same rows.
    port = running.url.rsplit(":", 1)[1]
    out = tmp_path / "cli.csv"
    done = _export(
        running.settings.db,
        *("--host", "127.0.0.1", "--port", port, "--out", str(out)),
        *("--start", window["start"], "--end", window["end"]),
    )
    assert done.returncode == 0, done.stderr
    assert f"({unpriced.height} unpriced rows)" in done.stdout
    assert out.read_bytes() == answer.content

    parquet = httpx.get(
        f"{running.url}/api/exports/focus", params={**window, "format": "parquet"}, timeout=60
    )
    assert parquet.status_code == 200
    frame = pl.read_parquet(io.BytesIO(parquet.content))
    assert isinstance(frame.schema["BilledCost"], pl.Decimal)  # never a float
    assert frame.height == rows.height
    assert sum(frame["BilledCost"].to_list(), Decimal(0)) == sum(
        (Decimal(v) for v in rows["BilledCost"]), Decimal(0)
    )


def _export(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`tokentill export focus --db <db> <args>`, as a user runs it."""
    command = [sys.executable, "-m", "tokentill", "export", "focus", "--db", str(db), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_the_command_line_exports_a_warehouse_it_can_open(tmp_path: Path) -> None:
    """No server holding the file: read here (an empty warehouse: the header alone)."""
    out = tmp_path / "empty.parquet"
    db = tmp_path / "w.duckdb"
    done = _export(
        db, "--format", "parquet", "--start", "2026-05-01", "--end", "2026-06-01", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    frame = pl.read_parquet(out)
    assert frame.height == 0 and "BilledCost" in frame.columns and "x_EndUser" in frame.columns
    backwards = _export(db, "--start", "2026-06-01", "--end", "2026-05-01", "--out", str(out))
    assert backwards.returncode == 2 and "must be before --end" in backwards.stderr


def test_a_focus_export_refuses_a_backwards_range(make_tokentill: Callable[..., Any]) -> None:
    running = make_tokentill()
    answer = httpx.get(
        f"{running.url}/api/exports/focus",
        params={"start": "2026-05-02", "end": "2026-05-01"},
        timeout=30,
    )
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["query", "start"]


def test_a_closed_months_export_never_changes_and_late_changes_come_as_corrections(
    make_tokentill: Callable[..., Running], tmp_path: Path
) -> None:
    """Last month closed: its export is the same bytes after a late event and a price
    correction; those come out in this month's export as ChargeClass Correction rows for
    the days they correct, billed in this month, adding up to the change, and the
    validator accepts them."""
    running = make_tokentill(rollup_interval=0.5)
    client = running.client()
    today = datetime.now(UTC).date()
    this_month = today.replace(day=1)
    last_month = (this_month - timedelta(days=1)).replace(day=1)
    day = last_month + timedelta(days=9)
    noon = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)

    def respond(user: str, model: str, at: datetime) -> None:
        client.responses.create(
            model=model,
            input="x" * 40,
            user=user,
            metadata={"team": "search"},
            extra_headers={"x-fake-created-at": str(int(at.timestamp()))},
        )

    for i in range(6):
        respond(("ana", "bo")[i % 2], ("gpt-4o", "gpt-4o-mini")[i % 2], noon)
    running.flush()

    def export(start: date, end: date) -> bytes:
        answer = httpx.get(
            running.url + "/api/exports/focus",
            params={"start": str(start), "end": str(end)},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        return answer.content

    def costs(start: date, end: date) -> Decimal:
        ran = httpx.post(running.url + "/api/jobs/rollup/run", timeout=60)
        assert ran.status_code == 200 and ran.json()["error"] is None, ran.text
        report = httpx.get(
            running.url + "/api/costs",
            params={"start": str(start), "end": str(end), "group_by": ["user"]},
            timeout=60,
        ).json()
        return Decimal(report["totals"]["priced_cost_usd"])

    closed = httpx.post(
        running.url + f"/api/periods/{last_month:%Y-%m}/close",
        json={"closed_by": "fin"},
        timeout=60,
    )
    assert closed.status_code == 201, closed.text
    frozen = export(last_month, this_month)
    frozen_total = costs(last_month, this_month)

    # A late event on the closed day, and a price with a past effective_from for gpt-4o.
    respond("ana", "gpt-4o", noon + timedelta(hours=1))
    added = httpx.post(
        running.url + "/api/prices",
        json={
            "author": "finance.test",
            "prices": [
                {
                    "model": "gpt-4o",
                    "input_per_mtok": "3",
                    "output_per_mtok": "12",
                    "effective_from": last_month.isoformat() + "T00:00:00Z",
                }
            ],
        },
        timeout=30,
    )
    assert added.status_code == 201, added.text
    running.flush()
    change = costs(last_month, this_month) - frozen_total
    assert change > 0

    def corrections() -> pl.DataFrame:
        rows = pl.read_csv(io.BytesIO(export(this_month, today + timedelta(days=1))))
        return rows.filter(pl.col("ChargeClass") == "Correction")

    found = pl.DataFrame()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = corrections()
        total = sum((Decimal(str(v)) for v in found["BilledCost"]), Decimal(0))
        if found.height and total == change:
            break
        time.sleep(0.5)
    assert sum(Decimal(str(v)) for v in found["BilledCost"]) == change
    assert set(found["ChargePeriodStart"].str.slice(0, 10)) == {str(day)}
    assert set(found["BillingPeriodStart"].str.slice(0, 10)) == {str(this_month)}
    assert set(found["x_Charge"]) >= {"input", "output"}
    # One key (ana, gpt-4o, that day): the late event, and the repricing of ana's earlier
    # gpt-4o responses; one request more on each of its charges.
    assert found["x_Requests"].to_list() == [1] * found.height
    assert set(found["x_EndUser"]) == {"ana"} and set(found["x_Model"]) == {"gpt-4o-2024-08-06"}
    # A re-export of the closed month is the same bytes; posting again posts nothing.
    assert export(last_month, this_month) == frozen
    time.sleep(2)
    assert corrections().height == found.height

    path = tmp_path / "corrections.csv"
    path.write_bytes(export(this_month, today + timedelta(days=1)))
    validated = _validate(path)
    assert validated.returncode == 0 and "Validation succeeded" in validated.stdout, (
        validated.stdout + validated.stderr
    )

    # A month closed before closed_focus existed (as after an upgrade): the next posting
    # copies it as the events price it now, and posts nothing for it.
    runtime = running.app.runtime
    assert runtime is not None
    conn = runtime.connect()
    try:
        # At once: the posting runs every half second, and must never see half of it.
        conn.execute("BEGIN TRANSACTION")
        for table in ("closed_focus", "focus_copied", "focus_marks", "focus_adjustments"):
            conn.execute(f"DELETE FROM {table}")
        conn.execute("COMMIT")
    finally:
        conn.close()

    def copied() -> int:
        conn = runtime.connect()
        try:
            row = conn.execute("SELECT count(*) FROM focus_copied").fetchone()
            return int(row[0]) if row else 0
        finally:
            conn.close()

    deadline = time.monotonic() + 30
    while copied() == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert copied() == 1
    time.sleep(1.5)  # a few more postings
    assert corrections().height == 0
    copy = pl.read_csv(io.BytesIO(export(last_month, this_month)))
    assert sum(Decimal(str(v)) for v in copy["BilledCost"]) == costs(last_month, this_month)


def test_unpriced_usage_never_zeroes_the_priced_usage_beside_it(tmp_path: Path) -> None:
    """Two responses of one day, user, model and tier: one priced, one that reported no
    usage (unpriced). They are two rows of the grain: the priced one keeps its cost."""
    conn = open_warehouse(tmp_path / "prices.duckdb")
    rates = {"input_per_mtok": Decimal("2.5"), "output_per_mtok": Decimal("10")}
    insert_rows(conn, [PriceRow("gpt-4o", "default", EPOCH, None, rates, "t")])
    prices = price_table(conn)
    conn.close()
    at = datetime(2026, 3, 10, 9, tzinfo=UTC)
    events = pl.DataFrame(
        [
            {"user_id": "ana", "model": "gpt-4o", "service_tier": "default", "created_at": at,
             "metadata": None, "input_tokens": 1_000_000, "output_tokens": 0,
             "usage_unreported": False},
            {"user_id": "ana", "model": "gpt-4o", "service_tier": "default", "created_at": at,
             "metadata": None, "input_tokens": 500, "output_tokens": 0,
             "usage_unreported": True},
        ],
        schema_overrides={"created_at": pl.Datetime("us", "UTC"), "metadata": pl.String},
    )  # fmt: skip
    grain = focus_grain(events, prices, image_model="gpt-image-1", tag_keys=("team",))
    rows = {r["unpriced"]: r for r in grain.filter(pl.col("charge") == "input").to_dicts()}
    assert rows[False]["cost_pico"] == Decimal(2_500_000_000_000)
    assert (rows[True]["cost_pico"], rows[True]["quantity"]) == (0, 500)
    export = focus_rows(grain, "openai")
    assert export.unpriced_rows == 1
    assert sum(export.rows["BilledCost"]) == Decimal("2.5")
