"""The composition root: /v1 answers 503 in OpenAI's shape until the service runs (and
once it stops), and the service is built whole by its lifespan, each part handed what it
needs when it is constructed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from tokentill.app import create_app
from tokentill.settings import Settings


def test_v1_is_unavailable_before_the_lifespan_ran(tmp_path: Path) -> None:
    app = create_app(Settings(db=tmp_path / "w.duckdb", upstream="http://127.0.0.1:9"))

    async def ask() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)  # no lifespan: nothing was started
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/v1/responses", json={"model": "gpt-4o-mini"})

    answer = asyncio.run(ask())
    assert answer.status_code == 503
    assert answer.json()["error"] == {
        "message": "tokentill is starting or stopping",
        "type": "server_error",
        "param": None,
        "code": "unavailable",
    }
    assert app.runtime is None and not (tmp_path / "w.duckdb").exists()
