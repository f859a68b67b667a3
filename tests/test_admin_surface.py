"""The admin surfaces under attack, through real sockets: spreadsheet formulas in
exports, DNS rebinding, cross-site writes, CSRF on cookie sessions, redirects built from
Host, token guessing, file modes, and slow or too many connections."""

from __future__ import annotations

import io
import os
import socket
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import polars as pl

from tests.conftest import Running
from tests.servers import free_port
from tokentill.api import session

TOKEN = "a-long-admin-token-for-these-tests"


def test_csv_exports_defuse_spreadsheet_formulas(tokentill: Running) -> None:
    evil = '=HYPERLINK("http://evil","x")'
    client = tokentill.client()
    client.responses.create(model="gpt-4o-mini", input="x", user=evil)
    client.responses.create(model="gpt-4o-mini", input="x", user="@sum(a1)")
    tokentill.flush()
    assert httpx.post(tokentill.url + "/api/jobs/rollup/run", timeout=60).status_code == 200
    month = datetime.now(UTC).date().replace(day=1)
    params = {"start": str(month), "end": str((month + timedelta(days=32)).replace(day=1))}
    csv = httpx.get(tokentill.url + "/api/reports/finance", params={**params, "format": "csv"})
    table = pl.read_csv(io.BytesIO(csv.content), infer_schema=False)
    keys = set(table.filter(pl.col("section") == "user")["key"].to_list())
    assert keys == {"'" + evil, "'@sum(a1)"}
    # Money stays exact and numeric, and Parquet keeps the values as they are.
    assert all(not v.startswith("'") for v in table["cost_usd"].to_list())
    parquet = httpx.get(
        tokentill.url + "/api/reports/finance", params={**params, "format": "parquet"}
    )
    frame = pl.read_parquet(io.BytesIO(parquet.content))
    assert set(frame.filter(pl.col("section") == "user")["key"].to_list()) == {evil, "@sum(a1)"}


def test_a_foreign_host_is_refused(tokentill: Running) -> None:
    port = tokentill.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
        answer = httpx.get(tokentill.url + "/api/costs", headers={"Host": host})
        assert answer.status_code == 400 and "Host" in answer.json()["detail"], host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
        assert httpx.get(tokentill.url + "/api/costs", headers={"Host": host}).status_code == 200
    # The proxy answers under any name (API clients use service names).
    models = httpx.get(
        tokentill.url + "/v1/models",
        headers={"Host": "openai-gateway.internal", "Authorization": "Bearer sk-test"},
    )
    assert models.status_code == 200


def test_cross_site_writes_are_refused(tokentill: Running) -> None:
    url = tokentill.url + "/api/jobs/rollup/run"
    port = tokentill.url.rsplit(":", 1)[1]
    other_port = f"http://127.0.0.1:{int(port) + 1}"
    for headers in (
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "http://evil.example"},
        {"Origin": other_port},  # another port of the same host is another origin
        {"Origin": "null", "Content-Type": "text/plain"},
    ):
        answer = httpx.post(url, headers=headers, content=b"x")
        assert answer.status_code == 403, headers
        assert "Cross-site" in answer.json()["detail"]
    # Same origin, or no browser at all: judged by the token (none configured: loopback).
    assert httpx.post(url, headers={"Origin": f"http://127.0.0.1:{port}"}).status_code == 200
    assert httpx.post(url, headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200
    assert httpx.post(url).status_code == 200


def test_redirects_never_name_the_requests_host(make_tokentill: Any) -> None:
    running: Running = make_tokentill(allowed_hosts=("*",))
    for path in ("/dashboard", "/api/costs/"):
        answer = httpx.get(running.url + path, headers={"Host": "evil.example"})
        assert answer.is_redirect, (path, answer.status_code)
        location = answer.headers["location"]
        assert location.startswith("/") and "evil" not in location, location


def _log_in(running: Running) -> str:
    answer = httpx.post(
        running.url + "/dashboard/login", data={"token": TOKEN, "next": "/dashboard/"}
    )
    assert answer.status_code == 303
    return answer.cookies[session.COOKIE]


def test_cookie_sessions_need_a_csrf_token_to_change_anything(make_tokentill: Any) -> None:
    running: Running = make_tokentill(admin_token=TOKEN)
    cookie = _log_in(running)
    cookies = {session.COOKIE: cookie}
    url = running.url + "/api/jobs/rollup/run"
    assert httpx.get(running.url + "/api/costs", cookies=cookies).status_code == 200
    refused = httpx.post(url, cookies=cookies)
    assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
    wrong = httpx.post(url, cookies=cookies, headers={"X-CSRF-Token": "0" * 64})
    assert wrong.status_code == 403
    csrf = session.csrf_token(cookie, TOKEN)
    assert httpx.post(url, cookies=cookies, headers={"X-CSRF-Token": csrf}).status_code == 200
    # The bearer token needs none; /api/docs hands the browser its token.
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.post(url, headers=bearer).status_code == 200
    docs = httpx.get(running.url + "/api/docs", cookies=cookies)
    assert csrf in docs.text and "requestInterceptor" in docs.text


def test_guessing_the_token_is_locked_out_with_a_metric_and_an_alert(make_tokentill: Any) -> None:
    running: Running = make_tokentill(admin_token=TOKEN, auth_failure_limit=5)
    # The guesser comes from 127.0.0.2 (loopback too): the operator at 127.0.0.1 is not
    # locked out with it.
    guesser = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    url = running.url + "/api/costs"
    for guess in range(5):
        answer = guesser.get(url, headers={"Authorization": f"Bearer wrong-{guess}"})
        assert answer.status_code == 401
    locked = guesser.get(url, headers=bearer)  # even the right token, from that address
    assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0
    login = guesser.post(running.url + "/dashboard/login", data={"token": TOKEN})
    assert login.status_code == 429
    assert httpx.get(url, headers=bearer).status_code == 200  # another address is fine
    metrics = httpx.get(running.url + "/metrics").text
    assert "tokentill_auth_failures_total 5.0" in metrics
    assert "tokentill_auth_lockouts_total 1.0" in metrics

    def alerted() -> bool:
        alerts = httpx.get(running.url + "/api/alerts", headers=bearer).json()
        rows = alerts["alerts"] if isinstance(alerts, dict) else alerts
        return any(a.get("rule") == "auth_failures" for a in rows)

    running.wait_for(alerted)


def test_the_warehouse_file_is_its_owners_only(tokentill: Running) -> None:
    mode = stat.S_IMODE(os.stat(tokentill.db).st_mode)
    assert mode == 0o600, oct(mode)


def test_slow_headers_are_dropped_and_connections_are_bounded(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "TOKENTILL_HEADER_TIMEOUT": "1.5",
        "TOKENTILL_MAX_CONNECTIONS": "8",
        "TOKENTILL_QUOTAS_ENABLED": "false",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokentill",
            "serve",
            "--db",
            str(tmp_path / "w.duckdb"),
            "--port",
            str(port),
            "--upstream",
            "http://127.0.0.1:9",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "tokentill did not start"
            time.sleep(0.1)
        slow = []
        for _ in range(8):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
            slow.append(sock)
        time.sleep(0.2)
        assert httpx.get(url + "/healthz", timeout=5).status_code == 503  # at the bound
        started = time.monotonic()
        for sock in slow:
            sock.settimeout(10)
            assert sock.recv(1024) == b""  # closed by tokentill
            sock.close()
        assert time.monotonic() - started < 8
        assert httpx.get(url + "/healthz", timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert stat.S_IMODE(os.stat(tmp_path / "w.duckdb").st_mode) == 0o600
