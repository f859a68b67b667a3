"""OpenAI's error shape, defined once: every answer tokentill itself gives on /v1 (the
proxy's refusals, its 502s and 503s) and on the OpenAI-shaped usage routes of the admin
API uses it, as OpenAI's own API does:

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

It sits in the bottom layer because both the proxy (`ingest/errors.py` sends it) and the
admin API (`api/openai_usage.py` answers with it and documents it) read it, and neither
may import the other. The types we use: `invalid_request_error` (the client's request is
at fault, 4xx), `insufficient_quota` (429), `upstream_error` (502/504), `server_error`
(tokentill cannot serve now, 503).
"""

from __future__ import annotations

import orjson
from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """The body, as a model: FastAPI's OpenAPI document describes the routes' errors
    with it."""

    error: ErrorDetail


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


class RequestRejectedError(Exception):
    """The request is refused before reaching the upstream (answered in OpenAI's shape).
    Quotas, blocks and batch admission raise their own kinds of it."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        *,
        type_: str = "invalid_request_error",
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type, self.headers = type_, headers
