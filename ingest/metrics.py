"""Prometheus metrics, one registry per app so tests can build several in one process."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._request_children: dict[tuple[str, int], Counter] = {}
        self._latency_children: dict[str, Histogram] = {}
        self._event_children: dict[tuple[str, str], Counter] = {}
        self.requests = Counter(
            "tokentill_proxy_requests",
            "Requests through the proxy, by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "tokentill_upstream_latency_seconds",
            "From receiving a request to the upstream's last byte.",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.events_captured = Counter(
            "tokentill_events_captured",
            "Usage events journaled by the proxy, by endpoint and status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.events_written = Gauge(
            "tokentill_events_written",
            "Usage events committed to DuckDB since start.",
            registry=self.registry,
        )
        self.journal_backlog = Gauge(
            "tokentill_journal_backlog_events",
            "Events in the local journal not yet committed to DuckDB.",
            registry=self.registry,
        )
        self.writer_lag = Gauge(
            "tokentill_writer_lag_seconds",
            "Age of the oldest event waiting for DuckDB.",
            registry=self.registry,
        )
        self.writer_rejected = Gauge(
            "tokentill_writer_rejected_events",
            "Events DuckDB refused, kept in the journal's rejected.jsonl.",
            registry=self.registry,
        )
        self.fields_cut = Counter(
            "tokentill_stored_fields_cut",
            "Events with a field cut to its storage bound (metadata, user id, model...).",
            ["field"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "tokentill_auth_failures",
            "Wrong admin tokens (bearer or login form).",
            registry=self.registry,
        )
        self.auth_lockouts = Counter(
            "tokentill_auth_lockouts",
            "Client addresses locked out after too many wrong admin tokens.",
            registry=self.registry,
        )
        self.pending_responses = Gauge(
            "tokentill_pending_responses",
            "Background or interrupted responses being polled for their outcome.",
            registry=self.registry,
        )

    def bind_lake(
        self,
        *,
        commits: Callable[[], float],
        conflicts: Callable[[], float],
        commit_p50: Callable[[], float],
        commit_p99: Callable[[], float],
    ) -> None:
        """A lake's writer: its commits, the conflicts it retried, its commit time."""
        for name, doc, read in (
            ("tokentill_lake_commits", "Batches this process committed to the lake", commits),
            (
                "tokentill_lake_conflicts",
                "Lake commits that met another's change, retried",
                conflicts,
            ),
            (
                "tokentill_lake_commit_p50_seconds",
                "p50 of the last 1,000 lake commits (lock included)",
                commit_p50,
            ),
            (
                "tokentill_lake_commit_p99_seconds",
                "p99 of the last 1,000 lake commits (lock included)",
                commit_p99,
            ),
        ):
            Gauge(name, doc, registry=self.registry).set_function(read)
        self.lake_upkeep = Gauge(
            "tokentill_lake_upkeep",
            "What the last lake upkeep did, by step (versions folded, inlined rows "
            "flushed, files merged, snapshots expired, files deleted)",
            ["what"],
            registry=self.registry,
        )

    def bind_quota_store(
        self,
        *,
        up: Callable[[], float],
        errors: Callable[[], float],
        queued: Callable[[], float],
        dropped: Callable[[], float],
        seeds: Callable[[], float],
        unchecked: Callable[[], float],
    ) -> None:
        """Shared quota counters (Redis): reachable, and what waits or was lost."""
        for name, doc, read in (
            ("tokentill_quota_store_up", "1 while the quota counters' Redis answers", up),
            ("tokentill_quota_store_errors", "Calls to the quota Redis that failed", errors),
            (
                "tokentill_quota_settlements_queued",
                "Quota settlements waiting to reach Redis",
                queued,
            ),
            (
                "tokentill_quota_settlements_dropped",
                "Quota settlements dropped (queue full while Redis was away)",
                dropped,
            ),
            ("tokentill_quota_seeds", "Quota windows read from the lake", seeds),
            (
                "tokentill_quota_unchecked",
                "Requests served unchecked while Redis was away (outage: serve)",
                unchecked,
            ),
        ):
            Gauge(name, doc, registry=self.registry).set_function(read)

    def count_cut(self, field: str) -> None:
        self.fields_cut.labels(field).inc()

    def count_request(self, endpoint: str, status: int, seconds: float) -> None:
        """Hot path: the labelled children are looked up once, not on every request
        (prometheus_client's `labels()` takes a lock and builds a tuple each time)."""
        key = (endpoint, status)
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._request_children[key] = self.requests.labels(endpoint, str(status))
        counter.inc()
        histogram = self._latency_children.get(endpoint)
        if histogram is None:
            histogram = self._latency_children[endpoint] = self.upstream_latency.labels(endpoint)
        histogram.observe(seconds)

    def count_event(self, endpoint: str, status: str) -> None:
        key = (endpoint, status)
        counter = self._event_children.get(key)
        if counter is None:
            counter = self._event_children[key] = self.events_captured.labels(endpoint, status)
        counter.inc()

    def bind(
        self,
        *,
        backlog: Callable[[], float],
        lag: Callable[[], float],
        written: Callable[[], float],
        rejected: Callable[[], float],
        pending: Callable[[], float],
    ) -> None:
        """Read live values at scrape time instead of updating gauges on the hot path."""
        self.journal_backlog.set_function(backlog)
        self.writer_lag.set_function(lag)
        self.events_written.set_function(written)
        self.writer_rejected.set_function(rejected)
        self.pending_responses.set_function(pending)
