"""The cluster's cost: proxies on a DuckLake (PostgreSQL catalog) against the one
process on its DuckDB file, measured in one run on this machine.

One run starts a throwaway PostgreSQL and the fake upstream, then measures in turn:

- **embedded, N processes** for N = 1, 2, 3: N one-process tokentills, each on its own
  file, driven at once (the baseline for N: the same load on the same shared cores,
  without a lake);
- **lake, N proxies**, with one worker (rollups every `--rollup-interval` seconds):
  wrk drives every proxy at once, `--connections` each, for `--duration` seconds.

For each: per proxy, requests/s, CPU per request (utime + stime from /proc over the
run), and the latency it adds to a direct request (p50/p99); the lake writer's commit
p50/p99 and the conflicts it retried (from /metrics); then, with the load stopped, the
time from a response's last byte to its row being readable in the lake, and to its
cost being in the rollups; and that the lake holds exactly the responses wrk got.

Targets (checked as ratios against the same run's figures, PASS/MISS): a proxy on the
lake costs at most 1.2x the CPU per request of an embedded process under the same load
(N of them at once); a row is readable within 2 s (p99) of its response; the rollups
are current within 2 rollup intervals; no commit is lost to a conflict (every response
the upstream billed is one row). The cores are shared by everything here (two of
them), so the per-proxy figures are what each proxy costs, not what a fleet of machines
would serve: the report says how the total grows and what is shared first.

    python -m bench.cluster [--duration 10] [--connections 8] [--proxies 1,2,3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from bench._common import (
    LOOPBACK,
    BenchError,
    Postgres,
    Redis,
    Server,
    WrkResult,
    cpu_seconds,
    fake_upstream_server,
    free_port,
    http_request,
    make_workdir,
    markdown_table,
    percentile,
    postgres_cluster,
    prometheus_value,
    python_module_argv,
    redis_server,
    remove_workdir,
    run_wrk,
    verdict,
    wrk_post_script,
)

PATH = "/v1/responses"
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
CPU_TARGET = 1.2
READABLE_TARGET_S = 2.0
PROBES = 40


def body(user: int) -> str:
    return json.dumps(
        {"model": "gpt-4o-mini", "input": "Say hello.", "user": f"bench-{user}"},
        separators=(",", ":"),
    )


@dataclass
class ProxyFigures:
    name: str
    wrk: WrkResult
    cpu_s: float

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s / max(1, self.wrk.ok) * 1e6


@dataclass
class Setup:
    label: str
    proxies: list[ProxyFigures] = field(default_factory=list)
    commit_p50_ms: float = 0.0
    commit_p99_ms: float = 0.0
    commits: int = 0
    conflicts: int = 0
    readable_ms: list[float] = field(default_factory=list)
    rolled_up_s: float | None = None
    rows: int = 0
    distinct: int = 0
    billed: int = 0
    baseline: Setup | None = None  # the embedded run with as many processes

    @property
    def cpu_us(self) -> float:
        return sum(p.cpu_us_per_request for p in self.proxies) / max(1, len(self.proxies))

    @property
    def rps(self) -> float:
        return sum(p.wrk.rps for p in self.proxies)


class Cluster:
    def __init__(self, workdir: Path, args: argparse.Namespace, postgres: Postgres) -> None:
        self.workdir = workdir
        self.args = args
        self.postgres = postgres
        self.fake = fake_upstream_server(workdir)
        self.upstream = f"http://{LOOPBACK}:{self.fake.port}"
        self.script = wrk_post_script(
            PATH, [body(u) for u in range(50)], HEADERS, workdir / "plain.lua"
        )

    def serve(self, name: str, role: str = "all", **env: str) -> Server:
        port = free_port()
        home = self.workdir / name
        home.mkdir(exist_ok=True)
        argv = ["-m", "tokentill", "serve", "--db", str(home / "w.duckdb")]
        argv += ["--upstream", self.upstream, "--port", str(port)]
        if role != "all":
            argv += ["--role", role]
        server = Server(name, python_module_argv(*argv), port, home / "serve.log")
        environment = {k: v for k, v in os.environ.items() if not k.startswith("TOKENTILL_")}
        environment.update(
            {
                "TOKENTILL_QUOTAS_ENABLED": "false",
                **{f"TOKENTILL_{k.upper()}": v for k, v in env.items()},
            }
        )
        server.start(environment)
        server.wait_http("/healthz", timeout=120)
        return server

    def load(
        self, servers: list[Server], label: str, duration: float | None = None
    ) -> list[ProxyFigures]:
        """wrk on every proxy at once; the CPU each spent over the run."""
        import concurrent.futures

        before = {s.name: cpu_seconds(s.pid) for s in servers}
        with concurrent.futures.ThreadPoolExecutor(len(servers)) as pool:
            runs = {
                s.name: pool.submit(
                    run_wrk,
                    f"http://{LOOPBACK}:{s.port}",
                    self.script,
                    connections=self.args.connections,
                    duration_s=duration or self.args.duration,
                )
                for s in servers
            }
            results = {name: future.result() for name, future in runs.items()}
        figures = []
        for s in servers:
            spent = cpu_seconds(s.pid) - before[s.name]
            figures.append(ProxyFigures(s.name, results[s.name], spent))
            if results[s.name].errors:
                print(f"  {label} {s.name}: {results[s.name].errors} errors", file=sys.stderr)
        return figures


def lake_reader(catalog: str, data: str, workdir: Path) -> duckdb.DuckDBPyConnection:
    from tokentill.warehouse.lake import LakeConfig, connect

    return connect(LakeConfig(catalog, data, "bench-reader", workdir / "reader-extensions"))


def probe_readable(
    reader: duckdb.DuckDBPyConnection, proxy: Server, rollup_interval: float
) -> tuple[list[float], float | None]:
    """Sequential responses: from each one's last byte to its row in the lake; then to
    the rollups covering every row."""
    waits: list[float] = []
    for i in range(PROBES):
        user = f"probe-{uuid.uuid4().hex[:8]}-{i}"
        status, raw = http_request(
            proxy.port,
            "POST",
            PATH,
            body=json.dumps({"model": "gpt-4o-mini", "input": "x", "user": user}).encode(),
            headers=HEADERS,
        )
        done = time.monotonic()
        if status != 200:
            raise BenchError(f"probe answered {status}: {raw[:200]!r}")
        response_id = json.loads(raw)["id"]
        while not reader.execute(
            "SELECT count(*) FROM usage_events WHERE response_id = ?", [response_id]
        ).fetchone()[0]:  # type: ignore[index]
            if time.monotonic() - done > 30:
                raise BenchError(f"{response_id} not readable after 30 s")
            time.sleep(0.01)
        waits.append((time.monotonic() - done) * 1000)
    last = time.monotonic()
    deadline = last + 10 * rollup_interval
    while time.monotonic() < deadline:
        row = reader.execute(
            """SELECT (SELECT count(*) FROM usage_events WHERE created_at IS NOT NULL),
                      (SELECT coalesce(sum(requests), 0) FROM usage_hourly)"""
        ).fetchone()
        if row and row[0] == row[1]:
            return waits, time.monotonic() - last
        time.sleep(0.05)
    return waits, None


def metrics_of(server: Server) -> str:
    _, raw = http_request(server.port, "GET", "/metrics")
    return raw.decode()


@dataclass
class QuotaFigures:
    """The largest N's lake run again with every request held to a limit in Redis."""

    setup: Setup
    without: Setup  # the same N on the lake, quotas off
    redis_cpu_s: float
    refused: int

    @property
    def redis_us_per_request(self) -> float:
        requests = sum(p.wrk.ok for p in self.setup.proxies)
        return self.redis_cpu_s / max(1, requests) * 1e6


def quota_run(
    bench: Cluster, n: int, args: argparse.Namespace, redis: Redis, without: Setup
) -> QuotaFigures:
    catalog = bench.postgres.new_database(f"quota{n}")
    data = str(bench.workdir / f"quota{n}") + "/"
    common = {
        "lake_catalog": catalog,
        "lake_data": data,
        "quotas_enabled": "true",
        "redis_url": redis.url,
    }
    worker = bench.serve(f"qworker{n}", "worker", instance_id=f"qworker{n}", **common)
    api = bench.serve(f"qapi{n}", "api", instance_id=f"qapi{n}", **common)
    # Every bench user is held to the default limits (generous: none is reached), so
    # each request is admitted and settled by Redis's scripts.
    limits = {
        "limits": [
            {"limit_usd": "100000", "period": "day"},
            {"limit_tokens": 10**15, "period": "month"},
            {"limit_requests": 10**12, "period": "minute"},
        ]
    }
    status, raw = http_request(
        api.port,
        "PUT",
        "/api/quotas/default",
        body=json.dumps(limits).encode(),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    if status != 200:
        raise BenchError(f"setting the default limits: {status} {raw[:200]!r}")
    proxies = [
        bench.serve(f"qproxy{n}-{i}", "proxy", instance_id=f"qproxy{n}-{i}", **common)
        for i in range(n)
    ]
    setup = Setup(f"lake + Redis quotas, {n} prox{'y' if n == 1 else 'ies'}")
    try:
        assert redis.proc is not None
        # Warmed up first: each user's windows are read from the lake once, at its first
        # request (its cost is a first request's, stated in docs/quotas.md), then live.
        started = time.monotonic()
        bench.load(proxies, "warm-up", duration=3)
        warm = time.monotonic() - started
        print(f"  quotas: warmed up 50 users on {n} proxies in {warm:.1f} s")
        before = cpu_seconds(redis.proc.pid)
        setup.proxies = bench.load(proxies, setup.label)
        redis_cpu = cpu_seconds(redis.proc.pid) - before
        refused = sum(p.wrk.errors for p in setup.proxies)
    finally:
        for server in [*proxies, api, worker]:
            server.stop()
    return QuotaFigures(setup, without, redis_cpu, refused)


def run(args: argparse.Namespace) -> tuple[list[Setup], WrkResult | None, QuotaFigures | None]:
    workdir = make_workdir("tokentill-bench-cluster-")
    setups: list[Setup] = []
    direct: WrkResult | None = None
    quotas: QuotaFigures | None = None
    try:
        with postgres_cluster() as postgres:
            bench = Cluster(workdir, args, postgres)
            bench.fake.start()
            bench.fake.wait_port()
            try:
                direct = run_wrk(
                    bench.upstream,
                    bench.script,
                    connections=args.connections,
                    duration_s=args.duration,
                )
                for n in args.proxies:
                    baseline = embedded_run(bench, n)
                    setups.append(baseline)
                    lake = lake_run(bench, n, args)
                    lake.baseline = baseline
                    setups.append(lake)
                largest = max(args.proxies)
                without = next(s for s in setups if s.baseline and len(s.proxies) == largest)
                with redis_server() as redis:
                    quotas = quota_run(bench, largest, args, redis, without)
            finally:
                bench.fake.stop()
    finally:
        remove_workdir(workdir)
    return setups, direct, quotas


def embedded_run(bench: Cluster, n: int) -> Setup:
    servers = [bench.serve(f"embedded{n}-{i}") for i in range(n)]
    setup = Setup(f"embedded, {n} process{'' if n == 1 else 'es'}")
    try:
        setup.proxies = bench.load(servers, setup.label)
    finally:
        for server in servers:
            server.stop()
    return setup


def clear_ledger(bench: Cluster) -> int:
    status, raw = http_request(bench.fake.port, "DELETE", "/_fake/ledger", timeout=60)
    if status != 200:
        raise BenchError(f"the fake's ledger: {status}")
    return int(json.loads(raw)["deleted"])


def lake_run(bench: Cluster, n: int, args: argparse.Namespace) -> Setup:
    catalog = bench.postgres.new_database(f"bench{n}")
    data = str(bench.workdir / f"lake{n}") + "/"
    common = {"lake_catalog": catalog, "lake_data": data}
    worker = bench.serve(
        f"worker{n}",
        "worker",
        instance_id=f"worker{n}",
        rollup_interval=str(args.rollup_interval),
        **common,
    )
    proxies = [
        bench.serve(f"proxy{n}-{i}", "proxy", instance_id=f"proxy{n}-{i}", **common)
        for i in range(n)
    ]
    setup = Setup(f"lake, {n} prox{'y' if n == 1 else 'ies'}")
    clear_ledger(bench)
    try:
        setup.proxies = bench.load(proxies, setup.label)
        texts = [metrics_of(p) for p in proxies]
        setup.commits = int(sum(prometheus_value(t, "tokentill_lake_commits") for t in texts))
        setup.conflicts = int(sum(prometheus_value(t, "tokentill_lake_conflicts") for t in texts))
        setup.commit_p50_ms = 1000 * max(
            prometheus_value(t, "tokentill_lake_commit_p50_seconds") for t in texts
        )
        setup.commit_p99_ms = 1000 * max(
            prometheus_value(t, "tokentill_lake_commit_p99_seconds") for t in texts
        )
        reader = lake_reader(catalog, data, bench.workdir)
        try:
            setup.readable_ms, setup.rolled_up_s = probe_readable(
                reader, proxies[0], args.rollup_interval
            )
            for p in proxies:  # drain every journal before counting
                p.stop()
            row = reader.execute(
                "SELECT count(*), count(DISTINCT response_id) FROM usage_events"
            ).fetchone()
            setup.rows, setup.distinct = (int(row[0]), int(row[1])) if row else (0, 0)
        finally:
            reader.close()
        # Every response the upstream billed, including those in flight when wrk stopped
        # (their clients gone, tokentill still records them).
        setup.billed = clear_ledger(bench)
    finally:
        for p in proxies:
            p.stop()
        worker.stop()
    return setup


def report(setups: list[Setup], args: argparse.Namespace, direct: WrkResult | None) -> bool:
    rows = []
    for s in setups:
        base = s.baseline or s
        for p in s.proxies:
            added50 = p.wrk.p50 - (direct.p50 if direct else 0)
            added99 = p.wrk.p99 - (direct.p99 if direct else 0)
            rows.append(
                [
                    s.label,
                    p.name,
                    f"{p.wrk.rps:,.0f}",
                    f"{p.cpu_us_per_request:,.0f}",
                    f"{p.cpu_us_per_request / base.cpu_us:.2f}x",  # same-N embedded
                    f"{added50:.2f} / {added99:.2f}",
                ]
            )
    print("\n### Per proxy (wrk, plain POST /v1/responses)\n")
    print(
        markdown_table(
            ["setup", "proxy", "req/s", "CPU µs/req", "vs embedded, same N", "added ms p50 / p99"],
            rows,
        )
    )
    lake = [s for s in setups if s.baseline is not None]
    print("\n### The lake\n")
    table = []
    ok = True
    for s in lake:
        readable99 = percentile(s.readable_ms, 99) if s.readable_ms else float("nan")
        commits_per_s = s.commits / args.duration
        headroom = (
            (1000 / s.commit_p50_ms) / commits_per_s
            if s.commit_p50_ms and commits_per_s
            else float("nan")
        )
        table.append(
            [
                s.label,
                f"{s.rps:,.0f}",
                f"{s.commit_p50_ms:.1f} / {s.commit_p99_ms:.1f}",
                f"{commits_per_s:.1f} (headroom {headroom:.1f}x)",
                str(s.conflicts),
                f"{percentile(s.readable_ms, 50):.0f} / {readable99:.0f}",
                "not current" if s.rolled_up_s is None else f"{s.rolled_up_s:.1f}",
                f"{s.rows:,} / {s.distinct:,} / {s.billed:,}",
            ]
        )
    print(
        markdown_table(
            [
                "setup",
                "total req/s",
                "commit ms p50 / p99",
                "commits/s",
                "conflicts",
                "readable ms p50 / p99",
                "rolled up s",
                "rows / distinct / billed",
            ],
            table,
        )
    )
    print("\n### Targets\n")
    targets = []
    for s in lake:
        assert s.baseline is not None
        cpu = s.cpu_us / s.baseline.cpu_us
        readable99 = percentile(s.readable_ms, 99) / 1000 if s.readable_ms else float("inf")
        current = s.rolled_up_s is not None and s.rolled_up_s <= 2 * args.rollup_interval
        rolled = "more than 10 intervals" if s.rolled_up_s is None else f"{s.rolled_up_s:.1f} s"
        exact = s.rows == s.distinct == s.billed
        targets += [
            [
                s.label,
                f"CPU per request {cpu:.2f}x {s.baseline.label} (≤ {CPU_TARGET}x)",
                verdict(cpu <= CPU_TARGET),
            ],
            [
                s.label,
                f"row readable p99 {readable99:.2f} s (≤ {READABLE_TARGET_S} s)",
                verdict(readable99 <= READABLE_TARGET_S),
            ],
            [
                s.label,
                f"rollups current in {rolled} (≤ 2 x {args.rollup_interval:g} s)",
                verdict(current),
            ],
            [
                s.label,
                f"rows = billed: {s.rows:,} = {s.billed:,}, none twice; "
                f"conflicts retried {s.conflicts}",
                verdict(exact),
            ],
        ]
        ok = ok and exact
    print(markdown_table(["setup", "target", "verdict"], targets))
    return ok


def report_quotas(quotas: QuotaFigures) -> bool:
    """Redis's share: what admission and settlement cost the proxies and Redis itself."""
    setup, without = quotas.setup, quotas.without
    rps = setup.rps
    redis_us = quotas.redis_us_per_request
    headroom = (1e6 / redis_us) / rps if redis_us and rps else float("nan")
    ratio = setup.cpu_us / without.cpu_us
    print("\n### Quotas on Redis (every request held to three limits)\n")
    print(
        markdown_table(
            [
                "setup",
                "total req/s",
                "proxy CPU µs/req",
                "vs quotas off",
                "Redis CPU µs/req",
                "Redis headroom",
                "refused",
            ],
            [
                [
                    setup.label,
                    f"{rps:,.0f}",
                    f"{setup.cpu_us:,.0f}",
                    f"{ratio:.2f}x",
                    f"{redis_us:.1f}",
                    f"{headroom:.1f}x (one core)",
                    str(quotas.refused),
                ]
            ],
        )
    )
    return quotas.refused == 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rollup-interval", type=float, default=5.0)
    parser.add_argument(
        "--proxies", type=lambda v: [int(n) for n in v.split(",")], default=[1, 2, 3]
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(
        f"# bench/cluster.py: {args.duration:g} s per run, {args.connections} connections per proxy"
    )
    setups, direct, quotas = run(args)
    ok = report(setups, args, direct)
    if quotas is not None:
        ok = report_quotas(quotas) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
