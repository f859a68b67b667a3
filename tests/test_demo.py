"""`tokentill demo`: a newcomer sees real data flowing, and the demo stops cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import httpx

from tests.servers import free_port


def test_demo_fills_the_warehouse_with_varied_traffic(tmp_path: Path) -> None:
    db = tmp_path / "demo.duckdb"
    port, fake_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokentill",
            "demo",
            "--db",
            str(db),
            "--port",
            str(port),
            "--fake-port",
            str(fake_port),
            "--rate",
            "50",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        captured = 0.0
        while time.monotonic() < deadline and captured < 150:
            time.sleep(0.5)
            try:
                metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except httpx.TransportError:
                continue
            captured = sum(
                float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith("tokentill_events_captured_total{")
            )
        assert captured >= 150, "the demo did not get traffic flowing within a minute"
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, output

    with duckdb.connect(str(db), read_only=True) as conn:
        users, models, statuses, endpoints, tagged, streamed = conn.execute(
            """SELECT count(DISTINCT user_id), count(DISTINCT model), count(DISTINCT status),
                      count(DISTINCT endpoint), count(*) FILTER (metadata->>'team' IS NOT NULL),
                      count(*) FILTER (streamed)
               FROM usage_events"""
        ).fetchone()  # type: ignore[misc]
    assert users >= 10
    assert models >= 5
    assert statuses >= 3  # completed, incomplete, error at the least
    assert endpoints == 2
    assert tagged > 0 and streamed > 0
