"""Who may talk to the server: the ``Host`` header (DNS rebinding) and, for writes, the
``Origin`` header (cross-site requests from any web page the user visits).

A browser on ``http://evil.example`` can POST a multipart form to ``http://127.0.0.1:8000``
(no CORS pre-flight is needed for a form), and a rebinding DNS name can make the browser treat
the server as that site's own. So by default the server answers only requests addressed to a
local name (``localhost``, ``127.0.0.1``, ``[::1]``, plus the ``--host`` it listens on), and
refuses any write (POST, PUT, PATCH, DELETE) whose ``Origin`` is not the server itself or an
allowed origin. ``--allow-host`` / ``--allow-origin`` add others (docs/serve.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["LOCAL_HOSTS", "HostAndOriginGuard"]

#: Host names a local server answers to by default.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
_WRITES = {"POST", "PUT", "PATCH", "DELETE"}


def _host_name(value: str) -> str:
    """The host of a ``Host`` header value (``name``, ``name:port``, ``[v6]:port``), lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class HostAndOriginGuard:
    """ASGI middleware: 400 for an unexpected ``Host``, 403 for a cross-origin write."""

    def __init__(
        self, app: ASGIApp, allowed_hosts: Iterable[str], allowed_origins: Iterable[str]
    ) -> None:
        self.app = app
        self.hosts = {_host_name(h) for h in allowed_hosts}
        self.allow_any_host = "*" in self.hosts
        self.origins = {o.strip().rstrip("/").lower() for o in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if not self.allow_any_host and _host_name(host) not in self.hosts:
            message = (
                f"requests addressed to host {host!r} are not served; start the server with "
                "--allow-host NAME to accept that name"
            )
            await JSONResponse({"error": message}, status_code=400)(scope, receive, send)
            return
        origin = headers.get("origin")
        if scope.get("method", "GET") in _WRITES and origin is not None:
            normalised = origin.strip().rstrip("/").lower()
            own = {f"http://{host.lower()}", f"https://{host.lower()}"}
            if normalised not in own and normalised not in self.origins:
                parsed = urlsplit(normalised)
                message = (
                    f"cross-origin write from {parsed.scheme}://{parsed.netloc} refused; start "
                    "the server with --allow-origin ORIGIN to accept it"
                )
                await JSONResponse({"error": message}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)
