"""Nothing lost, nothing counted twice: SIGTERM, kill -9 and restarts of a real process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import duckdb
import httpx
import openai
import pytest

from tests.conftest import ledger
from tests.servers import free_port


def serve_command(db: Path, upstream: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tokentill",
        "serve",
        "--db",
        str(db),
        "--upstream",
        upstream,
        "--port",
        str(port),
    ]


class Process:
    """`tokentill serve` as a real subprocess."""

    def __init__(self, db: Path, upstream: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = db.with_suffix(f".{self.port}.log")
        environment = {**os.environ, **{f"TOKENTILL_{k.upper()}": v for k, v in env.items()}}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                serve_command(db, upstream, self.port),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=environment,
            )
        try:
            self._wait_healthy()
        except Exception:
            self.proc.kill()
            raise AssertionError(self.log.read_text()) from None

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + 120  # a loaded machine starts slowly
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("exited")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="sk-test", max_retries=0)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "warehouse.duckdb"


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()


def rows(db: Path) -> list[dict[str, Any]]:
    with duckdb.connect(str(db), read_only=True) as conn:
        cursor = conn.execute("SELECT * FROM usage_events")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def make_requests(process: Process, count: int, tag: str) -> list[str]:
    client = process.client()

    def one(i: int) -> str:
        if i % 2:
            events = list(
                client.responses.create(
                    model="gpt-4o-mini", input=f"{tag}{i}", user=tag, stream=True
                )
            )
            return str(events[-1].response.id)  # type: ignore[union-attr]
        return client.responses.create(model="gpt-4o-mini", input=f"{tag}{i}", user=tag).id

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(one, range(count)))


def test_sigterm_flushes_everything_and_exits_zero(
    db: Path, fake_upstream: str, processes: list[Process]
) -> None:
    # A writer that would otherwise wait a minute to batch: SIGTERM must flush it.
    process = Process(db, fake_upstream, writer_flush_interval="60")
    processes.append(process)
    ids = make_requests(process, 40, "term")
    # A slow stream still in flight when the signal comes is allowed to finish.
    slow: dict[str, Any] = {}

    def slow_stream() -> None:
        events = list(
            process.client().responses.create(
                model="gpt-4o",
                input="slow",
                user="term-slow",
                stream=True,
                extra_headers={"x-fake-delay-ms": "150"},
            )
        )
        slow["id"] = events[-1].response.id  # type: ignore[union-attr]

    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(slow_stream)
        time.sleep(0.3)
        started = time.monotonic()
        code = process.stop(signal.SIGTERM)
        elapsed = time.monotonic() - started
        future.result(timeout=10)
    assert code == 0, process.log.read_text()
    assert elapsed < 10
    landed = {row["response_id"] for row in rows(db)}
    assert landed == {*ids, slow["id"]}


def test_kill_9_then_restart_loses_nothing_and_doubles_nothing(
    db: Path, fake_upstream: str, processes: list[Process]
) -> None:
    httpx.delete(fake_upstream + "/_fake/ledger")
    process = Process(db, fake_upstream, writer_flush_interval="60")
    processes.append(process)
    ids = make_requests(process, 60, "k9")
    process.stop(signal.SIGKILL)
    # DuckDB got nothing yet: every event lives only in the journal.
    assert rows(db) == []

    restarted = Process(db, fake_upstream, writer_flush_interval="0.05")
    processes.append(restarted)
    more = make_requests(restarted, 10, "k9b")
    assert restarted.stop() == 0
    landed = [row["response_id"] for row in rows(db)]
    assert sorted(landed) == sorted(ids + more)

    # A second restart replays nothing twice.
    again = Process(db, fake_upstream)
    processes.append(again)
    assert again.stop() == 0
    assert len(rows(db)) == 70
    billed = {entry["id"]: entry for entry in ledger(fake_upstream)}
    for row in rows(db):
        assert row["output_tokens"] == billed[row["response_id"]]["output_tokens"]


def test_kill_9_under_load(db: Path, fake_upstream: str, processes: list[Process]) -> None:
    """Killed mid-traffic: every response a client fully received is there exactly once."""
    process = Process(db, fake_upstream)
    processes.append(process)
    received: list[str] = []
    client = process.client()

    def worker(n: int) -> None:
        for i in range(1000):
            try:
                if (n + i) % 2:
                    events = list(
                        client.responses.create(
                            model="gpt-4o-mini", input="x", user="load", stream=True
                        )
                    )
                    if events and events[-1].type == "response.completed":
                        received.append(str(events[-1].response.id))  # type: ignore[union-attr]
                else:
                    received.append(
                        client.responses.create(model="gpt-4o-mini", input="x", user="load").id
                    )
            except (openai.APIError, httpx.HTTPError):
                return

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(worker, n) for n in range(8)]
        time.sleep(2.0)
        process.stop(signal.SIGKILL)
        for future in futures:
            future.result(timeout=30)
    assert len(received) > 10  # traffic was flowing when the kill came

    restarted = Process(db, fake_upstream)
    processes.append(restarted)
    assert restarted.stop() == 0
    landed = [row["response_id"] for row in rows(db)]
    assert len(landed) == len(set(landed)), "a response was counted twice"
    assert set(received) <= set(landed), "a response the client received was lost"
    billed = {entry["id"] for entry in ledger(fake_upstream)}
    assert set(landed) <= billed


def test_second_server_on_same_database_says_so(
    db: Path, fake_upstream: str, processes: list[Process]
) -> None:
    process = Process(db, fake_upstream)
    processes.append(process)
    second = subprocess.run(
        serve_command(db, fake_upstream, free_port()),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2
    assert "in use by another process" in second.stderr
    assert httpx.get(process.url + "/healthz").status_code == 200


def test_bad_settings_are_refused_clearly(db: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tokentill", "serve", "--db", str(db), "--upstream", "ftp://x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "upstream must be an http:// or https:// URL" in result.stderr


def test_responses_left_pending_by_a_kill_are_settled_on_restart(
    db: Path, fake_upstream: str, processes: list[Process]
) -> None:
    """Background responses still queued when the process is SIGKILLed: their poller died
    with it. Restarted without a settlement key they stay queued (and it says so); with
    one, the sweep retrieves them and records what the upstream billed."""
    process = Process(db, fake_upstream)
    processes.append(process)
    client = process.client()
    slow = {"x-fake-background-delay-ms": "3000"}
    ids = [
        client.responses.create(
            model="gpt-4o-mini", input="x", user="bg", background=True, extra_headers=slow
        ).id
        for _ in range(5)
    ]
    time.sleep(0.5)  # in the journal (it is before the answer), then kill
    process.stop(signal.SIGKILL)

    keyless = Process(db, fake_upstream)
    processes.append(keyless)
    assert keyless.stop() == 0
    assert {r["response_id"]: r["status"] for r in rows(db)} == dict.fromkeys(ids, "queued")
    assert "TOKENTILL_SETTLEMENT_API_KEY" in keyless.log.read_text()

    settling = Process(
        db, fake_upstream, settlement_api_key="sk-settlement", background_poll_max_interval="1"
    )
    processes.append(settling)
    billed = {entry["id"]: entry for entry in ledger(fake_upstream) if entry["id"] in ids}
    deadline = time.monotonic() + 60
    while len(billed) < len(ids) and time.monotonic() < deadline:
        time.sleep(0.2)
        billed = {entry["id"]: entry for entry in ledger(fake_upstream) if entry["id"] in ids}
    time.sleep(3.0)  # the poller's next round after the upstream finished
    assert settling.stop() == 0
    landed = {r["response_id"]: r for r in rows(db)}
    assert sorted(landed) == sorted(ids)
    for response_id, row in landed.items():
        assert row["status"] == "completed", row
        assert row["output_tokens"] == billed[response_id]["output_tokens"] > 0


def test_a_stream_cut_by_a_kill_is_settled_from_its_pending_record(
    db: Path, fake_upstream: str, processes: list[Process]
) -> None:
    """Streams open when the process is SIGKILLed: each was journaled as pending when its
    `response.created` passed, so the restarted process settles it to what the upstream
    billed (once, and never lost). Before, they left no row at all."""
    process = Process(db, fake_upstream)
    processes.append(process)
    client = process.client()
    slow = {"x-fake-delay-ms": "400"}
    started: list[str] = []

    def stream(i: int) -> None:
        with contextlib.suppress(openai.APIError, httpx.HTTPError):
            events = client.responses.create(
                model="gpt-4o-mini", input=f"x{i}", user="cut", stream=True, extra_headers=slow
            )
            started.extend(e.response.id for e in events if e.type == "response.created")

    pool = ThreadPoolExecutor(max_workers=5)
    for i in range(5):
        pool.submit(stream, i)
    deadline = time.monotonic() + 30
    while len(started) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(started) == 5
    process.stop(signal.SIGKILL)
    pool.shutdown(wait=True)

    settling = Process(
        db, fake_upstream, settlement_api_key="sk-settlement", background_poll_max_interval="1"
    )
    processes.append(settling)

    def billed_now() -> dict[str, dict[str, Any]]:
        return {e["id"]: e for e in ledger(fake_upstream) if e["id"] in started}

    deadline = time.monotonic() + 60
    while len(billed_now()) < len(started) and time.monotonic() < deadline:
        time.sleep(0.2)  # the upstream finishes them (at its own pace: no one reads)
    billed = billed_now()
    assert sorted(billed) == sorted(started)

    def settled() -> bool:
        landed = {r["response_id"]: r["status"] for r in _rows_of(settling)}
        return all(landed.get(i) == "completed" for i in started)

    deadline = time.monotonic() + 60
    while not settled() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert settling.stop() == 0
    landed = [r for r in rows(db) if r["user_id"] == "cut"]
    assert sorted(r["response_id"] for r in landed) == sorted(started)
    for row in landed:
        assert row["status"] == "completed", row
        assert row["output_tokens"] == billed[row["response_id"]]["output_tokens"] > 0
        assert row["streamed"]


def _rows_of(process: Process) -> list[dict[str, Any]]:
    answer = httpx.get(process.url + "/api/events", params={"user": "cut"}, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    found: list[dict[str, Any]] = body["events"] if isinstance(body, dict) else body
    return found
