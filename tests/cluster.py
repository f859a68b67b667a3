"""Real `tokentill serve` processes of a cluster, for the cluster's tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai

from tests.servers import free_port
from tokentill.warehouse.lake import LakeConfig, connect


class Instance:
    """`tokentill serve --role <role>` on the lake, as a real subprocess (`lake` None: one
    process on its file, `<home>/local.duckdb` or `db`)."""

    def __init__(
        self,
        lake: LakeConfig | None,
        upstream: str,
        instance: str,
        home: Path,
        role: str = "proxy",
        db: Path | None = None,
        **settings: str,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        home.mkdir(parents=True, exist_ok=True)
        self.log = home / f"serve.{self.port}.log"
        env = {
            **os.environ,
            **(
                {
                    "TOKENTILL_LAKE_CATALOG": lake.catalog,
                    "TOKENTILL_LAKE_DATA": lake.data,
                    "TOKENTILL_INSTANCE_ID": instance,
                }
                if lake is not None
                else {}
            ),
            "TOKENTILL_QUOTAS_ENABLED": "false",
            "TOKENTILL_WRITER_FLUSH_INTERVAL": "0.05",
            "TOKENTILL_BACKGROUND_POLL_MIN_INTERVAL": "0.2",
            "TOKENTILL_BACKGROUND_POLL_MAX_INTERVAL": "1",
            "TOKENTILL_SETTLEMENT_API_KEY": "sk-settlement",
            "TOKENTILL_SETTLEMENT_INTERVAL": "1",
            # The tests' streams last a second: one left pending longer was cut by a kill.
            "TOKENTILL_SETTLEMENT_STREAM_GRACE": "5",
            **{f"TOKENTILL_{name.upper()}": value for name, value in settings.items()},
        }
        command = [sys.executable, "-m", "tokentill", "serve", "--role", role]
        command += ["--db", str(db or home / "local.duckdb"), "--upstream", upstream]
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


def wait_for(predicate: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, what
        time.sleep(0.2)
    return time.monotonic() - started


def in_lake(config: LakeConfig, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    """`sql`'s rows, read from the lake by a connection of the test's own."""
    conn = connect(config)
    try:
        return conn.execute(sql, params or []).fetchall()
    finally:
        conn.close()
