"""Start the HTTP front door with every set of endpoints it serves."""

from __future__ import annotations

from mmd.api.web import admin_api, dashboard, openai_api
from mmd.api.web.server import HttpFront
from mmd.config.http import HttpSettings, load_access
from mmd.core.errors import ConfigError
from mmd.engine.engine import Engine


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
