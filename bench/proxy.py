"""The proxy's cost: what tokentill adds in front of an OpenAI-compatible upstream.

One run starts the built-in fake upstream, a tokentill in front of it and a bare forwarder
in front of it (subprocesses on free loopback ports, a fresh DuckDB file), drives all
three with wrk, and reports:

- requests/s and p50/p99 latency, direct vs through tokentill, plain and streamed
  `POST /v1/responses`, at 1, 16 and 64 connections;
- the same through a bare forwarder (bench/bare_forwarder.py: uvicorn and tokentill's
  HTTP client, no metering), the floor any Python/uvicorn proxy pays on this machine:
  tokentill's CPU per request minus the bare forwarder's is its metering overhead;
- time to the first body byte of a stream, direct vs proxied (sequential requests);
- the Responses API's WebSocket mode: 8 sockets creating responses one after another,
  direct vs through tokentill: responses/s, p50/p99 per response, CPU per response;
- tokentill's CPU time per request (utime + stime from /proc, over each proxied run);
- its peak RSS, and whether RSS stays flat from 10,000 to `--rss-requests` requests;
- the capture writer's throughput into DuckDB (in-process micro-benchmark): alone (events
  journaled first, then the writer started and timed until all are committed), and
  concurrently with the journaling;
- that every proxied response became exactly one row in DuckDB.

Figures are checked against targets (PASS/MISS; the latency and throughput targets compare
with direct) and summarised as markdown tables.
A MISS does not fail the run; something broken (a server that does not start or exit
cleanly, a captured row count that does not add up) exits 1.

    python bench/proxy.py [--duration 5] [--rss-requests 100000] [--wire spaced,crlf]

`--wire` makes the fake upstream spell its answers another way (see
`tokentill.fakeai.wire`): the proxy's cost with JSON written by `json.dumps`, say.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    LOOPBACK,
    BenchError,
    Server,
    WrkResult,
    cpu_seconds,
    find_wrk,
    free_port,
    http_request,
    main_thread_cpu_seconds,
    make_workdir,
    markdown_table,
    peak_rss_mb,
    percentile,
    prometheus_value,
    python_module_argv,
    remove_workdir,
    rss_mb,
    run_wrk,
    verdict,
    wrk_post_script,
)

PATH = "/v1/responses"
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
USERS = 100
CONNECTIONS = (1, 16, 64)
SOCKETS = 8
MODES = ("plain", "stream")
# The fake itself, a bare forwarder, tokentill with quotas off, tokentill with quotas on
# (every request checked against a default user limit of each unit and a tag limit).
TARGETS = ("direct", "bare", "proxy", "quota")
QUOTA_LIMITS = {
    "/api/quotas/default": {
        "limits": [
            {"limit_usd": "1000000", "period": "day"},
            {"limit_tokens": 10**15, "period": "minute"},
            {"limit_requests": 10**12, "period": "month", "mode": "soft"},
        ]
    },
    "/api/quotas/tags/team/bench": {"limit_usd": "1000000", "period": "total"},
}
WARMUP_S = 1.0
RSS_FIRST = 10_000

# Targets.
ADDED_P50_MS = 1.0
ADDED_P99_MS = 3.0
MIN_RATIO = 0.25
MAX_CPU_US = 300.0
MIN_WRITER_EPS = 50_000.0
MAX_RSS_GROWTH = 0.10


def request_body(user: int, *, stream: bool) -> str:
    body: dict[str, object] = {
        "model": "gpt-4o-mini",
        "input": "Summarise this quarter's API usage in two sentences.",
        "user": f"bench-user-{user}",
        "metadata": {"team": "bench"},
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":"))


# -- bookkeeping -----------------------------------------------------------------------------


@dataclass
class Run:
    """One wrk run against one target."""

    mode: str  # plain | stream | mixed
    target: str  # direct | bare | proxy
    wrk: WrkResult
    cpu_s: float  # CPU time of the server behind the URL (the fake itself when direct)
    main_cpu_s: float  # of which its main thread (the event loop)

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s / max(1, self.wrk.requests) * 1e6

    @property
    def main_cpu_us_per_request(self) -> float:
        return self.main_cpu_s / max(1, self.wrk.requests) * 1e6


@dataclass
class Tally:
    """Every proxied request, to check the warehouse against afterwards."""

    wrk_requests: int = 0
    wrk_ok: int = 0
    wrk_non_2xx: int = 0
    socket_errors: int = 0
    connections: int = 0  # requests possibly in flight when wrk stopped (at most one each)
    other_ok: int = 0  # sequential (TTFB) requests, all complete
    upstream: int | None = 0  # what the fake billed while proxied traffic ran

    def add_wrk(self, run: Run) -> None:
        self.wrk_requests += run.wrk.requests
        self.wrk_ok += run.wrk.ok
        self.wrk_non_2xx += run.wrk.non_2xx
        self.socket_errors += run.wrk.errors
        self.connections += run.wrk.connections

    def add_upstream(self, count: int | None) -> None:
        self.upstream = None if count is None or self.upstream is None else self.upstream + count


@dataclass
class WriterRun:
    """One writer micro-benchmark: `events` journaled, timed until all were committed."""

    events: int
    rows: int  # in DuckDB afterwards
    append_s: float  # journaling them all
    commit_s: float  # the timed span: from the writer's start (alone) or the first append
    backlog: int  # not yet committed when the appends ended
    tail_s: float  # from the end of the appends until all were committed

    @property
    def events_per_s(self) -> float:
        return self.events / max(self.commit_s, 1e-9)


@dataclass
class SocketRun:
    """WebSocket mode against one target: responses created one after another per socket."""

    target: str
    latencies_ms: list[float]
    wall_s: float
    cpu_s: float

    @property
    def responses(self) -> int:
        return len(self.latencies_ms)

    @property
    def per_s(self) -> float:
        return self.responses / max(self.wall_s, 1e-9)

    @property
    def cpu_us_per_response(self) -> float:
        return self.cpu_s / max(1, self.responses) * 1e6


@dataclass
class Results:
    runs: dict[tuple[str, str, int], Run] = field(default_factory=dict)
    ttfb_ms: dict[str, list[float]] = field(default_factory=dict)
    rss_points: list[tuple[int, float]] = field(default_factory=list)  # (requests, MB)
    rss_start_mb: float = 0.0
    peak_rss_mb: float = 0.0
    tokentill_exit: int | None = None
    rows: dict[str, int] = field(default_factory=dict)
    writer: dict[str, WriterRun] = field(default_factory=dict)  # "alone", "concurrent"
    tally: Tally = field(default_factory=Tally)
    quota_book_us: float = 0.0
    sockets: dict[str, SocketRun] = field(default_factory=dict)


# -- the two servers -----------------------------------------------------------------------


class Bench:
    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = workdir
        self.db = workdir / "bench.duckdb"
        fake_port, till_port, bare_port = free_port(), free_port(), free_port()
        quota_port = free_port()
        self.upstream_url = f"http://{LOOPBACK}:{fake_port}"
        self.fake = Server(
            "fake upstream",
            python_module_argv(
                "-m",
                "tokentill",
                "fake-upstream",
                "--host",
                LOOPBACK,
                "--port",
                str(fake_port),
                "--wire",
                args.wire,
            ),
            fake_port,
            workdir / "fake-upstream.log",
        )
        self.till = Server(
            "tokentill",
            python_module_argv(
                "-m",
                "tokentill",
                "serve",
                "--db",
                str(self.db),
                "--upstream",
                f"http://{LOOPBACK}:{fake_port}",
                "--host",
                LOOPBACK,
                "--port",
                str(till_port),
            ),
            till_port,
            workdir / "tokentill.log",
        )
        self.quota = Server(
            "tokentill with quotas",
            python_module_argv(
                "-m",
                "tokentill",
                "serve",
                "--db",
                str(workdir / "quota.duckdb"),
                "--upstream",
                f"http://{LOOPBACK}:{fake_port}",
                "--host",
                LOOPBACK,
                "--port",
                str(quota_port),
            ),
            quota_port,
            workdir / "tokentill-quota.log",
        )
        self.bare = Server(
            "bare forwarder",
            python_module_argv(
                "-m", "bench.bare_forwarder", "--host", LOOPBACK, "--port", str(bare_port)
            ),
            bare_port,
            workdir / "bare-forwarder.log",
        )
        scripts = {
            "plain": [request_body(u, stream=False) for u in range(USERS)],
            "stream": [request_body(u, stream=True) for u in range(USERS)],
            "mixed": [request_body(u // 2, stream=u % 2 == 1) for u in range(2 * USERS)],
        }
        self.scripts = {
            mode: wrk_post_script(PATH, bodies, HEADERS, workdir / f"{mode}.lua")
            for mode, bodies in scripts.items()
        }
        self.results = Results()
        self.ledger_ok = True
        self.last_target = ""

    def start(self) -> None:
        env = dict(os.environ)
        self.fake.start(env)
        self.fake.wait_port()
        self.till.start({**env, "TOKENTILL_QUOTAS_ENABLED": "false"})
        self.quota.start({**env, "TOKENTILL_QUOTAS_ENABLED": "true"})
        self.bare.start({**env, "BARE_UPSTREAM": self.upstream_url})
        self.till.wait_http("/healthz")
        self.quota.wait_http("/healthz")
        self.bare.wait_port()
        for path, limits in QUOTA_LIMITS.items():
            status, body = http_request(
                self.quota.port,
                "PUT",
                path,
                json.dumps(limits).encode(),
                headers={"Content-Type": "application/json"},
            )
            if status != 200:
                raise BenchError(f"PUT {path}: HTTP {status} {body[:200]!r}")

    def stop(self) -> None:
        self.results.tokentill_exit = self.till.stop()
        self.quota.stop()
        self.bare.stop()
        self.fake.stop()

    def url(self, target: str) -> str:
        return f"http://{LOOPBACK}:{self.server(target).port}{PATH}"

    def server(self, target: str) -> Server:
        return {"direct": self.fake, "bare": self.bare, "proxy": self.till, "quota": self.quota}[
            target
        ]

    # -- helpers ---------------------------------------------------------------------------

    def clear_ledger(self) -> int | None:
        """Empty the fake's ledger; return how many answers it had billed (None: no ledger)."""
        if not self.ledger_ok:
            return None
        try:
            status, body = http_request(self.fake.port, "DELETE", "/_fake/ledger")
            deleted = json.loads(body)["deleted"] if status == 200 else None
        except (OSError, ValueError, KeyError, TypeError):
            deleted = None
        if not isinstance(deleted, int):
            self.ledger_ok = False
            return None
        return deleted

    def settle(
        self, stable_s: float = 0.3, timeout: float = 60.0, server: Server | None = None
    ) -> None:
        """Until tokentill has served no request for `stable_s` and DuckDB has every event."""
        till = server or self.till
        deadline = time.monotonic() + timeout
        previous = -1.0
        stable_since = time.monotonic()
        while True:
            till.check_alive()
            status, body = http_request(till.port, "GET", "/metrics")
            if status != 200:
                raise BenchError(f"tokentill GET /metrics: HTTP {status}")
            text = body.decode()
            served = prometheus_value(text, "tokentill_proxy_requests_total")
            captured = prometheus_value(text, "tokentill_events_captured_total")
            written = prometheus_value(text, "tokentill_events_written")
            now = time.monotonic()
            if served != previous:
                stable_since = now
            elif written >= captured and now - stable_since >= stable_s:
                return
            if time.monotonic() > deadline:
                raise BenchError(
                    f"tokentill did not settle in {timeout:.0f}s "
                    f"(served {served:.0f}, captured {captured:.0f}, written {written:.0f})"
                )
            previous = served
            time.sleep(0.05)

    def quiesce(self, quiet_s: float = 0.3, timeout: float = 60.0) -> None:
        """Until the fake has billed nothing for `quiet_s`. What it billed since the last
        call is put down to the target that ran last (proxied answers are tallied)."""
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while True:
            count = self.clear_ledger()
            if self.last_target == "proxy":
                self.results.tally.add_upstream(count)
            now = time.monotonic()
            if count:
                quiet_since = now
            elif now - quiet_since >= quiet_s:
                return
            if now > deadline:
                raise BenchError(f"the fake upstream was still billing after {timeout:.0f}s")
            time.sleep(0.05)

    def wrk(self, mode: str, target: str, connections: int, duration: float) -> Run:
        server = self.server(target)
        self.quiesce()
        if target in ("proxy", "quota"):
            self.settle(server=server)
        cpu_before = cpu_seconds(server.pid)
        main_before = main_thread_cpu_seconds(server.pid)
        self.last_target = target
        result = run_wrk(
            self.url(target),
            self.scripts[mode],
            connections=connections,
            duration_s=duration,
        )
        server.check_alive()
        if target in ("proxy", "quota"):
            self.settle(server=server)
        else:
            time.sleep(0.1)
        run = Run(
            mode,
            target,
            result,
            cpu_seconds(server.pid) - cpu_before,
            main_thread_cpu_seconds(server.pid) - main_before,
        )
        self.quiesce()
        if target == "proxy":
            self.results.tally.add_wrk(run)
        return run

    # -- phases ------------------------------------------------------------------------------

    def warm_up(self) -> None:
        for target in TARGETS:
            for mode in MODES:
                self.wrk(mode, target, 16, WARMUP_S)

    def matrix(self) -> None:
        for mode in MODES:
            for connections in CONNECTIONS:
                for target in TARGETS:
                    run = self.wrk(mode, target, connections, self.args.duration)
                    self.results.runs[mode, target, connections] = run
                    print_run(run)

    def ttfb(self) -> None:
        n = self.args.ttfb_requests
        body = request_body(0, stream=True).encode()
        for target in ("direct", "proxy"):
            self.quiesce()
            self.last_target = target
            port = self.till.port if target == "proxy" else self.fake.port
            samples = list(stream_ttfb(port, body, n + 20))[20:]  # the first 20 warm up
            self.results.ttfb_ms[target] = samples
            if target == "proxy":
                self.settle()
                self.results.tally.other_ok += n + 20
            self.quiesce()
        direct, proxied = self.results.ttfb_ms["direct"], self.results.ttfb_ms["proxy"]
        print(
            f"  TTFB stream, {n} sequential: direct p50 {percentile(direct, 50):.2f} / "
            f"p99 {percentile(direct, 99):.2f} ms; proxied p50 {percentile(proxied, 50):.2f} / "
            f"p99 {percentile(proxied, 99):.2f} ms"
        )

    def websocket(self) -> None:
        """WebSocket mode: the same responses created over sockets, direct then proxied."""
        per_socket = max(1, self.args.ws_responses // SOCKETS)
        for target in ("direct", "proxy"):
            self.quiesce()
            server = self.server(target)
            if target == "proxy":
                self.settle()
            self.last_target = target
            before = cpu_seconds(server.pid)
            started = time.perf_counter()
            latencies = asyncio.run(socket_load(server.port, SOCKETS, per_socket))
            wall = time.perf_counter() - started
            if target == "proxy":
                self.settle()
                self.results.tally.other_ok += len(latencies)
            run = SocketRun(target, latencies, wall, cpu_seconds(server.pid) - before)
            self.results.sockets[target] = run
            self.quiesce()
            print(
                f"  WebSocket {target:6} {SOCKETS} sockets: {run.per_s:7,.0f} responses/s, "
                f"p50 {percentile(latencies, 50):.2f} / p99 {percentile(latencies, 99):.2f} ms, "
                f"CPU {run.cpu_us_per_response:5.0f} µs/response"
            )

    def rss(self) -> None:
        """Mixed plain/streamed traffic at 16 connections: RSS after 10k and after N requests."""
        results = self.results
        self.settle()
        results.rss_start_mb = rss_mb(self.till.pid)
        runs = [results.runs.get((m, "proxy", 16)) for m in MODES]
        rps = sum(r.wrk.rps for r in runs if r) / max(1, sum(1 for r in runs if r)) or 500.0
        done = 0
        trail: list[str] = []
        for goal in sorted({min(RSS_FIRST, self.args.rss_requests), self.args.rss_requests}):
            while done < goal:
                # Short first chunks calibrate the rate; wrk runs whole seconds.
                seconds = min(30.0, max(1.0, (goal - done) / rps), 3.0 if not trail else 30.0)
                run = self.wrk("mixed", "proxy", 16, math.ceil(seconds))
                done += run.wrk.requests
                rps = max(run.wrk.rps, 1.0)
                trail.append(f"{done / 1000:.1f}k: {rss_mb(self.till.pid):.1f}")
            results.rss_points.append((done, rss_mb(self.till.pid)))
        print(f"  RSS (MB) after k mixed proxied requests, 16 connections: {', '.join(trail)}")

    def check_rows(self) -> None:
        import duckdb

        conn = duckdb.connect(str(self.db), read_only=True)
        try:
            row = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE http_status BETWEEN 200 AND 299), "
                "count(*) FILTER (WHERE streamed), count(*) FILTER (WHERE client_disconnected) "
                "FROM usage_events"
            ).fetchone()
        finally:
            conn.close()
        if row is None:
            raise BenchError("usage_events: no count")
        self.results.rows = dict(
            zip(("total", "ok", "streamed", "client_disconnected"), map(int, row), strict=True)
        )


async def socket_load(port: int, sockets: int, per_socket: int) -> list[float]:
    """`sockets` Responses WebSockets, each creating `per_socket` responses in a row; the
    milliseconds from each `response.create` to its `response.completed`."""
    from websockets.asyncio.client import connect

    async def one(index: int) -> list[float]:
        out = []
        url = f"ws://{LOOPBACK}:{port}{PATH}"
        async with connect(url, additional_headers=HEADERS, max_size=None) as socket:
            for n in range(per_socket):
                event = json.loads(request_body((index * per_socket + n) % USERS, stream=False))
                started = time.perf_counter()
                await socket.send(json.dumps({"type": "response.create", **event}))
                while True:
                    frame = await socket.recv()
                    if isinstance(frame, str) and (
                        '"response.completed"' in frame or '"type":"error"' in frame
                    ):
                        break
                out.append((time.perf_counter() - started) * 1000)
        return out

    done = await asyncio.gather(*(one(i) for i in range(sockets)))
    return [latency for run in done for latency in run]


def stream_ttfb(port: int, body: bytes, n: int) -> Iterator[float]:
    """Time (ms) from sending a streamed request to its first body byte, n times in a row
    on one keep-alive connection; each stream is read to its end before the next."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    try:
        for _ in range(n):
            started = time.perf_counter()
            conn.request("POST", PATH, body=body, headers=HEADERS)
            resp = conn.getresponse()
            first = resp.read(1)
            elapsed = (time.perf_counter() - started) * 1000
            rest = resp.read()
            if resp.status != 200 or not first or b"response.completed" not in rest:
                raise BenchError(f"TTFB request on port {port}: HTTP {resp.status}, {rest[:200]!r}")
            yield elapsed
    finally:
        conn.close()


# -- the quota book, in-process --------------------------------------------------------------


def quota_book_benchmark(results: Results, workdir: Path, n: int) -> None:
    """What quotas add to one request, without the noise of the HTTP runs: admission and
    settlement through the real QuotaBook, priced from the published catalog, against a
    default limit of each unit and a tag limit (as the `quota` target is set up), and the
    same request's forwarding-free baseline: parsing its body, which the proxy does anyway."""
    from tokentill.ingest.capture import RequestFacts, now_us
    from tokentill.warehouse.db import open_warehouse
    from tokentill.warehouse.events import UsageEvent
    from tokentill.warehouse.live_prices import PriceBook
    from tokentill.warehouse.prices import price_table, seed_published
    from tokentill.warehouse.quota_book import Limit, QuotaBook, QuotaConfig, tag_subject

    conn = open_warehouse(workdir / "quota-book.duckdb")
    seed_published(conn)
    prices = PriceBook.build(price_table(conn), "gpt-image-1")
    conn.close()
    book = QuotaBook(QuotaConfig(), prices, lambda alert: None)
    book.set_limits(
        None,
        [
            Limit("usd", "day", 10**24),
            Limit("tokens", "minute", 10**15),
            Limit("requests", "month", 10**12, "soft"),
        ],
    )
    book.set_limits(tag_subject("team", "bench"), [Limit("usd", "total", 10**24)])
    bodies = [request_body(u, stream=False).encode() for u in range(USERS)]
    parsed = [json.loads(b) for b in bodies]

    def one_pass() -> tuple[float, float, float]:
        """µs per request: admission, settlement, and json.loads of the body (a yardstick:
        the proxy parses every metered body anyway). Facts and events are built beforehand:
        the proxy builds them with quotas off too."""
        facts = [
            RequestFacts(
                endpoint="responses",
                kind="create",
                started_us=now_us(),
                started_perf=0.0,
                requested_model="gpt-4o-mini",
                user_id=parsed[i % USERS]["user"],
            )
            for i in range(n)
        ]
        events = [
            UsageEvent(
                kind="create",
                event_id="resp_x",
                endpoint="responses",
                status="completed",
                created_at_us=f.started_us,
                request_started_at_us=f.started_us,
                recorded_at_us=f.started_us,
                model="gpt-4o-mini-2024-07-18",
                input_tokens=120,
                cached_input_tokens=0,
                cache_write_tokens=0,
                output_tokens=80,
                total_tokens=200,
            )
            for f in facts
        ]
        start = time.perf_counter()
        held = [book.admit(f, parsed[i % USERS], bodies[i % USERS]) for i, f in enumerate(facts)]
        admitted = time.perf_counter()
        for event, reservation in zip(events, held, strict=True):
            book.settle(event, reservation)
        settled = time.perf_counter()
        for i in range(n):
            json.loads(bodies[i % USERS])
        parsed_at = time.perf_counter()
        return (
            (admitted - start) / n * 1e6,
            (settled - admitted) / n * 1e6,
            (parsed_at - settled) / n * 1e6,
        )

    one_pass()  # warm up
    passes = [one_pass() for _ in range(3)]
    admit, settle, yardstick = (min(p[k] for p in passes) for k in range(3))
    results.quota_book_us = admit + settle
    print(
        f"  quota book: admission {admit:.1f} µs + settlement {settle:.1f} µs per request "
        f"(in-process, {n:,} requests, a user and a tag with limits; json.loads of the "
        f"same body: {yardstick:.1f} µs)"
    )


# -- the writer, in-process ------------------------------------------------------------------


def writer_benchmark(results: Results, workdir: Path, n: int) -> None:
    """Journal -> Writer -> DuckDB in this process, as `tokentill serve` wires them, twice on
    fresh files: the writer alone (the events journaled and queued first, then the writer
    started and timed until all are committed), and concurrently (the writer running while
    the events are journaled, timed from the first append until all are committed)."""
    from tokentill.ingest.journal import Journal
    from tokentill.warehouse.db import open_warehouse
    from tokentill.warehouse.duckdb_file import DuckDBEvents
    from tokentill.warehouse.events import UsageEvent, key_fingerprint
    from tokentill.warehouse.writer import Writer

    now = time.time_ns() // 1000
    event = UsageEvent(
        kind="create",
        event_id="",
        endpoint="responses",
        status="completed",
        created_at_us=now,
        request_started_at_us=now,
        recorded_at_us=now,
        model="gpt-4o-mini-2024-07-18",
        requested_model="gpt-4o-mini",
        http_status=200,
        user_source="user",
        metadata='{"team":"bench"}',
        input_tokens=14,
        cached_input_tokens=0,
        cache_write_tokens=0,
        cache_write_30m_tokens=0,
        cache_write_12h_tokens=0,
        output_tokens=90,
        reasoning_tokens=0,
        total_tokens=104,
        service_tier="default",
        completed_at_us=now,
        latency_ms=3.25,
        ttft_ms=3.1,
        key_fingerprint=key_fingerprint("Bearer sk-bench"),
    )
    ids = [f"resp_bench{i:012d}" for i in range(n)]
    users = [f"bench-user-{u}" for u in range(USERS)]

    def one(alone: bool) -> WriterRun:
        directory = workdir / ("writer-alone" if alone else "writer-concurrent")
        conn = open_warehouse(directory / "writer.duckdb")
        journal = Journal(directory / "journal", segment_bytes=64 << 20, fsync_interval=0.05)
        journal.lock()
        writer = Writer(DuckDBEvents(conn), journal, batch_max=20_000, flush_interval=0.25)
        writer.recover()
        journal.start(writer.submit)  # every append is queued for the writer
        if not alone:
            writer.start()
        try:
            first_append = time.perf_counter()
            for i, event_id in enumerate(ids):
                event.event_id = event.response_id = event_id
                event.user_id = users[i % USERS]
                journal.append(event)
            appended = time.perf_counter()
            backlog = writer.backlog
            timed_from = first_append
            if alone:
                timed_from = time.perf_counter()
                writer.start()
            if not writer.flush(timeout=600):
                raise BenchError(f"writer benchmark: {writer.backlog} events not committed in 600s")
            finished = time.perf_counter()
        finally:
            writer.stop()
            journal.close()
        row = conn.execute("SELECT count(*) FROM usage_events").fetchone()
        conn.close()
        return WriterRun(
            events=n,
            rows=int(row[0]) if row else 0,
            append_s=appended - first_append,
            commit_s=finished - timed_from,
            backlog=backlog,
            tail_s=finished - appended,
        )

    for name, alone in (("alone", True), ("concurrent", False)):
        run = one(alone)
        results.writer[name] = run
        print(
            f"  {name:10} {run.events:,} events: journaled in {run.append_s:.2f} s, "
            f"{run.events_per_s:,.0f} events/s committed ({run.commit_s:.2f} s), "
            f"{run.rows:,} rows"
        )


# -- reporting -------------------------------------------------------------------------------


def print_run(run: Run) -> None:
    w = run.wrk
    who = {"direct": "upstream", "bare": "bare fwd", "proxy": "tokentill", "quota": "+quotas"}[
        run.target
    ]
    extra = f", non-2xx {w.non_2xx}" if w.non_2xx else ""
    extra += f", socket errors {w.socket_errors}" if w.errors else ""
    print(
        f"  {run.mode:6} {run.target:6} c={w.connections:<3} {w.rps:9,.0f} req/s  "
        f"p50 {w.p50:7.2f} ms  p99 {w.p99:7.2f} ms  "
        f"{who:9} CPU {run.cpu_us_per_request:5.0f} µs/req "
        f"(loop {run.main_cpu_us_per_request:4.0f})  {w.requests:,} requests{extra}"
    )


def cpu_per_request(results: Results, mode: str, target: str = "proxy") -> float:
    """CPU µs per request of `target`'s server over all connection counts of `mode`."""
    runs = [results.runs[mode, target, c] for c in CONNECTIONS]
    return sum(r.cpu_s for r in runs) / max(1, sum(r.wrk.requests for r in runs)) * 1e6


def data_verdict(results: Results) -> tuple[bool, str]:
    """Did every proxied response land in DuckDB, exactly once?"""
    t, rows = results.tally, results.rows
    answered = t.wrk_ok + t.other_ok
    in_flight = rows["total"] - answered
    if t.upstream is not None:
        # Exact: one row per answer the upstream gave through the proxy. wrk counts fewer:
        # requests in flight when it stopped were answered (and captured) after it left.
        ok = rows["ok"] == t.upstream and rows["total"] == t.upstream + t.wrk_non_2xx
        ok = ok and 0 <= in_flight <= t.connections
        how = f"upstream billed {t.upstream:,}"
    else:
        ok = 0 <= in_flight <= t.connections + t.wrk_non_2xx
        how = "fake's ledger unavailable: checked against wrk only"
    text = (
        f"{rows['total']:,} rows = {answered:,} 2xx counted by clients "
        f"+ {in_flight:,} in flight at wrk's cut-off ({how}; "
        f"wrk non-2xx {t.wrk_non_2xx}, socket errors {t.socket_errors})"
    )
    return ok, text


def report(bench: Bench) -> bool:
    results = bench.results
    args = bench.args
    broken = False
    rows: list[list[str]] = []
    print("\n== Results ==")
    for mode in MODES:
        for c in CONNECTIONS:
            d = results.runs[mode, "direct", c].wrk
            p = results.runs[mode, "proxy", c].wrk
            add50, add99, ratio = p.p50 - d.p50, p.p99 - d.p99, p.rps / d.rps
            if c == 1:
                ok = add50 < ADDED_P50_MS and add99 < ADDED_P99_MS
                target = f"added p50 < {ADDED_P50_MS:g} ms, p99 < {ADDED_P99_MS:g} ms"
            else:
                ok = ratio >= MIN_RATIO
                target = f"req/s ≥ {MIN_RATIO:.0%} of direct"
            print(
                f"  {mode:6} c={c:<3} added p50 {add50:+6.2f} ms  p99 {add99:+7.2f} ms  "
                f"throughput proxy/direct {ratio:5.1%}   [{target}] {verdict(ok)}"
            )
            rows.append(
                [
                    f"{mode}, {c} conn",
                    f"{d.rps:,.0f} req/s, {d.p50:.2f}/{d.p99:.2f} ms",
                    f"{p.rps:,.0f} req/s, {p.p50:.2f}/{p.p99:.2f} ms",
                    f"{add50:+.2f}/{add99:+.2f} ms, {ratio:.0%} of req/s",
                    target,
                    verdict(ok),
                ]
            )

    bare_rows: list[list[str]] = []
    for mode in MODES:
        for c in CONNECTIONS:
            b, p = results.runs[mode, "bare", c], results.runs[mode, "proxy", c]
            overhead = p.cpu_us_per_request - b.cpu_us_per_request
            share = p.wrk.rps / b.wrk.rps
            add50, add99 = p.wrk.p50 - b.wrk.p50, p.wrk.p99 - b.wrk.p99
            print(
                f"  {mode:6} c={c:<3} vs bare forwarder ({b.wrk.rps:,.0f} req/s, "
                f"{b.wrk.p50:.2f}/{b.wrk.p99:.2f} ms, {b.cpu_us_per_request:.0f} µs CPU/req): "
                f"metering overhead {overhead:+.0f} µs CPU/req, throughput tokentill/bare "
                f"{share:5.1%}, added p50 {add50:+.2f} ms, p99 {add99:+.2f} ms"
            )
            bare_rows.append(
                [
                    f"{mode}, {c} conn",
                    f"{b.wrk.rps:,.0f} req/s, {b.wrk.p50:.2f}/{b.wrk.p99:.2f} ms, "
                    f"{b.cpu_us_per_request:.0f} µs",
                    f"{p.wrk.rps:,.0f} req/s, {p.wrk.p50:.2f}/{p.wrk.p99:.2f} ms, "
                    f"{p.cpu_us_per_request:.0f} µs",
                    f"{overhead:+.0f} µs CPU/req, {share:.0%} of bare req/s, "
                    f"{add50:+.2f}/{add99:+.2f} ms",
                ]
            )
    for mode in MODES:
        bare_cpu, till_cpu = cpu_per_request(results, mode, "bare"), cpu_per_request(results, mode)
        bare_rows.append(
            [
                f"{mode}, CPU per request (all conn)",
                f"{bare_cpu:.0f} µs",
                f"{till_cpu:.0f} µs",
                f"{till_cpu - bare_cpu:+.0f} µs CPU/req",
            ]
        )

    direct, proxied = results.ttfb_ms["direct"], results.ttfb_ms["proxy"]
    t = [percentile(v, q) for v in (direct, proxied) for q in (50, 99)]
    print(
        f"  TTFB stream ({args.ttfb_requests} sequential): direct {t[0]:.2f}/{t[1]:.2f} ms, "
        f"proxied {t[2]:.2f}/{t[3]:.2f} ms, added p50 {t[2] - t[0]:+.2f} ms, "
        f"p99 {t[3] - t[1]:+.2f} ms"
    )
    rows.append(
        [
            "stream TTFB, sequential",
            f"{t[0]:.2f}/{t[1]:.2f} ms",
            f"{t[2]:.2f}/{t[3]:.2f} ms",
            f"{t[2] - t[0]:+.2f}/{t[3] - t[1]:+.2f} ms",
            "—",
            "—",
        ]
    )

    cpu_plain, cpu_stream = cpu_per_request(results, "plain"), cpu_per_request(results, "stream")
    ok = cpu_plain < MAX_CPU_US
    print(
        f"  proxy CPU per request (all connection counts): plain {cpu_plain:.0f} µs, "
        f"streamed {cpu_stream:.0f} µs   [plain < {MAX_CPU_US:.0f} µs] {verdict(ok)}"
    )
    rows.append(
        [
            "tokentill CPU per request",
            "—",
            f"plain {cpu_plain:.0f} µs, stream {cpu_stream:.0f} µs",
            "—",
            f"plain < {MAX_CPU_US:.0f} µs",
            verdict(ok),
        ]
    )
    bare_plain = cpu_per_request(results, "plain", "bare")
    bare_stream = cpu_per_request(results, "stream", "bare")
    print(
        f"  bare forwarder CPU per request (all connection counts): plain {bare_plain:.0f} µs, "
        f"streamed {bare_stream:.0f} µs; tokentill's metering overhead over it: "
        f"plain {cpu_plain - bare_plain:+.0f} µs, streamed {cpu_stream - bare_stream:+.0f} µs"
    )

    (n1, r1), (n2, r2) = results.rss_points[0], results.rss_points[-1]
    growth = r2 - r1
    ok = growth < MAX_RSS_GROWTH * r1
    print(
        f"  tokentill RSS: {results.rss_start_mb:.1f} MB before, {r1:.1f} MB after {n1:,}, "
        f"{r2:.1f} MB after {n2:,} requests: {growth:+.1f} MB ({growth / r1:+.1%}); "
        f"peak (VmHWM) {results.peak_rss_mb:.1f} MB   [growth < {MAX_RSS_GROWTH:.0%}] "
        f"{verdict(ok)}"
    )
    rows.append(
        [
            f"tokentill RSS, {n1 // 1000}k → {n2 // 1000}k requests",
            "—",
            f"{r1:.1f} → {r2:.1f} MB (peak {results.peak_rss_mb:.1f} MB)",
            f"{growth:+.1f} MB ({growth / r1:+.1%})",
            f"growth < {MAX_RSS_GROWTH:.0%}",
            verdict(ok),
        ]
    )

    alone, concurrent = results.writer["alone"], results.writer["concurrent"]
    ok = alone.events_per_s > MIN_WRITER_EPS
    rows_ok = alone.rows == alone.events and concurrent.rows == concurrent.events
    broken |= not rows_ok
    print(
        f"  writer alone: {alone.events:,} events journaled first, then the writer started: "
        f"all committed {alone.commit_s:.2f} s after its start: {alone.events_per_s:,.0f} "
        f"events/s   [writer alone > {MIN_WRITER_EPS:,.0f}/s] {verdict(ok)}"
    )
    print(
        f"  writer concurrent with journaling: {concurrent.events:,} events journaled in "
        f"{concurrent.append_s:.2f} s, all committed {concurrent.commit_s:.2f} s after the "
        f"first append: {concurrent.events_per_s:,.0f} events/s ({concurrent.backlog:,} "
        f"still queued when the appends ended, drained in {concurrent.tail_s:.2f} s)"
    )
    print(
        f"  writer rows: alone {alone.rows:,}, concurrent {concurrent.rows:,} "
        f"{'OK' if rows_ok else 'MISMATCH'}"
    )
    rows.append(
        [
            "writer → DuckDB (in-process), alone",
            "—",
            f"{alone.events_per_s:,.0f} events/s "
            f"(concurrent with journaling: {concurrent.events_per_s:,.0f})",
            "—",
            f"writer alone > {MIN_WRITER_EPS:,.0f}/s",
            verdict(ok),
        ]
    )

    data_ok, text = data_verdict(results)
    broken |= not data_ok
    print(f"  captured: {text}   {'OK' if data_ok else 'MISMATCH'}")
    print(
        f"  rows: {results.rows['streamed']:,} streamed, "
        f"{results.rows['client_disconnected']:,} marked client_disconnected"
    )
    rows.append(
        [
            "proxied responses → rows",
            "—",
            f"{results.rows['total']:,} rows",
            f"{results.rows['total'] - results.tally.wrk_ok - results.tally.other_ok:+,} "
            "(in flight at cut-off)",
            "none lost",
            "PASS" if data_ok else "FAIL",
        ]
    )
    exit_ok = results.tokentill_exit == 0
    broken |= not exit_ok
    print(f"  tokentill exit code after SIGTERM: {results.tokentill_exit}")

    quota_rows = quota_comparison(results)

    print(f"\n== For the README (wrk -t1, {args.duration:g} s per run, {machine()}) ==\n")
    print(
        markdown_table(
            ["Case", "Direct", "Through tokentill", "Difference", "Target", "Result"], rows
        )
    )
    print(
        "\ntokentill vs a bare forwarder (bench/bare_forwarder.py: uvicorn + the same HTTP "
        "client, no metering); req/s, p50/p99 latency, server CPU per request:\n"
    )
    print(
        markdown_table(
            ["Case", "Bare forwarder", "Through tokentill", "Metering overhead"], bare_rows
        )
    )
    print(
        "\nQuota checks: tokentill with quotas off vs on (a default limit of each unit and a "
        "tag limit on every request; each server has its own DuckDB); req/s, p50/p99, CPU:\n"
    )
    print(markdown_table(["Case", "Quotas off", "Quotas on", "Difference"], quota_rows))
    if results.sockets:
        print(
            f"\nThe Responses API's WebSocket mode ({SOCKETS} sockets, each creating responses "
            "one after another); per response:\n"
        )
        print(
            markdown_table(
                ["Case", "Direct", "Through tokentill", "Difference"], socket_rows(results)
            )
        )
    return not broken


def socket_rows(results: Results) -> list[list[str]]:
    direct, proxied = results.sockets["direct"], results.sockets["proxy"]
    stream = cpu_per_request(results, "stream")

    def cell(run: SocketRun) -> str:
        lat = run.latencies_ms
        return (
            f"{run.per_s:,.0f} responses/s, {percentile(lat, 50):.2f}/{percentile(lat, 99):.2f} "
            f"ms, {run.cpu_us_per_response:.0f} µs CPU"
        )

    added = proxied.cpu_us_per_response
    return [
        [
            f"{direct.responses:,} responses",
            cell(direct),
            cell(proxied),
            f"{proxied.per_s / direct.per_s:.0%} of responses/s, "
            f"{percentile(proxied.latencies_ms, 50) - percentile(direct.latencies_ms, 50):+.2f} "
            "ms p50",
        ],
        [
            "tokentill's CPU per response: socket vs HTTP stream",
            "—",
            f"{added:.0f} µs (socket) vs {stream:.0f} µs (HTTP stream)",
            f"{added / stream:.2f}x",
        ],
    ]


def quota_comparison(results: Results) -> list[list[str]]:
    """Quotas on vs off, measured in the same run: ratios, not absolute figures."""
    rows = []
    for mode in MODES:
        for c in CONNECTIONS:
            off, on = results.runs[mode, "proxy", c], results.runs[mode, "quota", c]
            ratio = on.wrk.rps / off.wrk.rps
            add50, add99 = on.wrk.p50 - off.wrk.p50, on.wrk.p99 - off.wrk.p99
            cpu = on.cpu_us_per_request - off.cpu_us_per_request
            print(
                f"  {mode:6} c={c:<3} quotas on/off: throughput {ratio:5.1%}, p50 {add50:+.2f} "
                f"ms, p99 {add99:+.2f} ms, CPU {cpu:+.0f} µs/req"
            )
            rows.append(
                [
                    f"{mode}, {c} conn",
                    f"{off.wrk.rps:,.0f} req/s, {off.wrk.p50:.2f}/{off.wrk.p99:.2f} ms, "
                    f"{off.cpu_us_per_request:.0f} µs",
                    f"{on.wrk.rps:,.0f} req/s, {on.wrk.p50:.2f}/{on.wrk.p99:.2f} ms, "
                    f"{on.cpu_us_per_request:.0f} µs",
                    f"{ratio:.0%} of req/s, {add50:+.2f}/{add99:+.2f} ms, {cpu:+.0f} µs CPU/req",
                ]
            )
    rows.append(
        [
            "admission + settlement, in-process",
            "—",
            f"{results.quota_book_us:.1f} µs",
            f"{results.quota_book_us:+.1f} µs CPU/req",
        ]
    )
    for mode in MODES:
        off, on = cpu_per_request(results, mode), cpu_per_request(results, mode, "quota")
        rows.append(
            [
                f"{mode}, CPU per request (all conn)",
                f"{off:.0f} µs",
                f"{on:.0f} µs",
                f"{on - off:+.0f} µs CPU/req ({on / off - 1:+.1%})",
            ]
        )
    return rows


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}"


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--rss-requests", type=int, default=100_000)
    parser.add_argument("--ttfb-requests", type=int, default=300)
    parser.add_argument("--writer-events", type=int, default=200_000)
    parser.add_argument(
        "--ws-responses", type=int, default=4_000, help="responses over WebSocket, per target"
    )
    parser.add_argument(
        "--wire", default="compact", help="how the fake spells its answers (compact, spaced, ...)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, DB)")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.rss_requests < 1 or args.ttfb_requests < 1:
        parser.error("--duration, --rss-requests and --ttfb-requests must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = make_workdir("tokentill-bench-")
    wrk_version = subprocess.run(
        [find_wrk(), "-v"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    print(f"tokentill proxy benchmark: {machine()}; {wrk_version[0] if wrk_version else 'wrk'}")
    print(
        f"workdir {workdir}; wrk -t1, {args.duration:g} s per run, after a {WARMUP_S:g} s warm-up"
    )
    print(f"load average before: {load_average()} (anything else running skews the figures)")
    bench = Bench(workdir, args)
    ok = False
    try:
        bench.start()
        print("\n== wrk: POST /v1/responses, direct vs a bare forwarder vs through tokentill ==")
        bench.warm_up()
        bench.matrix()
        print("\n== time to first byte, RSS ==")
        bench.ttfb()
        print("\n== the Responses API's WebSocket mode ==")
        bench.websocket()
        bench.rss()
        bench.settle()
        bench.results.peak_rss_mb = peak_rss_mb(bench.till.pid)
        bench.stop()
        if bench.results.tokentill_exit != 0:
            print(f"tokentill log:\n{bench.till.log_tail()}", file=sys.stderr)
        bench.check_rows()
        print("\n== writer micro-benchmark ==")
        writer_benchmark(bench.results, workdir, args.writer_events)
        print("\n== quota book micro-benchmark ==")
        quota_book_benchmark(bench.results, workdir, 100_000)
        ok = report(bench)
    except BenchError as exc:
        print(f"\nBROKEN: {exc}", file=sys.stderr)
    finally:
        bench.stop()
        if ok and not args.keep:
            remove_workdir(workdir)
        else:
            print(f"(logs and data kept in {workdir})", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
