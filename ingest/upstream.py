"""The seam between the proxy and the upstream HTTP API.

`Upstream` is what the proxy and the poller need: send a request, get status, raw
headers and the body as it arrives, untouched (no decompression, no re-framing).
`ingest.http1.HTTP1Upstream` is the real one; tests of the proxy's own logic may pass
another through `create_app(settings, upstream=...)`.

Errors: `UpstreamTimeout` (connect or read timed out) and `UpstreamUnreachable`
(anything else at the transport level: refused, reset, a broken answer); both are
`UpstreamError`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

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
    @property
    def status(self) -> int: ...

    @property
    def raw_headers(self) -> RawHeaders: ...

    def header(self, name: str) -> str | None: ...

    def iter_raw(self) -> AsyncIterator[bytes]: ...

    async def read(self) -> bytes: ...

    def close(self) -> None:
        """Release the connection: back to the pool if the body was read, else dropped."""


class Upstream(Protocol):
    async def send(
        self, method: str, url: str, headers: RawHeaders, body: Body
    ) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...
