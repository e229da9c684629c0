"""Requests as JSON objects, read and checked in one place for the two doors that take
them: the HTTP admin API (``POST /infer``, ``/load``, ``/unload``) and the JSON Lines
socket. Both answer an inference with the object ``mmctl infer --json`` prints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmd.core import validate
from mmd.core.errors import InvalidRequest
from mmd.runtime.upstream import Final, InferParams


def field(body: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    """``body[key]`` when it is of ``kind`` (a bool is never a number); None when absent."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and kind is not bool:
        raise InvalidRequest(f"{key} must be {what}, got {value!r}")
    if not isinstance(value, kind):
        raise InvalidRequest(f"{key} must be {what}, got {value!r}")
    return value


def model_id(body: dict[str, Any]) -> str:
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


@dataclass(frozen=True)
class InferCall:
    """An inference request, checked: what the engine needs to run it."""

    model_id: str
    params: InferParams
    keep_alive: float | None
    raw: bool


def infer_call(body: dict[str, Any], prompt_limit: int) -> InferCall:
    """``{"model", "prompt", "system"?, "messages"?, "raw"?, "max_tokens"?,
    "temperature"?, "keep_alive_seconds"?}`` checked as the gRPC Infer call checks its
    request (InvalidRequest naming the field at fault)."""
    model = model_id(body)
    prompt = field(body, "prompt", str, "a string") or ""
    system = field(body, "system", str, "a string") or ""
    messages = _messages(body.get("messages"))
    if not prompt.strip() and not any(c.strip() for _, c in messages):
        raise InvalidRequest("empty prompt")
    texts = [prompt, system, *(c for _, c in messages)]
    validate.size("prompt", validate.text_bytes(texts), prompt_limit)
    params = InferParams(
        prompt=prompt,
        messages=messages,
        system=system,
        max_tokens=validate.max_tokens(field(body, "max_tokens", int, "an integer")),
        temperature=validate.temperature(field(body, "temperature", (int, float), "a number")),
    )
    seconds = field(body, "keep_alive_seconds", (int, float), "a number")
    keep_alive = validate.keep_alive(None if seconds is None else float(seconds))
    raw = bool(field(body, "raw", bool, "true or false"))
    return InferCall(model, params, keep_alive, raw)


def done_json(final: Final, mode: str) -> dict[str, Any]:
    """An answer's totals: the keys of ``mmctl infer --json`` that follow "text"."""
    return {
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


def infer_json(model: str, text: str, final: Final, mode: str) -> dict[str, Any]:
    """The answer as ``mmctl infer --json`` prints it."""
    return {"model": model, "text": text, **done_json(final, mode)}
