"""Shared fixtures: a real fake upstream, a real tokentill, real DuckDB files, the openai SDK."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import httpx
import openai
import pytest

from tests.cluster import Instance
from tests.servers import serve_in_thread
from tests.services import Postgres, postgres_cluster
from tokentill.app import Tokentill, create_app
from tokentill.fakeai import create_fake_app
from tokentill.settings import Settings
from tokentill.warehouse.lake import LakeConfig


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[str]:
    """The fake OpenAI API under a real uvicorn, for the whole session."""
    with serve_in_thread(create_fake_app(seed=7)) as url:
        yield url


@dataclass
class Running:
    url: str
    app: Tokentill
    settings: Settings

    @property
    def db(self) -> Path:
        return self.settings.db

    def client(self, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="sk-test", max_retries=0, **kwargs)

    def flush(self) -> None:
        """Wait until everything the proxy journaled is in DuckDB."""
        runtime = self.app.runtime
        assert runtime is not None
        assert runtime.writer.flush(timeout=10), "writer did not catch up"

    def rows(self, where: str = "true", params: list[Any] | None = None) -> list[dict[str, Any]]:
        self.flush()
        # Same process: this connects to the server's own DuckDB instance.
        with duckdb.connect(str(self.db)) as conn:
            cursor = conn.execute(
                f"SELECT * FROM usage_events WHERE {where} ORDER BY request_started_at",
                params or [],
            )
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not met in time")
            time.sleep(0.05)


@pytest.fixture
def make_tokentill(tmp_path: Path, fake_upstream: str) -> Iterator[Callable[..., Running]]:
    """Start tokentill (in a thread, real uvicorn) with settings overrides."""
    stack: list[Any] = []

    def start(**overrides: Any) -> Running:
        values: dict[str, Any] = {
            "db": tmp_path / f"w{len(stack)}.duckdb",
            "upstream": fake_upstream,
            "background_poll_min_interval": 0.2,
            "writer_flush_interval": 0.05,
        }
        values.update(overrides)
        settings = Settings(**values)
        app = create_app(settings)
        context = serve_in_thread(app)
        url = context.__enter__()
        stack.append(context)
        return Running(url, app, settings)

    yield start
    for context in reversed(stack):
        context.__exit__(None, None, None)


@contextlib.contextmanager
def serve_tokentill(db: Path, upstream: str, **overrides: Any) -> Iterator[Running]:
    """A tokentill on `db` in front of `upstream` for as long as the block lasts (for
    module-scoped fixtures, which cannot use `make_tokentill`)."""
    values: dict[str, Any] = {"db": db, "upstream": upstream, "writer_flush_interval": 0.05}
    values.update(overrides)
    settings = Settings(**values)
    app = create_app(settings)
    with serve_in_thread(app) as url:
        yield Running(url, app, settings)


@pytest.fixture
def tokentill(make_tokentill: Callable[..., Running]) -> Running:
    return make_tokentill()


def ledger(fake_upstream: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = httpx.get(fake_upstream + "/_fake/ledger").json()
    return entries


def put_user_quota(running: Running, user: str, **limit: Any) -> dict[str, Any]:
    """Set a user's quota through the admin API (one limit: limit_<unit>, period, mode)."""
    answer = httpx.put(f"{running.url}/api/quotas/users/{user}", json=limit, timeout=30)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


@pytest.fixture
def proxies() -> Iterator[list[Instance]]:
    """`tokentill serve` processes a cluster test starts: killed at its end."""
    started: list[Instance] = []
    yield started
    for proxy in started:
        if proxy.proc.poll() is None:
            proxy.proc.kill()
            proxy.proc.wait()


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL for a cluster test module (tests/services.py)."""
    with postgres_cluster() as server:
        yield server


@pytest.fixture
def lake(postgres: Postgres, tmp_path: Path) -> LakeConfig:
    """A fresh lake: its own catalog database, its data under the test's directory."""
    return LakeConfig(
        catalog=postgres.new_database(),
        data=str(tmp_path / "lake") + "/",
        instance_id="test",
        extension_dir=tmp_path / "extensions",
    )
