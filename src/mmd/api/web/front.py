"""Start the HTTP front door with every set of endpoints it serves."""

from __future__ import annotations

from mmd.engine import Engine
from mmd.errors import ConfigError
from mmd.web import admin_api, dashboard, openai_api
from mmd.web.server import HttpFront
from mmd.web.settings import HttpSettings, load_access


async def start_http(engine: Engine, settings: HttpSettings) -> HttpFront | None:
    """The listener on every ``[http] listen`` address; None when ``[http]`` is off."""
    if not settings.enabled:
        return None
    try:
        access = load_access(settings)
    except ValueError as err:
        raise ConfigError(f"http.api_keys_file: {err}") from None
    front = HttpFront(engine, settings, access)
    front.add_routes(openai_api.add_routes)
    front.add_routes(admin_api.add_routes)
    front.add_routes(dashboard.add_routes)
    await front.start()
    engine.http_listen = tuple(front.addresses)
    return front
