"""The upstream end of a proxied WebSocket, on the `websockets` library.

`WebsocketsUpstream` is the real `SocketUpstream` (see `ingest.socket_proxy` for the
seam and its errors).
"""

from __future__ import annotations

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidStatus
from websockets.typing import Subprotocol

from tokentill.ingest.socket_proxy import Frame, UpstreamRefused, UpstreamSocketClosed
from tokentill.ingest.upstream import RawHeaders, UpstreamTimeout, UpstreamUnreachable

# One event of the Responses API (an image's base64 in an output item) can be large;
# the library's 1 MiB default would cut such a socket.
_MAX_FRAME = 64 * 1024 * 1024


class _Socket:
    def __init__(self, connection: ClientConnection) -> None:
        self._connection = connection

    @property
    def subprotocol(self) -> str | None:
        return self._connection.subprotocol

    async def recv(self) -> Frame:
        try:
            return await self._connection.recv()
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            raise UpstreamSocketClosed(code, isinstance(exc, ConnectionClosedOK)) from None

    async def send(self, frame: Frame) -> None:
        try:
            await self._connection.send(frame)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            raise UpstreamSocketClosed(code, isinstance(exc, ConnectionClosedOK)) from None

    async def close(self, code: int = 1000) -> None:
        await self._connection.close(code)


class WebsocketsUpstream:
    def __init__(self, connect_timeout: float) -> None:
        self._connect_timeout = connect_timeout

    async def connect(self, url: str, headers: RawHeaders, subprotocols: list[str]) -> _Socket:
        try:
            connection = await connect(
                url,
                additional_headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers],
                subprotocols=[Subprotocol(p) for p in subprotocols] or None,
                user_agent_header=None,  # the client's own User-Agent is forwarded
                open_timeout=self._connect_timeout,
                max_size=_MAX_FRAME,
                proxy=None,
            )
        except InvalidStatus as exc:
            response = exc.response
            raise UpstreamRefused(
                response.status_code,
                [
                    (k.encode("latin-1"), v.encode("latin-1"))
                    for k, v in response.headers.raw_items()
                ],
                bytes(response.body or b""),
            ) from None
        except TimeoutError as exc:
            raise UpstreamTimeout(str(exc) or "handshake timed out") from None
        except (OSError, ValueError) as exc:
            raise UpstreamUnreachable(str(exc)) from None
        except Exception as exc:
            raise UpstreamUnreachable(f"{type(exc).__name__}: {exc}") from None
        return _Socket(connection)
