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
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import polars as pl

from tests.conftest import Running

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
    running.flush()
    today = datetime.now(UTC).date()
    window = {"start": str(today - timedelta(days=1)), "end": str(today + timedelta(days=1))}

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
    assert set(unpriced["x_Model"]) == {"tt-unlisted-model"}
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
    assert exported == expected
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
