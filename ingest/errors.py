"""Answers tokentill itself gives on /v1, in OpenAI's error shape (the body, and the
refusal every admission hook raises, are defined once in `warehouse/openai_errors.py`)."""

from __future__ import annotations

from starlette.types import Send

from tokentill.warehouse.openai_errors import RequestRejectedError, error_body

JSON_HEADERS = [(b"content-type", b"application/json")]


__all__ = ["JSON_HEADERS", "RequestRejectedError", "error_body", "send_error"]


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
