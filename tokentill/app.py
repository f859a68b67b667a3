"""The composition root: `create_app(settings)` wires the proxy, the journal and writer,
the poller and the HTTP surfaces (the admin API under /api, the dashboard under
/dashboard). Nothing is wired at import time.

Requests under /v1 go straight to the proxy (no framework routing on the hot path);
everything else, and the lifespan, goes to the FastAPI app.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources

import duckdb
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

import dashboards
from api import (
    alerts,
    events,
    finance,
    jobs,
    openai_usage,
    prices,
    quotas,
    reconcile,
    reports,
    session,
)
from api.auth_limit import AuthLimiter
from api.deps import AdminDep, require_admin
from api.guard import AdminGuard, default_hosts
from api.openai_usage import OpenAIError
from ingest.batches import BatchWatcher
from ingest.http1 import HTTP1Upstream
from ingest.journal import Journal
from ingest.metrics import Metrics
from ingest.poller import Poller
from ingest.proxy import Proxy, ProxyConfig
from ingest.recorder import Recorder
from ingest.socket_proxy import SocketProxy
from ingest.upstream import Upstream
from ingest.upstream_socket import WebsocketsUpstream
from tokentill.alerts import AlertOutbox
from tokentill.quota_service import QuotaService
from tokentill.settings import Settings
from tokentill.webhooks import Webhook
from warehouse.abuse import AbuseConfig, AbuseJob
from warehouse.alerts import Alert
from warehouse.db import open_warehouse
from warehouse.jobs import RollupConfig, RollupJob
from warehouse.periods import post_adjustments
from warehouse.prices import CatalogCache, insert_rows, load_price_file, seed_published
from warehouse.scheduler import start_scheduler, stop_scheduler
from warehouse.writer import Writer

log = logging.getLogger("tokentill")


@dataclass
class Runtime:
    """What the lifespan builds; reachable from routes as `request.app.state.runtime`."""

    settings: Settings
    metrics: Metrics
    journal: Journal
    writer: Writer
    recorder: Recorder
    poller: Poller
    client: Upstream
    readers: duckdb.DuckDBPyConnection
    rollup: RollupJob
    alerts: AlertOutbox
    abuse: AbuseJob
    catalog: CatalogCache  # the one price snapshot: rollups, reports and quotas
    quotas: QuotaService | None = None
    ready: bool = False
    _cursor_lock: threading.Lock = field(default_factory=threading.Lock)

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A connection of its own for one thread's reads (or the rollup's writes): the
        writer thread keeps the main one to itself."""
        with self._cursor_lock:
            cursor = self.readers.cursor()
        cursor.execute("SET TimeZone = 'UTC'")
        return cursor


class Tokentill:
    """The ASGI app: /v1 to the proxy, the rest to FastAPI."""

    def __init__(self, settings: Settings, upstream: Upstream | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.proxy = Proxy(
            ProxyConfig(
                upstream=settings.upstream,
                max_request_bytes=settings.max_request_bytes,
                max_parsed_response_bytes=settings.max_parsed_response_bytes,
                stream_drain_timeout=settings.stream_drain_timeout,
                user_id_case_fold=settings.user_id_case_fold,
                refuse_user_mismatch=settings.refuse_user_mismatch,
            ),
            self.metrics,
        )
        self.sockets = SocketProxy(
            settings.upstream,
            settings.stream_drain_timeout,
            self.metrics,
            WebsocketsUpstream(settings.upstream_connect_timeout),
            recorder=lambda: self.proxy.recorder,
            admission=lambda: self.proxy.admission,
            identity=self.proxy.identity,
        )
        self.runtime: Runtime | None = None
        self._upstream = upstream
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
                if scope["type"] == "http":
                    await self.proxy(scope, receive, send)
                else:
                    await self.sockets(scope, receive, send)
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
            return JSONResponse(
                {
                    "status": "ok",
                    "journal_backlog": runtime.writer.backlog,
                    "writer_lag_seconds": round(runtime.writer.lag_seconds, 3),
                }
            )

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
        settings = self.settings
        conn = open_warehouse(settings.db, memory_limit=settings.warehouse_memory_limit)
        seeded = seed_published(conn)
        if seeded:
            log.info("price catalog: %d published prices loaded", seeded)
        if settings.prices_file is not None:
            added = insert_rows(conn, load_price_file(settings.prices_file))
            log.info("price catalog: %d prices from %s", added, settings.prices_file)
        readers = conn.cursor()
        journal = Journal(
            settings.journal_path,
            segment_bytes=settings.journal_segment_bytes,
            fsync_interval=settings.journal_fsync_interval,
        )
        journal.lock()
        writer = Writer(
            conn,
            journal,
            batch_max=settings.writer_batch_max,
            flush_interval=settings.writer_flush_interval,
        )
        replayed = writer.recover()
        if replayed:
            log.info("replaying %d journaled events not yet in DuckDB", replayed)
        journal.start(writer.submit)
        writer.start()
        client = self._upstream or HTTP1Upstream(
            settings.upstream,
            connect_timeout=settings.upstream_connect_timeout,
            read_timeout=settings.upstream_read_timeout,
            max_connections=settings.upstream_max_connections,
        )
        recorder = Recorder(journal, self.metrics)
        poller = Poller(
            upstream=settings.upstream,
            record=recorder.record,
            max_age=settings.background_poll_max,
            min_interval=settings.background_poll_min_interval,
            max_interval=settings.background_poll_max_interval,
        )
        recorder.poller = poller
        poller_task = asyncio.create_task(poller.run(client), name="tokentill-poller")
        batches = BatchWatcher(
            upstream=settings.upstream,
            record=recorder.record,
            release=recorder.release,
            identity=self.proxy.identity,
            max_age=settings.batch_watch_max,
            max_input_bytes=settings.max_parsed_response_bytes,
            min_interval=settings.background_poll_min_interval,
            max_interval=settings.background_poll_max_interval,
        )
        batch_task = asyncio.create_task(batches.run(client), name="tokentill-batches")
        self.metrics.bind(
            backlog=lambda: writer.backlog,
            lag=lambda: writer.lag_seconds,
            written=lambda: writer.stats.events_written,
            rejected=lambda: writer.stats.rejected,
            pending=lambda: len(poller),
        )
        catalog = CatalogCache()
        rollup = RollupJob(
            lambda: runtime.connect(),
            RollupConfig(tag_keys=settings.rollup_tag_keys, image_model=settings.image_gen_model),
            catalog,
        )
        webhook = None
        if settings.alert_webhook_url is not None:
            secret = settings.alert_webhook_secret
            webhook = Webhook(
                settings.alert_webhook_url,
                secret.get_secret_value() if secret else None,
                max_attempts=settings.alert_webhook_max_attempts,
                backoff=settings.alert_webhook_backoff,
            )
        outbox = AlertOutbox(lambda: runtime.connect(), webhook)
        runtime = Runtime(
            settings,
            self.metrics,
            journal,
            writer,
            recorder,
            poller,
            client,
            readers,
            rollup,
            outbox,
            AbuseJob(
                lambda: runtime.connect(),
                AbuseConfig(
                    window_seconds=settings.abuse_window,
                    history_days=settings.abuse_history_days,
                    image_model=settings.image_gen_model,
                ),
                outbox.store_from_thread,
            ),
            catalog,
        )
        self.runtime = runtime
        self.api.state.runtime = runtime
        background = [asyncio.create_task(outbox.run(), name="tokentill-alerts")]
        if settings.quotas_enabled:
            # Counters are seeded from the warehouse: let the journal replay land first.
            if not await asyncio.to_thread(writer.flush, 120.0):
                raise RuntimeError("the journal replay did not reach DuckDB in time")
            quota_service = QuotaService(
                settings,
                runtime.connect,
                outbox.raise_alert,
                lambda: writer.flush(60.0),
                catalog,
            )
            await asyncio.to_thread(quota_service.start)
            runtime.quotas = quota_service
            outbox.listeners.append(quota_service.on_alert)
            recorder.quotas = quota_service.book
            self.proxy.admission = quota_service.admit
            background.append(
                asyncio.create_task(quota_service.refresh_forever(), name="tokentill-prices")
            )
        scheduler = start_scheduler(
            rollup,
            settings.rollup_interval,
            {"abuse": (runtime.abuse.run, settings.abuse_interval)},
            then=lambda: _post_adjustments(runtime),
        )
        if self.api.state.admin_token is None:
            log.warning("no TOKENTILL_ADMIN_TOKEN: the admin API answers loopback clients only")
        self.proxy.client, self.proxy.recorder = client, recorder
        self.proxy.batches = batches
        runtime.ready = True
        # Everything built so far lives as long as the process: keep the cyclic GC from
        # walking it on every collection (shorter pauses on the proxy's hot path).
        gc.freeze()
        log.info("tokentill ready: proxy -> %s, warehouse %s", settings.upstream, settings.db)
        try:
            yield
        finally:
            runtime.ready = False
            self.proxy.client = self.proxy.recorder = None
            self.proxy.batches = None
            await asyncio.to_thread(stop_scheduler, scheduler, rollup)
            for task in (poller_task, batch_task, *background):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await outbox.close()
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
            await client.aclose()
            # The whole shutdown stays under 10 s: uvicorn used up to `shutdown_grace` already.
            drained = await asyncio.to_thread(writer.stop, max(1.0, 9.0 - settings.shutdown_grace))
            journal.close()
            if drained:
                readers.close()
                conn.close()
                log.info("writer flushed: %d events written this run", writer.stats.events_written)
            else:
                log.error(
                    "writer did not drain in time; the journal will be replayed at next start"
                )


def _post_adjustments(runtime: Runtime) -> None:
    """After each rollup run: late changes to closed months post into the next open one."""
    conn = runtime.connect()
    try:
        posted = post_adjustments(conn, datetime.now(UTC))
        if posted:
            log.info("closed periods: %d adjustment rows posted", posted)
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
