"""What every /api route depends on: the admin token, and the service's runtime.

`Authorization: Bearer $TOKENTILL_ADMIN_TOKEN` on every route (compared in constant
time), or the session cookie the dashboard's login page sets (api/session.py), so the
dashboard's scripts and /api/docs work in a logged-in browser. A request that sends an
Authorization header is judged by it alone. With no token configured, only loopback
clients are served.

A state-changing request authenticated by the cookie must also carry the session's
CSRF token (`X-CSRF-Token`). Wrong tokens count against the client's address
(api/auth_limit.py): past the limit it gets 429 without its token being compared.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, HTTPException, Request, status

from tokentill.api import session
from tokentill.api.auth_limit import AuthLimiter

if TYPE_CHECKING:
    from tokentill.api.runtime import AdminRuntime


def runtime(request: Request) -> AdminRuntime:
    found: AdminRuntime | None = request.app.state.runtime
    if found is None or not found.ready:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "tokentill is starting")
    return found


RuntimeDep = Annotated["AdminRuntime", Depends(runtime)]


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def refuse_if_locked_out(request: Request) -> None:
    limiter: AuthLimiter | None = getattr(request.app.state, "auth_limiter", None)
    wait = limiter.retry_after(client_address(request)) if limiter else None
    if wait is not None:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            "too many wrong admin tokens from this address: try again later",
            headers={"Retry-After": str(wait)},
        )


def note_failure(request: Request) -> None:
    limiter: AuthLimiter | None = getattr(request.app.state, "auth_limiter", None)
    if limiter is not None:
        limiter.failed(client_address(request))


def require_admin(request: Request) -> None:
    token = request.app.state.admin_token
    if token is None:
        if not _is_loopback(request.client.host if request.client else None):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                "no admin token is configured: /api is served to loopback clients only",
            )
        return
    refuse_if_locked_out(request)
    given = request.headers.get("authorization")
    cookie = request.cookies.get(session.COOKIE)
    if given is None and session.is_valid(cookie, token, now=time.time()):
        assert cookie is not None
        if request.method not in _SAFE_METHODS:
            sent = request.headers.get("x-csrf-token", "")
            if not hmac.compare_digest(sent.encode(), session.csrf_token(cookie, token).encode()):
                raise HTTPException(
                    status.HTTP_403_FORBIDDEN,
                    "a state-changing request with the session cookie needs its X-CSRF-Token",
                )
        return
    scheme, _, value = (given or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), token.encode()):
        if given is not None:
            note_failure(request)  # a wrong token, not merely a browser not logged in
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or wrong admin token (Authorization: Bearer ...)",
            headers={"WWW-Authenticate": "Bearer"},
        )


AdminDep = Depends(require_admin)
