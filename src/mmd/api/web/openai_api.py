"""The OpenAI-compatible endpoints: /v1/models, /v1/chat/completions, /v1/completions,
/v1/embeddings.

A request is checked here (the same limits as gRPC), then relayed to the model's
llama-server through the engine (autoload, queue, slots, eviction, keep-alive); the
child's answer comes back unchanged, so every field llama-server supports (tools,
response_format, stop, seed, logprobs...) works as it does against llama-server itself.
The ``model`` field is the mmd id. mmd adds one optional field, ``keep_alive`` (seconds,
or a duration such as "10m"; negative: forever), taken out before the request goes on.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

from aiohttp import web

from mmd.api.coalesce import coalesce_bytes
from mmd.api.protojson import model_to_dict
from mmd.api.rpc.protos import model_proto
from mmd.api.web.server import read_json
from mmd.core import validate
from mmd.core.effects import Kind
from mmd.core.errors import InvalidRequest, MmdError
from mmd.core.units import parse_keep_alive
from mmd.engine.engine import Engine

WARNING_HEADER = "X-Mmd-Warning"


def add_routes(app: web.Application, engine: Engine) -> None:
    api = OpenAIApi(engine)
    app.router.add_get("/v1/models", api.models)
    app.router.add_post("/v1/chat/completions", api.chat)
    app.router.add_post("/v1/completions", api.completions)
    app.router.add_post("/v1/embeddings", api.embeddings)


def _number(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{key} must be a number, got {value!r}")
    return float(value)


def _integer(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{key} must be an integer, got {value!r}")
    return value


def _texts(value: Any, key: str) -> list[str]:
    """The strings of a prompt or input: a string, or a list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidRequest(f"{key} must be a string or a non-empty list of strings")


def _message_texts(messages: Any) -> list[str]:
    """The text of every message (string content, or the text parts of a list)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list")
    texts = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest("each message must be an object with a role")
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    texts.append(part["text"])
        elif content is not None:
            raise InvalidRequest("a message's content must be a string or a list of parts")
    return texts


class OpenAIApi:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def _limit(self) -> int:
        return self.engine.config.daemon.max_prompt_bytes

    def _common(self, body: dict[str, Any]) -> tuple[str, float | None]:
        """The model id and keep-alive; checks the fields every generation shares."""
        model = body.get("model")
        if not isinstance(model, str):
            raise InvalidRequest("model must be a string (an mmd model id; see GET /v1/models)")
        validate.model_id(model)
        for key in ("max_tokens", "max_completion_tokens"):
            validate.max_tokens(_integer(body, key))
        validate.temperature(_number(body, "temperature"))
        if not isinstance(body.get("stream", False), bool):
            raise InvalidRequest("stream must be true or false")
        return model, self._keep_alive(body)

    def _keep_alive(self, body: dict[str, Any]) -> float | None:
        value = body.pop("keep_alive", None)
        if value is None:
            return None
        if isinstance(value, str):
            try:
                return validate.keep_alive(parse_keep_alive(value))
            except ValueError as err:
                raise InvalidRequest(f"keep_alive: {err}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequest(f"keep_alive must be seconds or a duration, got {value!r}")
        return validate.keep_alive(float(value))

    async def models(self, request: web.Request) -> web.Response:
        created = int(self.engine.started)
        data = [
            {
                "id": entry.spec.id,
                "object": "model",
                "created": created,
                "owned_by": "mmd",
                "mmd": model_to_dict(model_proto(self.engine, entry)),
            }
            for entry in self.engine.model_entries()
        ]
        return web.json_response({"object": "list", "data": data})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        model, keep_alive = self._common(body)
        texts = _message_texts(body.get("messages"))
        if not any(text.strip() for text in texts):
            raise InvalidRequest("empty prompt")
        validate.size("prompt", validate.text_bytes(texts), self._limit)
        warning = await self.engine.chat_template_warning(model)
        return await self._relay(request, model, "/v1/chat/completions", body, keep_alive, warning)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        model, keep_alive = self._common(body)
        texts = _texts(body.get("prompt"), "prompt")
        if not any(text.strip() for text in texts):
            raise InvalidRequest("empty prompt")
        validate.size("prompt", validate.text_bytes(texts), self._limit)
        return await self._relay(request, model, "/v1/completions", body, keep_alive)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        model = body.get("model")
        if not isinstance(model, str):
            raise InvalidRequest("model must be a string (an mmd model id; see GET /v1/models)")
        validate.model_id(model)
        keep_alive = self._keep_alive(body)
        texts = _texts(body.get("input"), "input")
        if not all(text.strip() for text in texts):
            raise InvalidRequest("empty input")
        validate.size("input", validate.text_bytes(texts), self._limit)
        if not self.engine.entry(model).spec.embedding:
            raise InvalidRequest(
                f"model {model!r} does not serve embeddings (set embedding = true in its "
                "[models] table)"
            )
        body["stream"] = False
        path = "/v1/embeddings"
        return await self._relay(request, model, path, body, keep_alive, kind=Kind.EMBED)

    async def _relay(
        self,
        request: web.Request,
        model: str,
        path: str,
        body: dict[str, Any],
        keep_alive: float | None,
        warning: str = "",
        kind: Kind = Kind.INFER,
    ) -> web.StreamResponse:
        answer = self.engine.relay(model, kind, path, body, keep_alive)
        headers = {WARNING_HEADER: warning} if warning else {}
        if not body.get("stream"):
            try:
                data = b"".join([chunk async for chunk in answer])
            finally:
                await answer.aclose()
            return web.Response(body=data, content_type="application/json", headers=headers)
        interval = self.engine.config.daemon.stream_interval
        return await _stream(request, coalesce_bytes(answer, interval), headers)


async def _stream(
    request: web.Request, answer: AsyncGenerator[bytes, None], headers: dict[str, str]
) -> web.StreamResponse:
    """Server-sent events as the child sends them. What refuses the request is raised
    before the headers go out (a JSON error with its status); a failure later, once the
    stream has begun, ends it with an error event, as llama-server does."""
    try:
        try:
            first = await anext(answer)
        except StopAsyncIteration:
            first = b""
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # a proxy in front must not hold the tokens back
                **headers,
            }
        )
        await response.prepare(request)
        await response.write(first)
        try:
            async for chunk in answer:
                await response.write(chunk)
        except MmdError as err:
            error = {"error": {"message": err.message, "type": "server_error", "code": err.kind}}
            await response.write(f"data: {json.dumps(error)}\n\n".encode())
        await response.write_eof()
        return response
    finally:
        await answer.aclose()
