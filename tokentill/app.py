"""The composition root: `create_app(settings)` wires the proxy, the journal and writer,
the poller and the HTTP surfaces (the admin API under /api, the dashboard under
/dashboard). Nothing is wired at import time.

Requests under /v1 go straight to the proxy (no framework routing on the hot path);
everything else, and the lifespan, goes to the FastAPI app.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import duckdb
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Request
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from tokentill import dashboards
from tokentill.alerts import AlertOutbox
from tokentill.api import (
    alerts,
    events,
    exports,
    finance,
    jobs,
    openai_usage,
    prices,
    quotas,
    reconcile,
    reports,
    session,
)
from tokentill.api.auth_limit import AuthLimiter
from tokentill.api.deps import AdminDep, require_admin
from tokentill.api.guard import AdminGuard, default_hosts
from tokentill.api.openai_usage import OpenAIError
from tokentill.api.runtime import AdminRuntime
from tokentill.billing_sinks import BillingSinkJob, SinkMetrics
from tokentill.billing_targets import target_for
from tokentill.ingest.batches import BatchWatcher
from tokentill.ingest.errors import error_body, send_error
from tokentill.ingest.http1 import HTTP1Upstream
from tokentill.ingest.journal import Journal, journal_identity
from tokentill.ingest.metrics import Metrics
from tokentill.ingest.poller import Poller
from tokentill.ingest.proxy import IdentityRules, Proxy, ProxyConfig
from tokentill.ingest.recorder import Recorder
from tokentill.ingest.settlement import Settler
from tokentill.ingest.socket_proxy import SocketProxy, deny
from tokentill.ingest.upstream import Upstream
from tokentill.ingest.upstream_socket import WebsocketsUpstream
from tokentill.settings import Settings
from tokentill.warehouse.abuse import AbuseConfig, AbuseJob
from tokentill.warehouse.alerts import Alert
from tokentill.warehouse.duckdb_file import DuckDBFile
from tokentill.warehouse.focus_close import post_corrections
from tokentill.warehouse.jobs import RollupConfig, RollupJob
from tokentill.warehouse.lake import Lake, LakeConfig
from tokentill.warehouse.periods import post_adjustments
from tokentill.warehouse.prices import CatalogCache, insert_rows, load_price_file, seed_published
from tokentill.warehouse.quota_book import QuotaConfig
from tokentill.warehouse.quota_service import QuotaService, SharedOptions
from tokentill.warehouse.quota_shared import SharedCounters, quota_store_alert
from tokentill.warehouse.scheduler import start_scheduler, stop_scheduler
from tokentill.warehouse.storage import EventSink, Storage
from tokentill.warehouse.unsettled import Unsettled, unsettled
from tokentill.warehouse.writer import Writer
from tokentill.webhooks import Webhook

log = logging.getLogger("tokentill")


@dataclass
class Runtime:
    """The running service, built by the lifespan once everything it names runs: the
    app's dispatch reads the proxy and the sockets; the request handlers read it through
    `api.runtime.AdminRuntime` (no proxy, no outbox)."""

    settings: Settings
    storage: Storage
    writer: Writer  # its backlog and lag, for freshness and health
    proxy: Proxy
    sockets: SocketProxy
    rollup: RollupJob
    abuse: AbuseJob
    alerts: AlertOutbox
    catalog: CatalogCache  # the one price snapshot: rollups, reports and quotas
    quotas: QuotaService | None
    ready: bool = False

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A connection of its own for one thread's reads (or the rollup's writes)."""
        return self.storage.session()


class Tokentill:
    """The ASGI app: /v1 to the proxy, the rest to FastAPI."""

    def __init__(self, settings: Settings, upstream: Upstream | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.identity = IdentityRules(settings.user_id_case_fold, settings.refuse_user_mismatch)
        self.runtime: Runtime | None = None
        self._upstream = upstream
        # Whether the writer drained into DuckDB at shutdown (else the file is left to the
        # writer thread, and the journal replays at the next start).
        self._drained = True
        self.api = self._build_api()
        self.api.state.runtime = None
        self.api.state.admin_token = (
            settings.admin_token.get_secret_value() if settings.admin_token else None
        )
        self.api.state.session_lifetime = settings.session_lifetime
        self.api.state.auth_limiter = AuthLimiter(
            settings.auth_failure_limit,
            settings.auth_failure_window,
            self.metrics.auth_failures.inc,
            self._locked_out,
        )

    def _locked_out(self, address: str, failures: int) -> None:
        """An address guessed the admin token too often: count it and raise an alert."""
        self.metrics.auth_lockouts.inc()
        runtime = self.runtime
        if runtime is None:
            return
        now = datetime.now(UTC)
        runtime.alerts.raise_alert(
            Alert(
                dedupe_key=f"auth_failures:{address}:{int(now.timestamp()) // 3600}",
                kind="security",
                rule="auth_failures",
                severity="critical",
                message=f"{failures} wrong admin tokens from {address}: locked out for "
                f"{self.settings.auth_failure_window:g} s",
                evidence={"address": address, "failures": failures},
            )
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            path: str = scope["path"]
            if path.startswith("/v1/") or path == "/v1":
                runtime = self.runtime
                if not self.settings.proxies:
                    await _wrong_role(scope, receive, send, self.settings.role)
                elif runtime is None or not runtime.ready:
                    await _unavailable(scope, receive, send)
                elif scope["type"] == "http":
                    await runtime.proxy(scope, receive, send)
                else:
                    await runtime.sockets(scope, receive, send)
                return
            if not self.settings.serves_admin and path not in ("/healthz", "/metrics"):
                await _not_served(scope, receive, send, self.settings.role)
                return
        await self.api(scope, receive, send)

    def _build_api(self) -> FastAPI:
        api = FastAPI(
            title="tokentill",
            summary="Usage metering and cost analytics for OpenAI's API: the admin API.",
            lifespan=self._lifespan,
            docs_url=None,
            redoc_url=None,
            openapi_url=None,
        )

        @api.get("/healthz", include_in_schema=False)
        async def healthz() -> Response:
            runtime = self.runtime
            if runtime is None or not runtime.ready:
                return JSONResponse({"status": "starting"}, status_code=503)
            if runtime.writer.failed:
                return JSONResponse({"status": "writer failing"}, status_code=503)
            body: dict[str, object] = {
                # Degraded, not down: with the warehouse away (a lake's catalog), the
                # proxy serves and its journal holds what it meters until it returns.
                "status": "degraded" if runtime.writer.unavailable else "ok",
                "journal_backlog": runtime.writer.backlog,
                "writer_lag_seconds": round(runtime.writer.lag_seconds, 3),
            }
            quotas = runtime.quotas
            if quotas is not None and quotas.shared is not None:
                # Redis away: requests held to a limit are refused (or served unchecked),
                # everything else is served.
                body["quota_store"] = "up" if quotas.shared.up else "down"
                body["quota_limits_version"] = quotas.limits_version
                if not quotas.shared.up:
                    body["status"] = "degraded"
            if self.settings.lake_catalog is not None:
                body["role"] = self.settings.role
                if self.settings.works:  # which worker runs the jobs now
                    leads = await asyncio.to_thread(runtime.storage.leads)
                    body["worker"] = "active" if leads else "standby"
            return JSONResponse(body)

        @api.get("/metrics", include_in_schema=False)
        async def metrics() -> Response:
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        for router in (
            jobs.router,
            reports.router,
            events.router,
            prices.router,
            finance.router,
            reconcile.router,
            quotas.router,
            alerts.router,
            openai_usage.router,
            exports.router,
        ):
            api.include_router(
                router,
                prefix="/api",
                dependencies=[AdminDep],
                responses={
                    400: {"description": "Malformed request (a body that is not JSON)"},
                    401: {"description": "Missing or wrong admin token"},
                    403: {"description": "No admin token configured: loopback clients only"},
                },
            )
        for page_router in dashboards.routers():
            api.include_router(page_router)
        _add_docs(api)
        _add_error_shapes(api)
        api.add_middleware(openai_usage.BracketArrays, prefix=openai_usage.PREFIX)
        api.add_middleware(
            AdminGuard,
            allowed_hosts=self.settings.allowed_hosts or default_hosts(self.settings.host),
        )
        return api

    @contextlib.asynccontextmanager
    async def _lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        """The service, step by step; each step owns its teardown, run in reverse."""
        settings = self.settings
        async with contextlib.AsyncExitStack() as stack:
            storage = self._open_warehouse(stack)
            journal, writer = self._start_writer(stack, storage.events)
            client = self._upstream or HTTP1Upstream(
                settings.upstream,
                connect_timeout=settings.upstream_connect_timeout,
                read_timeout=settings.upstream_read_timeout,
                max_connections=settings.upstream_max_connections,
            )
            stack.push_async_callback(client.aclose)
            catalog = CatalogCache(storage.exclusive)
            outbox = self._start_alerts(stack, storage)
            quotas = await self._start_quotas(stack, storage, writer, outbox, catalog)
            poller = Poller(
                upstream=settings.upstream,
                max_age=settings.background_poll_max,
                min_interval=settings.background_poll_min_interval,
                max_interval=settings.background_poll_max_interval,
            )
            recorder = Recorder(journal, self.metrics, poller, quotas.book if quotas else None)
            batches = BatchWatcher(
                upstream=settings.upstream,
                record=recorder.record,
                release=recorder.release,
                identity=self.identity,
                max_age=settings.batch_watch_max,
                max_input_bytes=settings.max_parsed_response_bytes,
                min_interval=settings.background_poll_min_interval,
                max_interval=settings.background_poll_max_interval,
            )
            _run_until_closed(stack, poller.run(client, recorder.record), "tokentill-poller")
            if settings.proxies:
                await self._start_settlement(stack, storage, writer, poller)
            _run_until_closed(stack, batches.run(client), "tokentill-batches")
            stack.callback(_say_what_is_left, poller, batches)
            if isinstance(storage, Lake):
                lake_events = storage.events
                self.metrics.bind_lake(
                    commits=lambda: lake_events.commits,
                    conflicts=lambda: lake_events.conflicts,
                    commit_p50=lambda: lake_events.commit_quantile(0.5),
                    commit_p99=lambda: lake_events.commit_quantile(0.99),
                )
            self.metrics.bind(
                backlog=lambda: writer.backlog,
                lag=lambda: writer.lag_seconds,
                written=lambda: writer.stats.events_written,
                rejected=lambda: writer.stats.rejected,
                pending=lambda: len(poller),
            )
            admission = quotas.admit if quotas else None
            proxy = Proxy(
                ProxyConfig(
                    upstream=settings.upstream,
                    max_request_bytes=settings.max_request_bytes,
                    max_parsed_response_bytes=settings.max_parsed_response_bytes,
                    stream_drain_timeout=settings.stream_drain_timeout,
                    user_id_case_fold=settings.user_id_case_fold,
                    refuse_user_mismatch=settings.refuse_user_mismatch,
                ),
                self.metrics,
                identity=self.identity,
                client=client,
                recorder=recorder,
                admission=admission,
                batches=batches,
            )
            sockets = SocketProxy(
                settings.upstream,
                settings.stream_drain_timeout,
                self.metrics,
                WebsocketsUpstream(settings.upstream_connect_timeout),
                recorder=recorder,
                admission=admission,
                identity=self.identity,
            )
            rollup = RollupJob(
                storage.session,
                RollupConfig(
                    tag_keys=settings.rollup_tag_keys, image_model=settings.image_gen_model
                ),
                catalog,
            )
            abuse = AbuseJob(
                storage.session,
                AbuseConfig(
                    window_seconds=settings.abuse_window,
                    history_days=settings.abuse_history_days,
                    image_model=settings.image_gen_model,
                ),
                outbox.store_from_thread,
            )
            runtime = Runtime(
                settings, storage, writer, proxy, sockets, rollup, abuse, outbox, catalog, quotas
            )
            if settings.works:
                self._start_scheduler(stack, runtime)
            if self.api.state.admin_token is None:
                log.warning("no TOKENTILL_ADMIN_TOKEN: the admin API answers loopback clients only")
            self.runtime = runtime
            handlers: AdminRuntime = runtime  # their face of it (api/runtime.py), checked here
            self.api.state.runtime = handlers
            runtime.ready = True
            # Everything built so far lives as long as the process: keep the cyclic GC from
            # walking it on every collection (shorter pauses on the proxy's hot path).
            gc.freeze()
            log.info("tokentill ready: proxy -> %s, warehouse %s", settings.upstream, storage.name)
            try:
                yield
            finally:
                runtime.ready = False

    def _open_warehouse(self, stack: contextlib.AsyncExitStack) -> Storage:
        """Open (and migrate) the warehouse, load the price catalog and the operator's
        prices. Closed last, once the writer has drained into it."""
        settings = self.settings
        if settings.lake_catalog is not None and settings.lake_data is not None:
            lake = Lake(
                LakeConfig(
                    catalog=settings.lake_catalog.get_secret_value(),
                    data=settings.lake_data,
                    instance_id=settings.instance_id or "",
                    extension_dir=settings.journal_path.parent / "duckdb_extensions",
                    journal_id=journal_identity(settings.journal_path),
                    s3_endpoint=settings.lake_s3_endpoint,
                    s3_use_ssl=settings.lake_s3_use_ssl,
                )
            )
            stack.callback(self._close_warehouse, lake)
            if settings.works:  # the price catalog is the workers' to keep
                with lake.exclusive():
                    self._load_prices(lake)
            return lake
        storage = DuckDBFile(settings.db, memory_limit=settings.warehouse_memory_limit)
        stack.callback(self._close_warehouse, storage)
        self._load_prices(storage)
        return storage

    def _load_prices(self, storage: Storage) -> None:
        """The published catalog (once per genai-prices version) and the operator's file."""
        settings = self.settings
        conn = storage.session()
        try:
            seeded = seed_published(conn)
            if seeded:
                log.info("price catalog: %d published prices loaded", seeded)
            if settings.prices_file is not None:
                added = insert_rows(conn, load_price_file(settings.prices_file))
                log.info("price catalog: %d prices from %s", added, settings.prices_file)
        finally:
            conn.close()

    def _close_warehouse(self, storage: Storage) -> None:
        if self._drained:  # else the writer thread may still hold it
            storage.close()

    def _start_writer(
        self, stack: contextlib.AsyncExitStack, events: EventSink
    ) -> tuple[Journal, Writer]:
        """Lock the journal, replay into DuckDB what it holds beyond the checkpoint, and
        start the writer. At shutdown the writer drains (within the 10 s budget), or the
        journal is replayed at the next start."""
        settings = self.settings
        journal = Journal(
            settings.journal_path,
            segment_bytes=settings.journal_segment_bytes,
            fsync_interval=settings.journal_fsync_interval,
        )
        journal.lock()
        writer = Writer(
            events,
            journal,
            batch_max=settings.writer_batch_max,
            queue_max=settings.writer_queue_max,
            flush_interval=settings.writer_flush_interval,
        )
        replayed = writer.recover()
        if replayed:
            log.info("replaying %d journaled events not yet in DuckDB", replayed)
        journal.start(writer.submit)
        writer.start()
        stack.push_async_callback(self._stop_writer, journal, writer)
        return journal, writer

    async def _stop_writer(self, journal: Journal, writer: Writer) -> None:
        # The whole shutdown stays under 10 s: uvicorn used up to `shutdown_grace` already.
        budget = max(1.0, 9.0 - self.settings.shutdown_grace)
        self._drained = await asyncio.to_thread(writer.stop, budget)
        journal.close()
        if self._drained:
            log.info("writer flushed: %d events written this run", writer.stats.events_written)
        else:
            log.error("writer did not drain in time; the journal will be replayed at next start")

    async def _start_settlement(
        self, stack: contextlib.AsyncExitStack, storage: Storage, writer: Writer, poller: Poller
    ) -> None:
        """The sweep that settles responses a stopped process left pending, once what the
        journal held has landed (ingest/settlement.py; the start does not wait for it)."""
        settings = self.settings

        def find(since: datetime, before: datetime, streams_before: datetime) -> list[Unsettled]:
            conn = storage.session()
            try:
                return unsettled(conn, since=since, before=before, streams_before=streams_before)
            finally:
                conn.close()

        key = settings.settlement_api_key
        settler = Settler(
            poller,
            find,
            lambda: writer.flush(120.0),
            key.get_secret_value() if key else None,
            max_age=settings.background_poll_max,
            interval=settings.settlement_interval,
            grace=2 * settings.background_poll_max_interval,
            stream_grace=settings.settlement_stream_grace,
            alone=not isinstance(storage, Lake),
        )
        _run_until_closed(stack, settler.run(), "tokentill-settlement")

    def _start_alerts(self, stack: contextlib.AsyncExitStack, storage: Storage) -> AlertOutbox:
        """The alert outbox (and the webhook, when one is configured)."""
        settings = self.settings
        webhook = None
        if settings.alert_webhook_url is not None:
            secret = settings.alert_webhook_secret
            webhook = Webhook(
                settings.alert_webhook_url,
                secret.get_secret_value() if secret else None,
                max_attempts=settings.alert_webhook_max_attempts,
                backoff=settings.alert_webhook_backoff,
            )
        outbox = AlertOutbox(storage.session, webhook)
        stack.push_async_callback(outbox.close)
        _run_until_closed(stack, outbox.run(), "tokentill-alerts")
        return outbox

    async def _start_quotas(
        self,
        stack: contextlib.AsyncExitStack,
        storage: Storage,
        writer: Writer,
        outbox: AlertOutbox,
        catalog: CatalogCache,
    ) -> QuotaService | None:
        """The quota service, its counters seeded from the warehouse (so the journal's
        replay must have landed first), and its price refresh."""
        settings = self.settings
        if not settings.quotas_enabled:
            return None
        if not await asyncio.to_thread(writer.flush, 120.0):
            raise RuntimeError("the journal replay did not reach DuckDB in time")
        service = QuotaService(
            QuotaConfig(
                tag_keys=settings.quota_tag_keys,
                output_cap=settings.quota_output_cap,
                input_bytes_per_token=settings.quota_input_bytes_per_token,
                image_tokens=settings.quota_image_tokens,
                unknown_context_tokens=settings.quota_unknown_context_tokens,
                pending_max_seconds=settings.background_poll_max,
                tool_calls=settings.quota_tool_calls,
                max_counters=settings.quota_max_counters,
                spill_after=settings.quota_spill_after,
            ),
            image_gen_model=settings.image_gen_model,
            block_seconds=settings.abuse_block_seconds,
            price_refresh=settings.quota_price_refresh,
            connect=storage.session,
            alert=outbox.raise_alert,
            flush=lambda: writer.flush(60.0),
            catalog=catalog,
        )
        if settings.redis_url is not None:
            await self._share_quotas(stack, service, writer, outbox)
        await asyncio.to_thread(service.start)
        outbox.subscribe(service.on_alert)
        _run_until_closed(stack, service.refresh_forever(), "tokentill-prices")
        if service.shared is not None:
            mark = writer.committed_through_us if settings.proxies else None
            _run_until_closed(stack, service.follow_forever(mark), "tokentill-quota-follow")
        return service

    async def _share_quotas(
        self,
        stack: contextlib.AsyncExitStack,
        service: QuotaService,
        writer: Writer,
        outbox: AlertOutbox,
    ) -> None:
        """The quota counters in Redis (every instance of a lake sees the same)."""
        settings = self.settings
        assert settings.redis_url is not None
        client = aioredis.from_url(
            settings.redis_url.get_secret_value(),
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
            retry_on_timeout=False,
        )
        stack.push_async_callback(client.aclose)
        instance = settings.instance_id or "tokentill"
        counters = SharedCounters(
            client,
            service.book,
            instance_id=instance,
            # A request's reservation lapses after this if its proxy died holding it.
            open_for_seconds=max(900.0, 2 * settings.upstream_read_timeout),
            pending_max_seconds=settings.background_poll_max,
        )
        counters.on_unavailable = lambda exc: outbox.raise_alert(quota_store_alert(exc, instance))
        service.share(
            counters,
            SharedOptions(outage=settings.quota_redis_outage, poll=settings.quota_redis_poll),
        )
        risky = await counters.persistence()  # [] when Redis will not say
        if risky:
            log.warning(
                "quota counters' Redis keeps %s: after a restart it could come back with "
                "stale counters instead of empty ones, which are rebuilt from the lake "
                "(docs/quotas.md)",
                ", ".join(risky),
            )
        self.metrics.bind_quota_store(
            up=lambda: float(counters.up),
            errors=lambda: float(counters.errors),
            queued=lambda: float(counters.queued),
            dropped=lambda: float(counters.dropped),
            seeds=lambda: float(service.seeds),
            unchecked=lambda: float(service.unchecked),
        )
        _run_until_closed(stack, counters.run(), "tokentill-quota-settle")
        # Unwound before the task is cancelled: what was settled reaches Redis.
        stack.push_async_callback(counters.drain, 3.0)

    def _start_scheduler(self, stack: contextlib.AsyncExitStack, runtime: Runtime) -> None:
        """The rollup and abuse jobs on their schedule; stopped first at shutdown."""
        upkeep = self._lake_upkeep(runtime.storage)

        def after_rollup() -> None:
            _post_adjustments(runtime)
            if upkeep is not None:
                upkeep()

        others: dict[str, tuple[Callable[[], object], float]] = {
            "abuse": (runtime.abuse.run, self.settings.abuse_interval)
        }
        sinks = self._billing_sinks(runtime)
        for sink in sinks:
            others[f"sink:{sink.sink.name}"] = (sink.run, self.settings.billing_sink_interval)
        scheduler = start_scheduler(
            runtime.rollup,
            self.settings.rollup_interval,
            others,
            then=after_rollup,
            compaction=(self.settings.rollup_compact_parts, self.settings.rollup_compact_after),
            leads=runtime.storage.leads,
        )

        async def stop() -> None:
            for sink in sinks:
                sink.cancel()
            if not await asyncio.to_thread(stop_scheduler, scheduler, runtime.rollup):
                log.error("a rollup run did not stop in time; the warehouse interrupts it")
            for sink in sinks:
                sink.close()

        stack.push_async_callback(stop)

    def _billing_sinks(self, runtime: Runtime) -> list[BillingSinkJob]:
        """A job per configured billing sink, each with its own target and mark."""
        if not self.settings.billing_sinks:
            return []
        metrics = SinkMetrics(self.metrics.registry)
        return [
            BillingSinkJob(
                sink,
                target_for(sink),
                runtime.connect,
                runtime.catalog,
                image_model=self.settings.image_gen_model,
                alert=runtime.alerts.store_from_thread,
                metrics=metrics,
                interval=self.settings.billing_sink_interval,
                leads=runtime.storage.leads,
            )
            for sink in self.settings.billing_sinks
        ]

    def _lake_upkeep(self, storage: Storage) -> Callable[[], None] | None:
        """A lake's upkeep, after the rollup cycle that ends its interval (the same
        thread: never beside a rollup run or a compaction)."""
        if not isinstance(storage, Lake):
            return None
        settings, metrics = self.settings, self.metrics
        due = time.monotonic() + settings.lake_upkeep_interval

        def maybe() -> None:
            nonlocal due
            if time.monotonic() < due:
                return
            due = time.monotonic() + settings.lake_upkeep_interval
            try:
                done = storage.upkeep(timedelta(seconds=settings.lake_keep_snapshots))
            except Exception:
                log.exception("lake upkeep failed")
                return
            for what, value in dataclasses.asdict(done).items():
                if isinstance(value, int):
                    metrics.lake_upkeep.labels(what).set(value)
            log.info("lake upkeep: %s", done)

        return maybe


def _run_until_closed(
    stack: contextlib.AsyncExitStack, work: Coroutine[Any, Any, None], name: str
) -> None:
    """Run `work` as a task until the stack closes (then cancel it and wait)."""
    task = asyncio.create_task(work, name=name)

    async def cancel() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(cancel)


def _say_what_is_left(poller: Poller, batches: BatchWatcher) -> None:
    if len(batches):
        log.warning(
            "%d batches were still running upstream; each is metered when a client "
            "retrieves it through the proxy once it has ended",
            len(batches),
        )
    if len(poller):
        log.warning(
            "%d responses were still pending upstream; their rows keep their last "
            "known status until a client retrieves them through the proxy",
            len(poller),
        )


async def _unavailable(scope: Scope, receive: Receive, send: Send) -> None:
    """/v1 before the service runs or once it stops: 503 in OpenAI's shape."""
    body = error_body("tokentill is starting or stopping", "server_error", "unavailable")
    if scope["type"] == "http":
        await send_error(
            send, 503, "tokentill is starting or stopping", "server_error", "unavailable"
        )
        return
    message = await receive()
    if message["type"] == "websocket.connect":
        await deny(scope, send, 503, body)


async def _wrong_role(scope: Scope, receive: Receive, send: Send, role: str) -> None:
    """/v1 sent to an instance that does not proxy: 404 in OpenAI's shape, saying why."""
    message = f"this tokentill instance plays role {role!r}: send /v1 to a proxy"
    if scope["type"] == "http":
        await send_error(send, 404, message, "invalid_request_error", "wrong_role")
        return
    if (await receive())["type"] == "websocket.connect":
        await deny(scope, send, 404, error_body(message, "invalid_request_error", "wrong_role"))


async def _not_served(scope: Scope, receive: Receive, send: Send, role: str) -> None:
    """The admin API or the dashboard asked of an instance that does not serve them:
    404 in FastAPI's shape."""
    detail = f"this tokentill instance plays role {role!r}: the admin API is on an api instance"
    if scope["type"] == "http":
        await JSONResponse({"detail": detail}, status_code=404)(scope, receive, send)
        return
    if (await receive())["type"] == "websocket.connect":
        await send({"type": "websocket.close", "code": 1008, "reason": "wrong role"})


def _post_adjustments(runtime: Runtime) -> None:
    """After each rollup run: late changes to closed months post into the next open one."""
    conn = runtime.connect()
    try:
        posted = post_adjustments(conn, datetime.now(UTC))
        if posted:
            log.info("closed periods: %d adjustment rows posted", posted)
        corrected = post_corrections(conn, datetime.now(UTC), runtime.settings)
        if corrected:
            log.info("closed periods: %d FOCUS correction rows posted", corrected)
    except Exception:
        log.exception("posting closed-period adjustments failed; the next run retries")
    finally:
        conn.close()


def _add_docs(api: FastAPI) -> None:
    """The OpenAPI schema and Swagger UI under /api, behind the admin token like every
    /api route, with Swagger UI's assets served from the fastapi-offline package (the
    page works with no internet)."""
    assets = resources.files("fastapi_offline") / "static"
    api.mount("/api/docs-assets", StaticFiles(directory=str(assets)), name="docs-assets")

    @api.get("/api/openapi.json", include_in_schema=False, dependencies=[Depends(require_admin)])
    async def openapi() -> JSONResponse:
        return JSONResponse(api.openapi())

    @api.get("/api/docs", include_in_schema=False, dependencies=[Depends(require_admin)])
    async def docs(request: Request) -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url="/api/openapi.json",
            title="tokentill admin API",
            swagger_js_url="/api/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/api/docs-assets/swagger-ui.css",
            swagger_favicon_url="/api/docs-assets/favicon.png",
        )
        cookie = request.cookies.get(session.COOKIE)
        admin: str | None = request.app.state.admin_token
        if cookie is None or admin is None or "authorization" in request.headers:
            return page
        # "Try it out" in a logged-in browser sends the session's CSRF token.
        csrf = json.dumps(session.csrf_token(cookie, admin))
        html = (
            bytes(page.body)
            .decode()
            .replace(
                "const ui = SwaggerUIBundle({",
                "const ui = SwaggerUIBundle({\n    requestInterceptor: (r) => "
                f"{{ r.headers['X-CSRF-Token'] = {csrf}; return r; }},",
            )
        )
        return HTMLResponse(html)


def _add_error_shapes(api: FastAPI) -> None:
    """OpenAI's error shape on the OpenAI-compatible routes; FastAPI's everywhere else."""

    @api.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> Response:
        return exc.response()

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:
            # Starlette's Allow names the first route's methods only; name them all.
            allowed = sorted(
                {
                    method
                    for route in api.routes
                    if isinstance(route, APIRoute) and route.path_regex.match(request.url.path)
                    for method in route.methods or ()
                }
            )
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(allowed)}
        return await http_exception_handler(request, exc)

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        if request.url.path.startswith(openai_usage.PREFIX):
            first = exc.errors()[0] if exc.errors() else {}
            location = [str(p) for p in first.get("loc", ()) if p not in ("query", "body")]
            param = location[0] if location else None
            message = f"Invalid {param or 'request'}: {first.get('msg', 'bad value')}."
            return OpenAIError(message, param).response()
        return await request_validation_exception_handler(request, exc)


def create_app(settings: Settings, *, upstream: Upstream | None = None) -> Tokentill:
    """Build the service. `upstream` replaces the real HTTP client (unit tests only)."""
    return Tokentill(settings, upstream)
