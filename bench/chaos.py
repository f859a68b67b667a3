"""Billed but unrecorded: one process under repeated kill -9, against what the upstream
billed.

One run starts the fake upstream and one `tokentill serve` on its DuckDB file (with a
settlement key), and drives it with the openai SDK from several threads: plain, streamed
(slowed, so that kills land mid-stream) and background responses (finishing seconds
later). First a **baseline** phase with no kill, then the **chaos** phase: the process is
SIGKILLed every `--interval` seconds, `--kills` times, and restarted at once on the same
file and port. Then the traffic stops, the last process settles what is pending, and the
upstream's ledger is compared with the warehouse, response by response:

- *unrecorded*: billed tokens with no row, or a row without its tokens (a response left
  pending, or settled as `interrupted` with nothing);
- *doubled*: a response counted in more than one row.

Target: billed-but-unrecorded tokens below 0.01% of billed tokens, nothing doubled.

    python -m bench.chaos [--kills 8] [--interval 50] [--threads 6]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import httpx
import openai

from bench._common import (
    LOOPBACK,
    BenchError,
    Server,
    fake_upstream_server,
    free_port,
    http_request,
    make_workdir,
    markdown_table,
    prometheus_value,
    python_module_argv,
    remove_workdir,
    verdict,
)

TARGET_PERCENT = 0.01


@dataclass
class Phase:
    name: str
    kills: int
    billed_responses: int
    billed_tokens: int
    unrecorded_responses: int
    unrecorded_tokens: int
    doubled: int
    sent: int
    seconds: float

    @property
    def unrecorded_percent(self) -> float:
        return 100.0 * self.unrecorded_tokens / self.billed_tokens if self.billed_tokens else 0.0


class Bench:
    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        self.workdir = workdir
        self.args = args
        self.fake = fake_upstream_server(workdir)
        self.upstream = f"http://{LOOPBACK}:{self.fake.port}"
        self.port = free_port()
        self.server: Server | None = None
        self.sent = 0
        self._lock = threading.Lock()

    def start_tokentill(self, db: Path) -> Server:
        argv = ["-m", "tokentill", "serve", "--db", str(db), "--upstream", self.upstream]
        argv += ["--port", str(self.port)]
        server = Server("tokentill", python_module_argv(*argv), self.port, db.with_suffix(".log"))
        environment = {k: v for k, v in os.environ.items() if not k.startswith("TOKENTILL_")}
        environment.update(
            {
                "TOKENTILL_SETTLEMENT_API_KEY": "sk-settlement",
                "TOKENTILL_SETTLEMENT_INTERVAL": "2",
                "TOKENTILL_BACKGROUND_POLL_MIN_INTERVAL": "0.2",
                "TOKENTILL_BACKGROUND_POLL_MAX_INTERVAL": "1",
                "TOKENTILL_QUOTAS_ENABLED": "false",
            }
        )
        deadline = time.monotonic() + 60
        while True:  # the killed process's port may take a moment to be free
            server.start(environment)
            try:
                server.wait_http("/healthz", timeout=120)
                return server
            except BenchError:
                if time.monotonic() > deadline:
                    raise
                server.stop()
                time.sleep(0.5)

    def traffic(self, stop: threading.Event, seed: int) -> None:
        client = openai.OpenAI(
            base_url=f"http://{LOOPBACK}:{self.port}/v1",
            api_key="sk-bench",
            max_retries=0,
            timeout=30,
        )
        i = seed
        while not stop.is_set():
            i += 1
            user = f"chaos-{i % 7}"
            try:
                if i % 4 == 1:
                    events = client.responses.create(
                        model="gpt-4o-mini",
                        input="Tell me a story.",
                        user=user,
                        stream=True,
                        extra_headers={"x-fake-delay-ms": "40"},
                    )
                    for _ in events:
                        pass
                elif i % 7 == 3:
                    client.responses.create(
                        model="gpt-4o-mini",
                        input="Think about it.",
                        user=user,
                        background=True,
                        extra_headers={"x-fake-background-delay-ms": "3000"},
                    )
                else:
                    client.responses.create(model="gpt-4o-mini", input="Hello.", user=user)
                with self._lock:
                    self.sent += 1
            except (openai.APIError, httpx.HTTPError):
                time.sleep(0.05)  # killed, or restarting

    def phase(self, name: str, kills: int, seconds: float) -> Phase:
        db = self.workdir / f"{name}.duckdb"
        status, _ = http_request(self.fake.port, "DELETE", "/_fake/ledger", timeout=60)
        if status != 200:
            raise BenchError(f"the fake's ledger: {status}")
        self.sent = 0
        self.server = self.start_tokentill(db)
        stop = threading.Event()
        threads = [
            threading.Thread(target=self.traffic, args=(stop, n * 1000), daemon=True)
            for n in range(self.args.threads)
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        if kills:
            for k in range(kills):
                time.sleep(self.args.interval)
                assert self.server.proc is not None
                self.server.proc.send_signal(signal.SIGKILL)
                self.server.proc.wait()
                print(f"  {name}: kill {k + 1}/{kills} at {time.monotonic() - started:.0f} s")
                self.server = self.start_tokentill(db)
            time.sleep(self.args.interval)
        else:
            time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join(60)
        elapsed = time.monotonic() - started
        self.settle(db)
        return self.compare(name, kills, db, elapsed)

    def settle(self, db: Path) -> None:
        """Wait until nothing is pending (the poller holds none, the settlement sweep,
        every 2 s, found none to adopt, and the journal is written), then stop the process
        (SIGTERM) so that the file can be read."""
        assert self.server is not None
        deadline = time.monotonic() + self.args.settle_timeout
        quiet = 0
        while time.monotonic() < deadline and quiet < 3:
            time.sleep(2.0)
            status, raw = http_request(self.port, "GET", "/metrics", timeout=60)
            text = raw.decode()
            idle = status == 200 and all(
                prometheus_value(text, name) == 0
                for name in ("tokentill_pending_responses", "tokentill_journal_backlog_events")
            )
            quiet = quiet + 1 if idle else 0
        self.server.stop()

    def compare(self, name: str, kills: int, db: Path, seconds: float) -> Phase:
        status, raw = http_request(self.fake.port, "GET", "/_fake/ledger", timeout=120)
        if status != 200:
            raise BenchError(f"the fake's ledger: {status}")
        billed = {
            e["id"]: (e["input_tokens"] or 0) + (e["output_tokens"] or 0)
            for e in json.loads(raw)
            if e["endpoint"] == "/v1/responses" and e["input_tokens"] is not None
        }
        with duckdb.connect(str(db), read_only=True) as conn:
            rows = conn.execute(
                """SELECT response_id, count(*),
                          max(coalesce(input_tokens, 0) + coalesce(output_tokens, 0))
                   FROM usage_events WHERE response_id IS NOT NULL GROUP BY response_id"""
            ).fetchall()
        recorded = {str(r[0]): (int(r[1]), int(r[2])) for r in rows}
        unrecorded_responses = unrecorded_tokens = 0
        for response_id, tokens in billed.items():
            _, stored = recorded.get(response_id, (0, 0))
            if stored < tokens:
                unrecorded_responses += 1
                unrecorded_tokens += tokens - stored
        doubled = sum(1 for count, _ in recorded.values() if count > 1)
        return Phase(
            name,
            kills,
            len(billed),
            sum(billed.values()),
            unrecorded_responses,
            unrecorded_tokens,
            doubled,
            self.sent,
            seconds,
        )


def report(phases: list[Phase]) -> bool:
    rows = [
        [
            p.name,
            str(p.kills),
            f"{p.seconds:.0f} s",
            str(p.billed_responses),
            str(p.billed_tokens),
            str(p.unrecorded_responses),
            f"{p.unrecorded_percent:.4f}%",
            str(p.doubled),
        ]
        for p in phases
    ]
    print(
        markdown_table(
            [
                "phase",
                "kills",
                "time",
                "responses billed",
                "tokens billed",
                "unrecorded responses",
                "unrecorded tokens",
                "doubled",
            ],
            rows,
        )
    )
    chaos = phases[-1]
    ok = chaos.unrecorded_percent < TARGET_PERCENT and all(p.doubled == 0 for p in phases)
    print(
        f"\nbilled-but-unrecorded tokens under {chaos.kills} kill -9s: "
        f"{chaos.unrecorded_percent:.4f}% (target < {TARGET_PERCENT}%; baseline with no "
        f"kill: {phases[0].unrecorded_percent:.4f}%), doubled: {chaos.doubled} "
        f"[{verdict(ok)}]"
    )
    return ok


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--interval", type=float, default=50.0, help="seconds between kills")
    parser.add_argument("--threads", type=int, default=6)
    parser.add_argument("--baseline", type=float, default=30.0, help="seconds with no kill")
    parser.add_argument("--settle-timeout", type=float, default=120.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = make_workdir("tokentill-chaos-")
    bench = Bench(workdir, args)
    try:
        bench.fake.start()
        bench.fake.wait_port()
        phases = [bench.phase("baseline", 0, args.baseline)]
        phases.append(bench.phase("chaos", args.kills, 0))
        return 0 if report(phases) else 1
    finally:
        if bench.server is not None:
            with contextlib.suppress(Exception):
                bench.server.stop()
        bench.fake.stop()
        remove_workdir(workdir)


if __name__ == "__main__":
    sys.exit(main())
