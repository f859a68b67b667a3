"""`tokentill demo`: a newcomer sees real data flowing, and the demo stops cleanly."""

from __future__ import annotations

import os
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
            "--no-showcase",  # the live traffic alone (the showcase has its own test)
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


def test_the_demo_shows_every_feature_within_ninety_seconds(tmp_path: Path) -> None:
    """A newcomer's first look, in a real browser: `tokentill demo` as `make demo` starts
    it, and within 90 s the overview's charts have bars on 20+ days, a quota is near and
    one over its limit, an abuse flag carries its evidence, a conversation's cost grows
    along its chain, and the unpriced model is called out."""
    from playwright.sync_api import sync_playwright

    from tests.test_dashboard import CHROMIUM, CHROMIUM_FLAGS

    db = tmp_path / "demo.duckdb"
    port, fake_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokentill", "demo", "--db", str(db), "--port", str(port),
         "--fake-port", str(fake_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:

        def ready() -> bool:
            try:
                flags = httpx.get(base + "/api/alerts", params={"kind": "abuse"}, timeout=5)
                quotas = httpx.get(base + "/api/quotas", timeout=5)
            except httpx.TransportError:
                return False
            return flags.status_code == 200 and bool(flags.json()) and len(quotas.json()) >= 3

        while not ready():
            assert time.monotonic() - started < 90, "the demo did not show everything in 90 s"
            time.sleep(1)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))

            def open_(path: str) -> None:
                page.goto(base + path)
                page.wait_for_selector("body[data-ready]", state="attached", timeout=30_000)

            open_("/dashboard/")
            for chart_id in ("spend-by-model", "token-mix", "requests-errors"):
                days = page.evaluate(
                    """id => new Set(Array.from(
                           document.querySelectorAll(`#${id} .barlayer .point path`))
                         .map(p => p.getBoundingClientRect())
                         .filter(r => r.width >= 2 && r.height >= 1)
                         .map(r => Math.round(r.left + r.width / 2))).size""",
                    chart_id,
                )
                assert days >= 20, (chart_id, days)
            unpriced = page.inner_text("body")
            assert "had no price in force" in unpriced
            open_("/dashboard/models")
            assert "acme-house-model" in page.inner_text("body")

            # One quota over its limit and one near it. The demo's live traffic keeps
            # moving them, so the page is read again (up to 30 s) until it shows both.
            deadline = time.monotonic() + 30
            while True:
                open_("/dashboard/alerts")
                page.wait_for_selector("#quotas-table", timeout=30_000)
                shown = {
                    state: page.query_selector(f"#quotas-table tr.{state}") is not None
                    for state in ("over", "near")
                }
                if all(shown.values()) or time.monotonic() > deadline:
                    break
                time.sleep(1)
            quotas_now = httpx.get(base + "/api/quotas", timeout=5).json()
            assert all(shown.values()), (shown, quotas_now)
            page.wait_for_selector("#alerts-table tbody tr", timeout=30_000)
            flags = page.inner_text("#alerts-table")
            assert "user-new-suspicious" in flags and "requests" in flags  # the evidence

            conversations = httpx.get(base + "/api/conversations", timeout=30).json()
            chain = next(c for c in conversations["conversations"] if c["responses"] >= 3)
            open_(f"/dashboard/conversations/{chain['root_id']}")
            so_far = page.evaluate(
                """() => Array.from(document.getElementById('conversation-growth').data[1].y)"""
            )
            assert len(so_far) >= 3 and so_far == sorted(so_far) and so_far[-1] > so_far[0]
            shot = os.environ.get("TOKENTILL_SCREENSHOTS")
            if shot:
                open_("/dashboard/")
                page.screenshot(path=str(Path(shot) / "dashboard-overview.png"), full_page=True)
            assert errors == []
            browser.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, output
    # One status line says what happens; no line per request.
    assert "HTTP Request:" not in output and "POST /v1/responses" not in output
    assert "tokentill demo: live traffic" in output or "tokentill demo:" in output
