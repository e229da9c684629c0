"""The web dashboard: one static page (``GET /``, files under ``/static/``) and the event
stream it is drawn from (``GET /api/events``).

The page has no build step and loads nothing from elsewhere: plain HTML, CSS and JS shipped
as package data. It holds no data itself (it is served without a key); what it shows comes
from ``/api/events`` and the admin endpoints, which need the key when keys are configured.

``/api/events`` is the gRPC Watch stream as server-sent events: the same events
(``snapshot_events`` first, then the engine's, one memory sample a second) with the keys of
``mmctl events --json`` ({"type", "time", then the event's fields}). A comment line is sent
when nothing else was for ``KEEPALIVE_S`` (proxies and browsers keep the connection), and the
stream ends when the daemon shuts down. The page reads it with fetch() (EventSource cannot
send the Authorization header), so it is a GET with no state change, like every read.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

from aiohttp import web

from mmd.api.protojson import event_to_dict
from mmd.api.rpc.watch import follow_events
from mmd.engine.engine import Engine

STATIC_DIR = Path(__file__).resolve().parent / "static"
# The files the page is made of, with their types: nothing else under /static/ is served.
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The page runs only its own files and talks only to this listener; no page may frame it.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
KEEPALIVE_S = 15.0
MEMORY_INTERVAL_S = 1.0


def add_routes(app: web.Application, engine: Engine) -> None:
    dashboard = Dashboard(engine)
    app.router.add_get("/", dashboard.page)
    app.router.add_get("/favicon.ico", dashboard.favicon)
    app.router.add_get("/static/{name}", dashboard.static)
    app.router.add_get("/api/events", dashboard.events)


def _finite(value: Any) -> Any:
    """NaN and infinities (which JSON cannot carry) as null, anywhere in the value."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def sse_data(payload: dict[str, Any]) -> bytes:
    """One server-sent event: the payload as a single ``data:`` line of JSON."""
    try:
        text = json.dumps(payload, ensure_ascii=False, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(payload), ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def _file_response(path: Path, content_type: str) -> web.Response:
    return web.Response(
        body=path.read_bytes(), headers={"Content-Type": content_type, **PAGE_HEADERS}
    )


class Dashboard:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def page(self, request: web.Request) -> web.Response:
        return _file_response(STATIC_DIR / "index.html", STATIC_TYPES[".html"])

    async def favicon(self, request: web.Request) -> web.Response:
        return _file_response(STATIC_DIR / "favicon.svg", STATIC_TYPES[".svg"])

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        path = STATIC_DIR / name
        content_type = STATIC_TYPES.get(path.suffix)
        # One level, known types, no hidden files: a name cannot reach outside the folder.
        if content_type is None or name.startswith(".") or "/" in name or not path.is_file():
            raise web.HTTPNotFound(text=f"no static file {name!r}")
        return _file_response(path, content_type)

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The Watch stream as server-sent events, until the daemon shuts down."""
        events = follow_events(self.engine, MEMORY_INTERVAL_S, idle_after=KEEPALIVE_S)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache, no-store",
                "X-Accel-Buffering": "no",  # a reverse proxy must not hold events back
                "X-Content-Type-Options": "nosniff",
            }
        )
        await response.prepare(request)
        async with contextlib.aclosing(events):
            async for event in events:
                if event is None:
                    await response.write(b": keep-alive\n\n")
                else:
                    await response.write(sse_data(event_to_dict(event)))
        await response.write_eof()
        return response
