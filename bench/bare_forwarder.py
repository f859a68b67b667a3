"""A bare forwarder: the floor any Python/uvicorn proxy pays, for bench/proxy.py to compare
tokentill against.

It reads the request body, forwards the request with the HTTP/1.1 client tokentill uses
(`ingest.http1.HTTP1Upstream`, same settings), and hands the answer back: read whole for
a plain answer, chunk by chunk for a stream (`text/event-stream`). No parsing, no
metering, no journal: whatever tokentill costs above this is its metering.

It runs under uvicorn with the options `tokentill serve` uses (httptools, uvloop, no
access log, no proxy headers, no Server or Date header):

    BARE_UPSTREAM=http://127.0.0.1:8001 python -m bench.bare_forwarder --port 8002

from the repository's root (so that `ingest` and `bench` import),

or, with uvicorn's own command line (give it the same options by hand):

    BARE_UPSTREAM=http://127.0.0.1:8001 python -m uvicorn bench.bare_forwarder:app \
        --http httptools --loop uvloop --no-access-log --no-proxy-headers \
        --no-server-header --no-date-header --port 8002
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from tokentill.ingest.http1 import HTTP1Upstream
from tokentill.ingest.upstream import UpstreamError

UPSTREAM_ENV = "BARE_UPSTREAM"

# Not passed on to the upstream: the client writes its own Host and Content-Length.
_REQUEST_DROP = frozenset(
    {b"host", b"content-length", b"connection", b"keep-alive", b"transfer-encoding"}
)
# Not passed back: uvicorn frames the answer itself.
_RESPONSE_DROP = frozenset({b"transfer-encoding", b"connection", b"keep-alive"})


class BareForwarder:
    """An ASGI app forwarding every HTTP request to one upstream origin, as is."""

    def __init__(self, upstream: str | None = None) -> None:
        self._upstream = upstream
        self._client: HTTP1Upstream | None = None

    def _base(self) -> str:
        if self._upstream is None:
            base = os.environ.get(UPSTREAM_ENV, "").rstrip("/")
            if not base:
                raise RuntimeError(f"set {UPSTREAM_ENV} to the upstream's base URL")
            self._upstream = base
        return self._upstream

    def _get_client(self) -> HTTP1Upstream:
        # Created lazily, inside the running loop (its semaphore binds to it).
        client = self._client
        if client is None:
            client = self._client = HTTP1Upstream(
                self._base(), connect_timeout=10, read_timeout=600, max_connections=512
            )
        return client

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)

        url = self._base() + scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        headers = [(k, v) for k, v in scope["headers"] if k not in _REQUEST_DROP]
        try:
            response = await self._get_client().send(scope["method"], url, headers, body)
        except UpstreamError as exc:
            await send_text(send, 502, f"upstream error: {exc}\n")
            return
        try:
            out = [(k, v) for k, v in response.raw_headers if k.lower() not in _RESPONSE_DROP]
            content_type = response.header("content-type") or ""
            if content_type.startswith("text/event-stream"):
                await send(
                    {"type": "http.response.start", "status": response.status, "headers": out}
                )
                async for chunk in response.iter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            else:
                data = await response.read()
                await send(
                    {"type": "http.response.start", "status": response.status, "headers": out}
                )
                await send({"type": "http.response.body", "body": data})
        finally:
            response.close()

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self._base()
                except RuntimeError as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def send_text(send: Any, status: int, text: str) -> None:
    body = text.encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


app = BareForwarder()


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        http="httptools",
        loop="uvloop",
        log_level=args.log_level,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        date_header=False,
        timeout_graceful_shutdown=5,
        lifespan="on",
        backlog=4096,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
