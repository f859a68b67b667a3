"""Browser sessions for the admin surfaces: a signed, expiring cookie set by the
dashboard's login page, accepted by `require_admin` beside the bearer token.

The cookie holds no secret: `<expires>.<nonce>.<hmac>`, signed with a key derived from
the admin token. Changing the token therefore ends every session, and a restart keeps
them (nothing is stored server side).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

COOKIE = "tokentill_session"


def _key(admin_token: str) -> bytes:
    # A key of its own, so a cookie's MAC never doubles as anything made with the token.
    return hashlib.sha256(b"tokentill dashboard session\0" + admin_token.encode()).digest()


def _sign(admin_token: str, body: str) -> str:
    return hmac.new(_key(admin_token), body.encode(), hashlib.sha256).hexdigest()


def issue(admin_token: str, *, now: float, lifetime: float) -> str:
    """A new session cookie value, valid until `now + lifetime` (Unix seconds)."""
    body = f"{int(now + lifetime)}.{secrets.token_urlsafe(16)}"
    return f"{body}.{_sign(admin_token, body)}"


def is_valid(cookie: str | None, admin_token: str, *, now: float) -> bool:
    """True for a cookie this token signed that has not expired (MAC compared in
    constant time)."""
    if not cookie or len(cookie) > 200:
        return False
    body, _, mac = cookie.rpartition(".")
    expires, _, _ = body.partition(".")
    if not expires.isdigit():
        return False
    good = hmac.compare_digest(mac.encode(), _sign(admin_token, body).encode())
    return good and int(expires) > now


def csrf_token(cookie: str, admin_token: str) -> str:
    """The CSRF token of a session: state-changing requests authenticated by the cookie
    must carry it in `X-CSRF-Token` (a page on another site can make the browser send
    the cookie, not read this)."""
    return hmac.new(_key(admin_token), b"csrf\0" + cookie.encode(), hashlib.sha256).hexdigest()
