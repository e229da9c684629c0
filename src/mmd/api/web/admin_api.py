"""The admin REST endpoints: GET /models, POST /load, POST /unload, POST /infer,
GET /health. Their JSON has the keys of ``mmctl --json`` (both come from mmd.api.protojson),
so a script can move between the two without changes."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from aiohttp import web

from mmd.api import json_requests
from mmd.api.coalesce import coalesce_text
from mmd.api.json_requests import field, infer_json
from mmd.api.protojson import message_to_dict, model_to_dict
from mmd.api.rpc.protos import health_proto, model_proto, registry_proto
from mmd.api.web.openai_api import WARNING_HEADER
from mmd.api.web.server import read_json
from mmd.core import validate
from mmd.core.errors import MmdError
from mmd.engine.engine import Engine
from mmd.runtime.upstream import Final


def add_routes(app: web.Application, engine: Engine) -> None:
    api = AdminApi(engine)
    app.router.add_get("/models", api.models)
    app.router.add_post("/load", api.load)
    app.router.add_post("/unload", api.unload)
    app.router.add_post("/infer", api.infer)
    app.router.add_get("/health", api.health)


class AdminApi:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _model(self, model_id: str) -> dict[str, Any]:
        return model_to_dict(model_proto(self.engine, self.engine.entry(model_id)))

    async def models(self, request: web.Request) -> web.Response:
        registry = registry_proto(self.engine)
        return web.json_response([model_to_dict(model) for model in registry.models])

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(message_to_dict(health_proto(self.engine)))

    async def load(self, request: web.Request) -> web.Response:
        """Load and wait until ready; the model as ``mmctl load --json`` prints it."""
        body = await read_json(request)
        model_id = json_requests.model_id(body)
        gpu_layers = validate.gpu_layers(field(body, "gpu_layers", int, "an integer"))
        async with contextlib.aclosing(self.engine.load_stages(model_id, gpu_layers)) as stages:
            async for _ in stages:
                pass
        return web.json_response(self._model(model_id))

    async def unload(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        model_id = json_requests.model_id(body)
        force = bool(field(body, "force", bool, "true or false"))
        timeout = field(body, "timeout_seconds", (int, float), "a number") or 0.0
        timeout = validate.unload_timeout(float(timeout))
        timeout = timeout or self.engine.config.daemon.unload_timeout
        aborted = await self.engine.unload(model_id, force, timeout)
        return web.json_response({**self._model(model_id), "aborted_requests": aborted})

    async def infer(self, request: web.Request) -> web.StreamResponse:
        """A generation as ``mmctl infer --json`` prints it; with "stream": true, server-sent
        events of {"text"} pieces, then that same object as the last event."""
        body = await read_json(request)
        call = json_requests.infer_call(body, self.engine.config.daemon.max_prompt_bytes)
        model_id, keep_alive = call.model_id, call.keep_alive
        params, warning = await self.engine.prompt_mode(model_id, call.params, call.raw)
        headers = {WARNING_HEADER: warning} if warning else {}
        source = self.engine.infer(model_id, params, keep_alive)
        interval = self.engine.config.daemon.stream_interval
        pieces: list[str] = []
        final = Final()
        response: web.StreamResponse | None = None
        async with contextlib.aclosing(coalesce_text(source, interval)) as items:
            try:
                async for item in items:
                    if isinstance(item, Final):
                        final = item
                        continue
                    pieces.append(item)
                    if body.get("stream") is True:
                        if response is None:
                            response = await _open_events(request, headers)
                        await _event(response, {"text": item})
            except MmdError as err:
                if response is None:
                    raise
                await _event(response, {"error": {"message": err.message, "code": err.kind}})
                await response.write_eof()
                return response
        result = infer_json(model_id, "".join(pieces), final, params.mode)
        if body.get("stream") is not True:
            return web.json_response(result, headers=headers)
        if response is None:
            response = await _open_events(request, headers)
        await _event(response, result)
        await response.write_eof()
        return response


async def _open_events(request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers}
    )
    await response.prepare(request)
    return response


async def _event(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode())
