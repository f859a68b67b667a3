"""What every /api route depends on: the admin token, and the service's runtime.

`Authorization: Bearer $TOKENTILL_ADMIN_TOKEN` on every route (compared in constant
time), or the session cookie the dashboard's login page sets (api/session.py), so the
dashboard's scripts and /api/docs work in a logged-in browser. A request that sends an
Authorization header is judged by it alone. With no token configured, only loopback
clients are served.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, HTTPException, Request, status

from api import session

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
    given = request.headers.get("authorization")
    if given is None and session.is_valid(
        request.cookies.get(session.COOKIE), token, now=time.time()
    ):
        return
    scheme, _, value = (given or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), token.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or wrong admin token (Authorization: Bearer ...)",
            headers={"WWW-Authenticate": "Bearer"},
        )


AdminDep = Depends(require_admin)
