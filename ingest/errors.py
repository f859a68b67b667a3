"""OpenAI's error shape, for every answer tokentill itself gives on /v1.

`{"error": {"message": str, "type": str, "param": str | null, "code": str | null}}`.
The types we use: `invalid_request_error` (the client's request is at fault, 4xx),
`upstream_error` (the upstream could not be reached or answered nonsense, 502/504),
and, from the quota issue on, `insufficient_quota` (429).
"""

from __future__ import annotations

import orjson
from starlette.types import Send

JSON_HEADERS = [(b"content-type", b"application/json")]


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


async def send_error(
    send: Send,
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = error_body(message, type_, code, param)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                *JSON_HEADERS,
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
