"""The admin REST endpoints: GET /models, POST /load, POST /unload, POST /infer,
GET /health. Their JSON has the keys of ``mmctl --json`` (both come from mmd.api.protojson),
so a script can move between the two without changes."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from aiohttp import web

from mmd.api.coalesce import coalesce_text
from mmd.api.protojson import message_to_dict, model_to_dict
from mmd.api.rpc.protos import health_proto, model_proto
from mmd.api.web.openai_api import WARNING_HEADER
from mmd.api.web.server import read_json
from mmd.core import validate
from mmd.core.errors import InvalidRequest, MmdError
from mmd.engine.engine import Engine
from mmd.runtime.upstream import Final, InferParams


def add_routes(app: web.Application, engine: Engine) -> None:
    api = AdminApi(engine)
    app.router.add_get("/models", api.models)
    app.router.add_post("/load", api.load)
    app.router.add_post("/unload", api.unload)
    app.router.add_post("/infer", api.infer)
    app.router.add_get("/health", api.health)


def _field(body: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and kind is not bool:
        raise InvalidRequest(f"{key} must be {what}, got {value!r}")
    if not isinstance(value, kind):
        raise InvalidRequest(f"{key} must be {what}, got {value!r}")
    return value


def _model_id(body: dict[str, Any]) -> str:
    model = body.get("model", body.get("model_id"))
    if not isinstance(model, str):
        raise InvalidRequest("model must be a string (an mmd model id; see GET /models)")
    return validate.model_id(model)


def _messages(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidRequest("messages must be a list of {role, content}")
    out = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("content"), str):
            raise InvalidRequest("each message must be an object with a string content")
        role = item.get("role", "user")
        if role not in validate.CHAT_ROLES:
            raise InvalidRequest(f"unknown message role {role!r}")
        out.append((role, item["content"]))
    return tuple(out)


def infer_json(model_id: str, text: str, final: Final, mode: str) -> dict[str, Any]:
    """The answer as ``mmctl infer --json`` prints it."""
    return {
        "model": model_id,
        "text": text,
        "mode": mode,
        "finish_reason": final.finish_reason,
        "prompt_tokens": final.prompt_tokens,
        "completion_tokens": final.completion_tokens,
        "timings": {
            "queue_ms": final.queue_ms,
            "load_ms": final.load_ms,
            "first_token_ms": final.first_token_ms,
            "total_ms": final.total_ms,
            "prompt_tokens_per_second": final.prompt_per_second,
            "generation_tokens_per_second": final.generation_per_second,
        },
    }


class AdminApi:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _model(self, model_id: str) -> dict[str, Any]:
        return model_to_dict(model_proto(self.engine, self.engine.entry(model_id)))

    async def models(self, request: web.Request) -> web.Response:
        entries = self.engine.model_entries()
        return web.json_response([model_to_dict(model_proto(self.engine, e)) for e in entries])

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(message_to_dict(health_proto(self.engine)))

    async def load(self, request: web.Request) -> web.Response:
        """Load and wait until ready; the model as ``mmctl load --json`` prints it."""
        body = await read_json(request)
        model_id = _model_id(body)
        gpu_layers = validate.gpu_layers(_field(body, "gpu_layers", int, "an integer"))
        async with contextlib.aclosing(self.engine.load_stages(model_id, gpu_layers)) as stages:
            async for _ in stages:
                pass
        return web.json_response(self._model(model_id))

    async def unload(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        model_id = _model_id(body)
        force = bool(_field(body, "force", bool, "true or false"))
        timeout = _field(body, "timeout_seconds", (int, float), "a number") or 0.0
        timeout = validate.unload_timeout(float(timeout))
        timeout = timeout or self.engine.config.daemon.unload_timeout
        aborted = await self.engine.unload(model_id, force, timeout)
        return web.json_response({**self._model(model_id), "aborted_requests": aborted})

    async def infer(self, request: web.Request) -> web.StreamResponse:
        """A generation as ``mmctl infer --json`` prints it; with "stream": true, server-sent
        events of {"text"} pieces, then that same object as the last event."""
        body = await read_json(request)
        model_id = _model_id(body)
        prompt = _field(body, "prompt", str, "a string") or ""
        system = _field(body, "system", str, "a string") or ""
        messages = _messages(body.get("messages"))
        if not prompt.strip() and not any(c.strip() for _, c in messages):
            raise InvalidRequest("empty prompt")
        texts = [prompt, system, *(c for _, c in messages)]
        limit = self.engine.config.daemon.max_prompt_bytes
        validate.size("prompt", validate.text_bytes(texts), limit)
        params = InferParams(
            prompt=prompt,
            messages=messages,
            system=system,
            max_tokens=validate.max_tokens(_field(body, "max_tokens", int, "an integer")),
            temperature=validate.temperature(_field(body, "temperature", (int, float), "a number")),
        )
        seconds = _field(body, "keep_alive_seconds", (int, float), "a number")
        keep_alive = validate.keep_alive(None if seconds is None else float(seconds))
        raw = bool(_field(body, "raw", bool, "true or false"))
        params, warning = await self.engine.prompt_mode(model_id, params, raw)
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
