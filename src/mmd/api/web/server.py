"""The HTTP listener: aiohttp on the daemon's own event loop, one site per ``[http]
listen`` address, the guards every request passes, and domain errors as HTTP statuses.

aiohttp because it serves TCP and Unix sockets from one runner on the running loop
(no second loop, no thread, no signal handlers of its own), cancels a handler whose
client disconnected (``handler_cancellation``: the generation upstream stops, as with
gRPC), and parses HTTP in C (llhttp).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mmd.config.http import HttpAccess, HttpSettings, Listen
from mmd.core.errors import ConfigError, InvalidRequest, MmdError, QueueFull
from mmd.host import rundir

if TYPE_CHECKING:
    from mmd.engine.engine import Engine

log = logging.getLogger("mmd.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The HTTP statuses of mmd's error kinds (the gRPC status each kind maps to, in HTTP).
STATUS_OF_KIND = {
    "unknown_model": 404,  # NOT_FOUND
    "invalid_request": 400,  # INVALID_ARGUMENT
    "queue_full": 429,  # RESOURCE_EXHAUSTED, with Retry-After
    "insufficient_memory": 507,  # RESOURCE_EXHAUSTED: the model does not fit
    "failed_precondition": 409,  # FAILED_PRECONDITION
    "busy": 409,  # DEADLINE_EXCEEDED: an unload that waited for running requests
    "runtime_failed": 503,  # UNAVAILABLE
    "aborted": 503,  # ABORTED: a forced unload or a shutdown
    "internal": 500,
}
# OpenAI's error "type" for each status class a client library tells apart.
_OPENAI_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}
RETRY_AFTER_S = 1
# Every error names its kind in this header too, so that a proxy can act on the kind
# without reading the body (deploy/haproxy/ gives a 503 "insufficient_memory" its 507
# back once no other node could answer).
ERROR_KIND_HEADER = "X-Mmd-Error"
# JSON envelope around a prompt: a body may be this much larger than max_prompt_bytes
# (escapes, keys, other fields) before it is refused unread.
_BODY_OVERHEAD = 64 * 1024
# Paths served without an API key: the dashboard's page and its static files, which
# hold no data (everything they show comes from endpoints that need the key).
PUBLIC_PREFIXES = ("/static/",)
PUBLIC_PATHS = frozenset({"/", "/favicon.ico"})
# Host names a browser on this machine uses for a loopback listener. Any other Host on
# a loopback TCP listener is a DNS-rebinding page in a browser: refused.
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


def error_response(status: int, message: str, kind: str) -> web.Response:
    """OpenAI's error shape: {"error": {"message", "type", "code", "param"}}."""
    payload = {
        "error": {
            "message": message,
            "type": _OPENAI_TYPE.get(status, "server_error" if status >= 500 else "error"),
            "code": kind,
            "param": None,
        }
    }
    headers = {ERROR_KIND_HEADER: kind}
    if status == 429:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    return web.json_response(payload, status=status, headers=headers)


def mmd_error_response(error: MmdError, insufficient_memory_status: int = 507) -> web.Response:
    status = STATUS_OF_KIND.get(error.kind, 500)
    if isinstance(error, QueueFull):
        status = 429
    elif error.kind == "insufficient_memory":
        status = insufficient_memory_status  # [http] insufficient_memory_status
    return error_response(status, error.message, error.kind)


def _http_kind(status: int) -> str:
    return {
        401: "unauthorized",
        403: "forbidden",
        404: "not_found",
        405: "method_not_allowed",
        413: "too_large",
        415: "unsupported_media_type",
    }.get(status, "invalid_request" if status < 500 else "internal")


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class HttpFront:
    """The listener's lifecycle (start, stop accepting, close) and its guards."""

    def __init__(self, engine: Engine, settings: HttpSettings, access: HttpAccess) -> None:
        self.engine = engine
        self.settings = settings
        self.access = access
        limit = engine.config.daemon.max_prompt_bytes * 2 + _BODY_OVERHEAD
        self.app = web.Application(client_max_size=limit, middlewares=[self._errors, self._guard])
        self.app["engine"] = engine
        self._runner: web.AppRunner | None = None
        self._sites: list[web.BaseSite] = []
        self._unix_paths: list[Any] = []
        self.addresses: list[str] = []

    def add_routes(self, add: Callable[[web.Application, Engine], None]) -> None:
        add(self.app, self.engine)

    async def start(self) -> None:
        """Bind every address (ConfigError naming the one that failed; none stays bound)."""
        self._runner = web.AppRunner(
            self.app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        try:
            for address in self.settings.listen:
                await self._bind(address)
        except BaseException:
            await self.close()
            raise
        for text in self.addresses:
            log.info("HTTP API on %s", text)

    async def _bind(self, address: Listen) -> None:
        assert self._runner is not None
        site: web.BaseSite
        try:
            if address.path is not None:
                rundir.prepare_socket_dir(address.path)
                try:
                    rundir.remove_dead_socket(address.path)
                except rundir.SocketInTheWay as err:
                    raise ConfigError(f"http.listen: {err}") from None
                old_umask = os.umask(0o117)  # rw for owner and group, as the gRPC socket
                try:
                    site = web.UnixSite(self._runner, str(address.path))
                    await site.start()
                finally:
                    os.umask(old_umask)
                self._unix_paths.append(address.path)
                self.addresses.append(f"unix:{address.path}")
            else:
                site = web.TCPSite(self._runner, address.host, address.port, reuse_address=True)
                await site.start()
                # The bound port, when the config said 0 (a free one).
                sockets = getattr(site._server, "sockets", None) or ()
                port = sockets[0].getsockname()[1] if sockets else address.port
                host = f"[{address.host}]" if ":" in address.host else address.host
                self.addresses.append(f"http://{host}:{port}")
        except OSError as err:
            raise ConfigError(
                f"http.listen: cannot listen on {address.text}: {err.strerror or err}"
            ) from None
        self._sites.append(site)

    async def stop_accepting(self) -> None:
        """Shutdown's first step: no new connections; running requests go on."""
        for site in self._sites:
            with contextlib.suppress(Exception):
                await site.stop()
        self._sites.clear()

    async def close(self) -> None:
        await self.stop_accepting()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._unix_paths.clear()

    # --- middlewares ------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every failure as one JSON error (OpenAI's shape); nothing else reaches a client."""
        try:
            return await handler(request)
        except MmdError as err:
            return mmd_error_response(err, self.settings.insufficient_memory_status)
        except web.HTTPException as err:
            if err.status < 400:
                raise
            message = err.text if err.text and not err.text.startswith("<") else err.reason
            if err.status == 413:
                message = (
                    f"request body is larger than {request.app._client_max_size} bytes "
                    "(2 x max_prompt_bytes + 64 KiB)"
                )
            response = error_response(err.status, message.strip(), _http_kind(err.status))
            if err.status == 405 and "Allow" in err.headers:
                response.headers["Allow"] = err.headers["Allow"]
            return response
        except ConnectionResetError:
            raise  # the client is gone: nobody to answer
        except Exception:
            log.exception("internal error serving %s %s", request.method, request.path)
            return error_response(500, "internal error (see mmd's log)", "internal")

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The API key, the Host of a loopback listener, and a browser's cross-site POST."""
        needs_key = self.access.required and not self._public(request)
        if needs_key and not self._authorized(request):
            response = error_response(
                401, "missing or wrong API key (Authorization: Bearer KEY)", "unauthorized"
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="mmd"'
            return response
        open_loopback = not self.access.required and _over_tcp(request)
        if open_loopback and _host_name(request.host or "") not in _LOOPBACK_HOSTS:
            return error_response(403, f"Host {request.host!r} is not a loopback name", "forbidden")
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            # A browser names the page that sends a POST; another site's page may not
            # change mmd's state (no CORS headers are ever sent, so it cannot read either).
            origin = request.headers.get("Origin")
            if origin is not None and origin != f"{request.scheme}://{request.host}":
                return error_response(403, f"cross-origin request from {origin}", "forbidden")
        return await handler(request)

    def _public(self, request: web.Request) -> bool:
        path = request.path
        return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.strip().encode()
        # Every key compared, in constant time: the answer's timing tells nothing.
        matches = [hmac.compare_digest(given, key.encode()) for key in self.access.keys]
        return any(matches)


def _over_tcp(request: web.Request) -> bool:
    transport = request.transport
    if transport is None:
        return False
    sock = transport.get_extra_info("socket")
    return sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6)


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object (InvalidRequest when it is not one)."""
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidRequest(f"the body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body
