"""The dashboard's session cookie: signed with a key from the admin token, expiring."""

from __future__ import annotations

from tokentill.api import session

TOKEN = "admin-token-for-the-session-tests"


def test_a_cookie_holds_until_it_expires() -> None:
    cookie = session.issue(TOKEN, now=1_000_000.0, lifetime=3600)
    assert session.is_valid(cookie, TOKEN, now=1_000_000.0)
    assert session.is_valid(cookie, TOKEN, now=1_003_599.0)
    assert not session.is_valid(cookie, TOKEN, now=1_003_600.0)
    assert TOKEN not in cookie


def test_a_cookie_is_bound_to_its_token_and_cannot_be_edited() -> None:
    cookie = session.issue(TOKEN, now=1_000_000.0, lifetime=3600)
    assert not session.is_valid(cookie, TOKEN + "-rotated", now=1_000_000.0)
    expires, nonce, mac = cookie.split(".")
    longer = f"{int(expires) + 10**6}.{nonce}.{mac}"
    assert not session.is_valid(longer, TOKEN, now=1_000_000.0)
    for bad in (None, "", "x", "1.2", "..", f"{expires}.{nonce}.", "a" * 300):
        assert not session.is_valid(bad, TOKEN, now=1_000_000.0)
    assert session.issue(TOKEN, now=1.0, lifetime=1) != session.issue(TOKEN, now=1.0, lifetime=1)
