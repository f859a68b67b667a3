"""What every /api route depends on: the admin token, and the service's runtime.

`Authorization: Bearer $TOKENTILL_ADMIN_TOKEN` on every route (compared in constant
time). With no token configured, only loopback clients are served.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, HTTPException, Request, status

if TYPE_CHECKING:
    from tokentill.app import Runtime


def runtime(request: Request) -> Runtime:
    found: Runtime | None = request.app.state.runtime
    if found is None or not found.ready:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "tokentill is starting")
    return found


RuntimeDep = Annotated["Runtime", Depends(runtime)]


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_admin(request: Request) -> None:
    token = request.app.state.admin_token
    if token is None:
        if not _is_loopback(request.client.host if request.client else None):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                "no admin token is configured: /api is served to loopback clients only",
            )
        return
    given = request.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), token.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or wrong admin token (Authorization: Bearer ...)",
            headers={"WWW-Authenticate": "Bearer"},
        )


AdminDep = Depends(require_admin)
