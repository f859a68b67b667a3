"""The seam between the proxy and the upstream HTTP API.

`Upstream` is what the proxy and the poller need: send a request, get status, raw
headers and the body as it arrives, untouched (no decompression, no re-framing).
`AiohttpUpstream` is the real one. aiohttp rather than httpx because this is the hot
path: measured here, httpx spent about 2.2 ms of CPU per proxied request at 16
concurrent connections, aiohttp about 0.16 ms.

Errors: `UpstreamTimeout` (connect or read timed out) and `UpstreamUnreachable`
(anything else at the transport level: refused, reset, a broken answer); both are
`UpstreamError`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import aiohttp
from multidict import CIMultiDict

RawHeaders = Sequence[tuple[bytes, bytes]]
# A request body: whole, or streamed as it arrives (uploads through unmetered routes).
Body = bytes | AsyncIterator[bytes] | None


class UpstreamError(Exception):
    """The upstream could not give an answer."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not connect or answer in time."""


class UpstreamUnreachable(UpstreamError):
    """The connection failed or broke."""


class UpstreamResponse(Protocol):
    status: int
    raw_headers: RawHeaders

    def header(self, name: str) -> str | None: ...

    def iter_raw(self) -> AsyncIterator[bytes]: ...

    async def read(self) -> bytes: ...

    def close(self) -> None:
        """Release the connection: back to the pool if the body was read, else dropped."""


class Upstream(Protocol):
    async def send(
        self, method: str, url: str, headers: Sequence[tuple[str, str]], body: Body
    ) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...


class _AiohttpResponse:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.raw_headers: RawHeaders = response.raw_headers

    def header(self, name: str) -> str | None:
        return self._response.headers.get(name)

    async def iter_raw(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except TimeoutError as exc:
            raise UpstreamTimeout(str(exc) or type(exc).__name__) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnreachable(str(exc) or type(exc).__name__) from exc

    async def read(self) -> bytes:
        chunks = [chunk async for chunk in self.iter_raw()]
        return b"".join(chunks)

    def close(self) -> None:
        self._response.release()


class AiohttpUpstream:
    """Pooled keep-alive connections to the upstream; bytes pass as they are."""

    # Headers aiohttp would otherwise add on its own: we forward the client's, no more.
    _SKIP_AUTO = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})

    def __init__(
        self, *, connect_timeout: float, read_timeout: float, max_connections: int
    ) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=max_connections, limit_per_host=max_connections, keepalive_timeout=30
            ),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=connect_timeout, sock_read=read_timeout
            ),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=self._SKIP_AUTO,
        )

    async def send(
        self, method: str, url: str, headers: Sequence[tuple[str, str]], body: Body
    ) -> UpstreamResponse:
        try:
            response = await self._session.request(
                method,
                url,
                headers=CIMultiDict(headers),
                data=body or None,
                allow_redirects=False,
            )
        except TimeoutError as exc:
            raise UpstreamTimeout(str(exc) or type(exc).__name__) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnreachable(str(exc) or type(exc).__name__) from exc
        return _AiohttpResponse(response)

    async def aclose(self) -> None:
        await self._session.close()
