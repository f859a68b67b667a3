"""Running an app under uvicorn, with a shutdown that exits 0 on SIGTERM/SIGINT."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp


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
    app: ASGIApp, host: str, port: int, *, graceful: int = 5, log_level: str = "info"
) -> bool:
    """Serve until a signal; return True when the server started and stopped cleanly."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
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
    server.run()
    return server.started
