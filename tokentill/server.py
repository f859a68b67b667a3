"""Running an app under uvicorn, with a shutdown that exits 0 on SIGTERM/SIGINT, a bound
on open connections, and a deadline for a request's headers.

uvicorn closes a keep-alive connection that stays idle, but not one that dribbles its
headers a byte at a time: thousands of those hold their sockets open forever. So every
connection gets `header_timeout` seconds from its opening (and from the start of each
later request on it) to send complete headers, or it is closed. `max_connections`
(uvicorn's `limit_concurrency`) answers 503 past that many connections and requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeaderDeadline(HttpToolsProtocol):
    """uvicorn's HTTP protocol with a deadline on each request's headers."""

    header_timeout = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def protocol_with_deadline(seconds: float) -> type[HeaderDeadline]:
    return type("HeaderDeadlineProtocol", (HeaderDeadline,), {"header_timeout": seconds})


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the captured signal after a graceful shutdown, which makes
        # the process die of SIGTERM (exit 143). A clean, flushed shutdown is a success.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def serve(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    graceful: int = 5,
    log_level: str = "info",
    header_timeout: float = 10.0,
    max_connections: int | None = None,
) -> bool:
    """Serve until a signal; return True when the server started and stopped cleanly."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol_with_deadline(header_timeout),
        limit_concurrency=max_connections,
        log_level=log_level,
        access_log=False,
        server_header=False,
        proxy_headers=False,  # tokentill is the first hop; X-Forwarded-* are passed on as is
        date_header=False,
        timeout_graceful_shutdown=graceful,
        lifespan="on",
        backlog=4096,
    )
    server = _Server(config)
    deliberate = _DeliberateCuts()
    logging.getLogger("uvicorn.error").addFilter(deliberate)
    try:
        server.run()
    finally:
        logging.getLogger("uvicorn.error").removeFilter(deliberate)
    return server.started


class _DeliberateCuts(logging.Filter):
    """The proxy ends a response mid-body on purpose when the upstream's broke off (an
    answer ended cleanly would tell the client it was whole); uvicorn logs each as an
    error. Those are the upstream's failures, recorded in the row and counted in the
    metrics, not tokentill's: they are not logged as errors of the server."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing response."
