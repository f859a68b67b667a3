"""The dashboard's login: a page that takes the admin token once and sets a signed,
expiring session cookie (HttpOnly, SameSite=Strict; never the token in a URL), and the
check every view runs (`viewer`), which sends a browser without a session to that page."""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from tokentill.api import session
from tokentill.api.deps import client_address, note_failure, refuse_if_locked_out, require_admin
from tokentill.dashboards.layout import document, esc

router = APIRouter(include_in_schema=False)
HOME = "/dashboard/"
# A wrong token costs the guesser this long (the token is 16+ characters anyway).
WRONG_TOKEN_DELAY = 0.25


def viewer(request: Request) -> None:
    """The dashboard's access rule is the admin API's (bearer token or session cookie;
    loopback only with no token configured), with a browser sent to log in first."""
    try:
        require_admin(request)
    except HTTPException as exc:
        if exc.status_code != status.HTTP_401_UNAUTHORIZED:
            raise
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise HTTPException(
            status.HTTP_303_SEE_OTHER,
            "log in first",
            headers={"Location": "/dashboard/login?" + urlencode({"next": target})},
        ) from None


ViewerDep = Depends(viewer)


def safe_next(target: str | None) -> str:
    """Only back into the dashboard or the API docs: never an open redirect."""
    if (
        target
        and target.startswith(("/dashboard", "/api/docs"))
        and "\\" not in target
        and not target.startswith("//")
    ):
        return target
    return HOME


def _login_page(next_: str, message: str = "", *, status_code: int = 200) -> HTMLResponse:
    error = f'<p class="notice error" id="login-error">{esc(message)}</p>' if message else ""
    body = f"""<main class="login"><h1>tokentill</h1>
<form method="post" action="/dashboard/login" id="login">
<label>Admin token <input type="password" name="token" autocomplete="current-password"
 required autofocus></label>
<input type="hidden" name="next" value="{esc(next_)}">
<button type="submit">Log in</button></form>{error}
<p class="hint">The value of <code>TOKENTILL_ADMIN_TOKEN</code>. The session lasts a few
hours; logging out or changing the token ends it.</p></main>"""
    return document("Log in", body, status_code=status_code)


@router.get("/dashboard/login")
async def login_form(request: Request, next: str | None = None) -> Response:
    if request.app.state.admin_token is None:
        return RedirectResponse(safe_next(next), status.HTTP_303_SEE_OTHER)
    return _login_page(safe_next(next))


@router.post("/dashboard/login")
async def log_in(
    request: Request,
    token: Annotated[str, Form(max_length=4096)],
    next: Annotated[str, Form(max_length=4096)] = HOME,
) -> Response:
    admin: str | None = request.app.state.admin_token
    if admin is None:
        return RedirectResponse(safe_next(next), status.HTTP_303_SEE_OTHER)
    refuse_if_locked_out(request)
    if not hmac.compare_digest(token.encode(), admin.encode()):
        note_failure(request)
        await asyncio.sleep(WRONG_TOKEN_DELAY)
        return _login_page(
            safe_next(next),
            "That is not the admin token.",
            status_code=status.HTTP_401_UNAUTHORIZED,
        )
    limiter = getattr(request.app.state, "auth_limiter", None)
    if limiter is not None:
        limiter.succeeded(client_address(request))
    lifetime: float = request.app.state.session_lifetime
    answer = RedirectResponse(safe_next(next), status.HTTP_303_SEE_OTHER)
    answer.set_cookie(
        session.COOKIE,
        session.issue(admin, now=time.time(), lifetime=lifetime),
        max_age=int(lifetime),
        path="/",
        httponly=True,
        samesite="strict",
        # Secure only over https: on plain http (loopback) the browser would drop it.
        secure=request.url.scheme == "https",
    )
    return answer


@router.post("/dashboard/logout")
async def log_out() -> Response:
    answer = RedirectResponse("/dashboard/login", status.HTTP_303_SEE_OTHER)
    answer.delete_cookie(session.COOKIE, path="/", httponly=True, samesite="strict")
    return answer
