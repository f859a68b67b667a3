"""Many proxies, one lake: DuckLake on a real PostgreSQL catalog, real `tokentill serve`
processes, kill -9 and a catalog outage. Every response the upstream billed and a client
received lands exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import polars as pl
import pytest

from tests.conftest import ledger
from tests.servers import free_port
from tests.services import Postgres, postgres_cluster
from tokentill.settings import Settings
from tokentill.warehouse.events import COLUMNS
from tokentill.warehouse.lake import Lake, LakeConfig, connect
from tokentill.warehouse.storage import Position


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with postgres_cluster() as server:
        yield server


@pytest.fixture
def lake(postgres: Postgres, tmp_path: Path) -> LakeConfig:
    return LakeConfig(
        catalog=postgres.new_database(),
        data=str(tmp_path / "lake") + "/",
        instance_id="test",
        extension_dir=tmp_path / "extensions",
    )


def _events(*ids: str, status: str = "completed", tokens: int = 10) -> pl.DataFrame:
    now = datetime.now(UTC)
    rows = [
        {
            "event_id": event_id,
            "response_id": event_id,
            "endpoint": "responses",
            "model": "gpt-4o-mini",
            "status": status,
            "input_tokens": tokens,
            "output_tokens": tokens,
            "created_at": now,
            "request_started_at": now,
            "recorded_at": now,
            "background": status != "completed",
        }
        for event_id in ids
    ]
    schema = {name: dtype for name, dtype in COLUMNS.values()}
    return pl.DataFrame([{name: row.get(name) for name in schema} for row in rows], schema=schema)


def _in_lake(config: LakeConfig, sql: str) -> list[tuple[Any, ...]]:
    conn = connect(config)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_a_lake_keeps_each_event_once_and_each_proxy_its_own_checkpoint(
    lake: LakeConfig,
) -> None:
    first = Lake(lake)
    second = Lake(replace(lake, instance_id="other"))
    try:
        empty = pl.DataFrame(schema=_events("x").schema)
        first.events.append(_events("a", "b"), empty, seq=1, upto=Position(1, 100))
        # A replay after a crash hands the same events again: skipped, checkpoint moves.
        first.events.append(_events("b", "c"), empty, seq=1, upto=Position(1, 200))
        second.events.append(_events("d"), empty, seq=1, upto=Position(7, 5))
        assert first.events.checkpoint() == Position(1, 200)
        assert second.events.checkpoint() == Position(7, 5)
        assert Lake(lake).events.checkpoint() == Position(1, 200)  # kept in the lake

        # A background response: queued, then its outcome as a newer version.
        second.events.append(
            _events("bg", status="queued", tokens=0), empty, seq=1, upto=Position(7, 9)
        )
        done = _events("bg", tokens=42).with_columns(
            created_at=pl.lit(
                _in_lake(lake, "SELECT created_at FROM usage_events WHERE event_id = 'bg'")[0][0]
            )
        )
        first.events.append(empty, done, seq=1, upto=Position(1, 300))
        # An update to an event no longer pending changes nothing.
        late = done.with_columns(input_tokens=pl.lit(999, pl.Int64))
        first.events.append(empty, late, seq=1, upto=Position(1, 400))
    finally:
        first.close()
        second.close()
    rows = _in_lake(
        lake,
        "SELECT event_id, status, input_tokens, ingest_seq FROM usage_events ORDER BY event_id",
    )
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("a", "completed", 10),
        ("b", "completed", 10),
        ("bg", "completed", 42),
        ("c", "completed", 10),
        ("d", "completed", 10),
    ]
    versions = _in_lake(lake, "SELECT count(*) FROM usage_event_versions WHERE event_id = 'bg'")
    assert versions == [(2,)]
    # The sequence grows in commit order across both writers: a watermark at N has seen
    # every row up to N.
    seqs = [r[0] for r in _in_lake(lake, "SELECT DISTINCT ingest_seq FROM usage_event_versions")]
    assert sorted(seqs) == list(range(1, len(seqs) + 1))


def test_concurrent_writers_commit_in_sequence_order(lake: LakeConfig) -> None:
    """Four lakes (as four proxies) commit at once: no conflict lost, no sequence shared."""
    lakes = [Lake(replace(lake, instance_id=f"p{n}")) for n in range(4)]
    empty = pl.DataFrame(schema=_events("x").schema)

    def write(n: int) -> None:
        for batch in range(10):
            ids = [f"p{n}-{batch}-{i}" for i in range(20)]
            lakes[n].events.append(_events(*ids), empty, seq=1, upto=Position(1, batch + 1))

    try:
        threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [each.events.checkpoint() for each in lakes] == [Position(1, 10)] * 4
    finally:
        for each in lakes:
            each.close()
    rows = _in_lake(
        lake, "SELECT ingest_seq, count(*), count(DISTINCT event_id) FROM usage_events GROUP BY 1"
    )
    assert sorted(r[0] for r in rows) == list(range(1, 41))  # one per commit, in order
    assert all(r[1] == r[2] == 20 for r in rows)


def test_settings_refuse_a_half_configured_lake() -> None:
    with pytest.raises(ValueError, match="go together"):
        Settings(lake_catalog="postgresql://x/y")
    with pytest.raises(ValueError, match="instance_id"):
        Settings(lake_catalog="postgresql://x/y", lake_data="/tmp/l")
    with pytest.raises(ValueError, match="needs a lake"):
        Settings(role="proxy")
    with pytest.raises(ValueError, match="Redis"):
        Settings(lake_catalog="postgresql://x/y", lake_data="/l", instance_id="a", role="proxy")


# --- real processes ---------------------------------------------------------------------


class Proxy:
    """`tokentill serve --role proxy` on the lake, as a real subprocess."""

    def __init__(self, lake: LakeConfig, upstream: str, instance: str, home: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        home.mkdir(parents=True, exist_ok=True)
        self.log = home / f"serve.{self.port}.log"
        env = {
            **os.environ,
            "TOKENTILL_LAKE_CATALOG": lake.catalog,
            "TOKENTILL_LAKE_DATA": lake.data,
            "TOKENTILL_INSTANCE_ID": instance,
            "TOKENTILL_QUOTAS_ENABLED": "false",
            "TOKENTILL_WRITER_FLUSH_INTERVAL": "0.05",
            "TOKENTILL_BACKGROUND_POLL_MIN_INTERVAL": "0.2",
            "TOKENTILL_BACKGROUND_POLL_MAX_INTERVAL": "1",
            "TOKENTILL_SETTLEMENT_API_KEY": "sk-settlement",
            "TOKENTILL_SETTLEMENT_INTERVAL": "1",
        }
        command = [sys.executable, "-m", "tokentill", "serve", "--role", "proxy"]
        command += ["--db", str(home / "local.duckdb"), "--upstream", upstream]
        command += ["--port", str(self.port)]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while self.health().get("status") != "ok":
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(self.log.read_text())
            time.sleep(0.05)

    def health(self) -> dict[str, Any]:
        try:
            answer = httpx.get(self.url + "/healthz", timeout=2)
        except httpx.TransportError:
            return {}
        body: dict[str, Any] = answer.json()
        return body

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="sk-test", max_retries=0)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(30)


@pytest.fixture
def proxies() -> Iterator[list[Proxy]]:
    started: list[Proxy] = []
    yield started
    for proxy in started:
        if proxy.proc.poll() is None:
            proxy.proc.kill()
            proxy.proc.wait()


def _traffic(proxy: Proxy, tag: str, received: list[str], stop: threading.Event) -> None:
    """Plain, streamed and background responses until `stop` or the proxy goes away."""
    client = proxy.client()
    i = 0
    while not stop.is_set():
        i += 1
        try:
            if i % 3 == 0:
                events = list(
                    client.responses.create(model="gpt-4o-mini", input="x", user=tag, stream=True)
                )
                if events and events[-1].type == "response.completed":
                    received.append(str(events[-1].response.id))  # type: ignore[union-attr]
            elif i % 7 == 0:
                received.append(
                    client.responses.create(
                        model="gpt-4o-mini", input="x", user=tag, background=True
                    ).id
                )
            else:
                received.append(
                    client.responses.create(model="gpt-4o-mini", input="x", user=tag).id
                )
        except (openai.APIError, httpx.HTTPError):
            return


def _lake_rows(config: LakeConfig) -> list[tuple[str, str, int | None]]:
    rows = _in_lake(config, "SELECT response_id, status, output_tokens FROM usage_events")
    return [(str(r[0]), str(r[1]), r[2]) for r in rows]


def test_proxies_killed_and_restarted_meter_every_response_once(
    lake: LakeConfig, fake_upstream: str, proxies: list[Proxy], tmp_path: Path
) -> None:
    """Three proxies on one lake under load; one is SIGKILLed mid-traffic and restarted
    on its journal. Every response a client received is in the lake exactly once, with
    the outcome the upstream billed (background ones too)."""
    homes = [tmp_path / f"proxy{n}" for n in range(3)]
    for n, home in enumerate(homes):
        proxies.append(Proxy(lake, fake_upstream, f"proxy-{n}", home))
    received: list[str] = []
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=9) as pool:
        futures = [
            pool.submit(_traffic, proxies[n % 3], f"user{n}", received, stop) for n in range(9)
        ]
        time.sleep(3.0)
        proxies[0].stop(signal.SIGKILL)
        time.sleep(1.0)
        stop.set()
        for future in futures:
            future.result(timeout=60)
    assert len(received) > 30  # traffic was flowing on every proxy
    restarted = Proxy(lake, fake_upstream, "proxy-0", homes[0])
    proxies.append(restarted)
    billed = {entry["id"]: entry for entry in ledger(fake_upstream)}
    # Background responses settle through the poller of the proxy that saw them, and the
    # killed proxy's through the settlement sweep (its poller died with it).
    deadline = time.monotonic() + 60
    while True:
        rows = _lake_rows(lake)
        pending = [r for r in rows if r[1] in ("queued", "in_progress")]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for proxy in (proxies[1], proxies[2], restarted):
        assert proxy.stop() == 0
    rows = _lake_rows(lake)
    landed = [r[0] for r in rows]
    assert len(landed) == len(set(landed)), "a response was counted twice"
    assert set(received) <= set(landed), "a response the client received was lost"
    assert set(landed) <= set(billed)
    assert not [r for r in rows if r[1] in ("queued", "in_progress")], "left pending"
    for response_id, _status, output_tokens in rows:
        assert output_tokens == billed[response_id]["output_tokens"], response_id
    checkpoints = _in_lake(lake, "SELECT DISTINCT instance_id FROM lake_checkpoints ORDER BY 1")
    assert checkpoints == [("proxy-0",), ("proxy-1",), ("proxy-2",)]


def test_a_catalog_outage_degrades_the_proxies_and_loses_nothing(
    lake: LakeConfig, postgres: Postgres, fake_upstream: str, proxies: list[Proxy], tmp_path: Path
) -> None:
    """PostgreSQL stopped under load: the proxies keep serving (their journals grow,
    /healthz says degraded), then catch up when it returns. Nothing lost or doubled."""
    proxy = Proxy(lake, fake_upstream, "outage", tmp_path / "proxy")
    proxies.append(proxy)
    client = proxy.client()
    before = [
        client.responses.create(model="gpt-4o-mini", input="x", user="o").id for _ in range(5)
    ]
    postgres.stop()
    try:
        during = [
            client.responses.create(model="gpt-4o-mini", input="x", user="o").id for _ in range(20)
        ]
        deadline = time.monotonic() + 30
        while proxy.health().get("status") != "degraded":
            assert time.monotonic() < deadline, proxy.health()
            time.sleep(0.2)
        health = proxy.health()
        assert health["journal_backlog"] > 0
    finally:
        postgres.start()
    deadline = time.monotonic() + 60
    while proxy.health().get("status") != "ok" or proxy.health().get("journal_backlog"):
        assert time.monotonic() < deadline, proxy.health()
        time.sleep(0.2)
    assert proxy.stop() == 0
    landed = [r[0] for r in _lake_rows(lake)]
    assert sorted(landed) == sorted(before + during)
    assert "refused" not in proxy.log.read_text()  # nothing set aside as a bad line
    assert not (tmp_path / "proxy" / "local.duckdb.journal" / "rejected.jsonl").exists()


def test_instances_of_other_roles_refuse_what_they_do_not_serve(
    lake: LakeConfig, fake_upstream: str, proxies: list[Proxy], tmp_path: Path
) -> None:
    proxy = Proxy(lake, fake_upstream, "roles", tmp_path / "proxy")
    proxies.append(proxy)
    answer = httpx.get(proxy.url + "/api/reports/spend", timeout=10)
    assert answer.status_code == 404
    assert "role 'proxy'" in answer.json()["detail"]
    assert httpx.get(proxy.url + "/metrics", timeout=10).status_code == 200
    assert proxy.client().responses.create(model="gpt-4o-mini", input="x").status == "completed"
