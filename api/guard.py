"""Browser-borne attacks on the admin surfaces (`/api`, `/dashboard`), refused at the door.

- **Host.** A request whose `Host` is not one of the names tokentill answers to is
  refused (400). Without this a page on any site could reach a loopback tokentill by
  DNS rebinding (its name resolving to 127.0.0.1), and with no admin token configured
  the admin API trusts loopback clients. The names: `allowed_hosts`, or by default the
  loopback names and the configured `host`.
- **Cross-site writes.** A state-changing request (anything but GET, HEAD, OPTIONS)
  that a browser marks as coming from another site (`Sec-Fetch-Site` other than
  `same-origin` or `none`), or whose `Origin` is not this server's own origin (another
  port of the same host is another origin), is refused (403), whatever it carries: a
  `no-cors` fetch or a text/plain form from a page on the same machine cannot
  acknowledge an alert or start a rollup. Clients that are not browsers send neither
  header and are judged by their token alone.
- **Redirects** name a path, never a host: a `Location` built from the request's own
  `Host` is made relative, so a forged `Host` cannot redirect anyone elsewhere.

/v1 (the proxy) is not guarded here: API clients reach it under any name.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokentill.api.errors import plain_error

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_GUARDED = ("/api", "/dashboard")
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def default_hosts(bind_host: str) -> tuple[str, ...]:
    """The loopback names, and the address tokentill binds to when it is a specific one."""
    names = list(_LOOPBACK_NAMES)
    if bind_host not in ("0.0.0.0", "::", ""):
        names.append(bind_host)
    return tuple(names)


class AdminGuard:
    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str]) -> None:
        self.app = app
        hosts = {h.lower() for h in allowed_hosts}
        self._any_host = "*" in hosts
        self._hosts = frozenset(hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(_GUARDED):
            await self.app(scope, receive, send)
            return
        headers = {
            k: v for k, v in scope["headers"] if k in (b"host", b"origin", b"sec-fetch-site")
        }
        host = headers.get(b"host", b"").decode("latin-1").lower()
        if not self._host_allowed(host):
            await plain_error(send, 400, "Invalid Host header: this server does not answer to it.")
            return
        if scope["method"] not in _SAFE_METHODS:
            reason = _cross_site(scope, host, headers)
            if reason is not None:
                await plain_error(send, 403, f"Cross-site request refused: {reason}.")
                return

        async def relative_redirects(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    (k, _relative(v, host) if k.lower() == b"location" else v)
                    for k, v in message.get("headers", [])
                ]
            await send(message)

        await self.app(scope, receive, relative_redirects)

    def _host_allowed(self, host: str) -> bool:
        if self._any_host:
            return True
        if host in self._hosts:
            return True
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name in self._hosts


def _cross_site(scope: Scope, host: str, headers: dict[bytes, bytes]) -> str | None:
    site = headers.get(b"sec-fetch-site")
    if site is not None and site not in (b"same-origin", b"none"):
        return f"Sec-Fetch-Site is {site.decode('latin-1')}"
    origin = headers.get(b"origin")
    if origin is not None:
        expected = f"{scope.get('scheme', 'http')}://{host}"
        if origin.decode("latin-1").lower() != expected:
            return f"Origin {origin.decode('latin-1')} is not {expected}"
    return None


def _relative(location: bytes, host: str) -> bytes:
    """`http://<request host>/path?q` becomes `/path?q`; other locations stay."""
    parts = urlsplit(location.decode("latin-1"))
    if parts.scheme in ("http", "https") and parts.netloc.lower() == host:
        relative = parts.path or "/"
        if parts.query:
            relative += "?" + parts.query
        return relative.encode("latin-1")
    return location
