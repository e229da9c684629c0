"""Requests to a llama-server child: streamed completions and chats, embeddings.

Each call streams from the child's HTTP API over its Unix socket. Leaving the
``async for`` early (a cancelled client) closes the HTTP stream, which makes
llama-server abort the generation and free its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from mmd.core.errors import InvalidRequest, MmdError, RuntimeFailed

log = logging.getLogger("mmd.upstream")


@dataclass(frozen=True)
class InferParams:
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()  # (role, content)
    system: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    chat: bool = False  # the prompt goes as the user's turn of a chat (see Engine.prompt_mode)

    @property
    def is_chat(self) -> bool:
        return bool(self.chat or self.messages or self.system)

    @property
    def mode(self) -> str:
        """What InferDone.mode and `--json` say: "chat" or "raw"."""
        return "chat" if self.is_chat else "raw"


@dataclass
class Final:
    """The totals that end a generation."""

    finish_reason: str = "stop"
    finished: bool = False  # the child sent its closing event
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_per_second: float = 0.0
    generation_per_second: float = 0.0
    # Filled in by the engine: milliseconds from the request's arrival.
    queue_ms: float = 0.0
    load_ms: float = 0.0
    first_token_ms: float = 0.0
    total_ms: float = 0.0


def _completion_body(params: InferParams) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": params.prompt, "stream": True, "cache_prompt": True}
    if params.max_tokens is not None:
        body["n_predict"] = params.max_tokens
    if params.temperature is not None:
        body["temperature"] = params.temperature
    return body


def _chat_body(params: InferParams) -> dict[str, Any]:
    messages = []
    if params.system:
        messages.append({"role": "system", "content": params.system})
    messages += [{"role": role, "content": content} for role, content in params.messages]
    if params.prompt:
        messages.append({"role": "user", "content": params.prompt})
    body: dict[str, Any] = {
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if params.max_tokens is not None:
        body["max_tokens"] = params.max_tokens
    if params.temperature is not None:
        body["temperature"] = params.temperature
    return body


# A request is sent again when its connection failed before any response began: then
# llama-server did not serve it (or aborts it, its connection gone), so sending it again
# cannot answer twice. This happens under concurrent streams (about 1 in 100-200):
# - ServerDisconnectedError: the child closed the connection without answering, also a
#   pooled connection that it closed just as the request went out;
# - ClientOSError: the connection was reset while the request went out or while waiting
#   for the status line; ConnectionResetError (aiohttp's ClientConnectionResetError): the
#   request was written to a connection already closing;
# - ClientConnectorError (a ClientOSError): the socket's accept queue was full for a
#   moment (EAGAIN).
# A failure once the status line is in is never resent: the answer has begun.
_SEND_ATTEMPTS = 5
_RESENDABLE = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionResetError)
_RESEND_PAUSE_S = 0.005  # grows with each attempt: a full accept queue needs a moment


# llama-server closes its end of a connection once a streamed answer is over (its
# headers still say keep-alive). A pooled connection would then fail on the next
# request, costing a failed write and a resend every time (~0.3-0.5 ms of the daemon's
# CPU per request on 2 cores); a stream is asked for on a connection that mmd does
# not pool. An answer that is not streamed keeps its connection.
_NOT_POOLED = {"Connection": "close"}


async def _send(
    session: aiohttp.ClientSession, path: str, body: dict[str, Any]
) -> aiohttp.ClientResponse:
    """POST and return the response once its status line and headers are in, its body
    still to read."""
    headers = _NOT_POOLED if body.get("stream") else None
    for attempt in range(1, _SEND_ATTEMPTS):
        try:
            return await session.post(path, json=body, headers=headers)
        except _RESENDABLE as err:
            log.debug("%s: sent again (attempt %d): %r", path, attempt + 1, err)
            if isinstance(err, aiohttp.ClientConnectorError):
                await asyncio.sleep(_RESEND_PAUSE_S * attempt)
    return await session.post(path, json=body, headers=headers)


async def _sse_batches(response: aiohttp.ClientResponse) -> AsyncIterator[list[dict[str, Any]]]:
    """Server-sent ``data:`` events, grouped by the network read that completed them.

    Reading bytes and splitting lines here costs far less per token than a line
    iterator, and events that arrive together (a busy machine, a fast model) go on as
    one batch: one message to the client instead of several.
    """
    pending = b""
    async for chunk in response.content.iter_any():
        *lines, pending = (pending + chunk).split(b"\n")
        batch: list[dict[str, Any]] = []
        for line in lines:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                if batch:
                    yield batch
                return
            event = json.loads(data)
            if isinstance(event, dict):
                batch.append(event)
        if batch:
            yield batch


def _status_error(model_id: str, status: int, body: bytes) -> MmdError:
    text = body.decode("utf-8", errors="replace")
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text[:300]
    if status == 400:
        return InvalidRequest(f"model {model_id!r} rejected the request: {message}")
    return RuntimeFailed(f"model {model_id!r} answered {status}: {message}")


async def _raise_for_status(model_id: str, response: aiohttp.ClientResponse) -> None:
    if response.status != 200:
        raise _status_error(model_id, response.status, await response.read())


def _timings(event: dict[str, Any], final: Final) -> None:
    timings = event.get("timings") or {}
    final.prompt_per_second = float(timings.get("prompt_per_second") or 0.0)
    final.generation_per_second = float(timings.get("predicted_per_second") or 0.0)


def _read_completion(event: dict[str, Any], final: Final) -> str:
    """One /completion event: its text; the totals when it is the last one."""
    if event.get("stop"):
        final.finished = True
        final.finish_reason = "length" if event.get("stop_type") == "limit" else "stop"
        final.prompt_tokens = int(event.get("tokens_evaluated", 0))
        final.completion_tokens = int(event.get("tokens_predicted", 0))
        _timings(event, final)
    return str(event.get("content") or "")


def _read_chat(event: dict[str, Any], final: Final) -> str:
    """One /v1/chat/completions chunk: its text; finish reason, usage and timings."""
    pieces = []
    for choice in event.get("choices") or []:
        pieces.append((choice.get("delta") or {}).get("content") or "")
        if choice.get("finish_reason"):
            final.finish_reason = choice["finish_reason"]
            final.finished = True
    usage = event.get("usage")
    if usage:
        final.prompt_tokens = int(usage.get("prompt_tokens", 0))
        final.completion_tokens = int(usage.get("completion_tokens", 0))
    if event.get("timings"):
        _timings(event, final)
    return "".join(pieces)


def _lost(model_id: str, err: aiohttp.ClientError) -> RuntimeFailed:
    why = str(err) or type(err).__name__  # some connection errors carry no message
    return RuntimeFailed(f"model {model_id!r}: connection to llama-server lost: {why}")


async def stream_infer(
    session: aiohttp.ClientSession, model_id: str, params: InferParams
) -> AsyncGenerator[str | Final, None]:
    """Yield text pieces as they arrive, then one Final."""
    path, body = (
        ("/v1/chat/completions", _chat_body(params))
        if params.is_chat
        else ("/completion", _completion_body(params))
    )
    final = Final()
    try:
        response = await _send(session, path, body)
        async with response:
            await _raise_for_status(model_id, response)
            read = _read_chat if params.is_chat else _read_completion
            async for batch in _sse_batches(response):
                text = "".join([read(event, final) for event in batch])
                if text:
                    yield text
    except aiohttp.ClientError as err:
        raise _lost(model_id, err) from None
    if not final.finished:
        # A child that is stopped mid-generation may close the stream cleanly.
        raise RuntimeFailed(f"model {model_id!r}: llama-server ended the stream early")
    yield final


async def embed(
    session: aiohttp.ClientSession, model_id: str, inputs: Sequence[str]
) -> tuple[list[list[float]], int]:
    """Vectors for ``inputs`` (in order) and the prompt token count."""
    try:
        async with await _send(session, "/v1/embeddings", {"input": list(inputs)}) as response:
            answer = await response.read()
    except aiohttp.ClientError as err:
        raise _lost(model_id, err) from None
    if response.status != 200:
        raise _status_error(model_id, response.status, answer)
    payload = json.loads(answer)
    data = sorted(payload.get("data", []), key=lambda item: item.get("index", 0))
    vectors = [[float(x) for x in item["embedding"]] for item in data]
    tokens = int((payload.get("usage") or {}).get("prompt_tokens", 0))
    return vectors, tokens


# --- relayed requests (the HTTP front door's OpenAI-compatible API) -------------------


def _read_relayed_event(event: dict[str, Any], final: Final) -> None:
    """Totals from an OpenAI-shaped event (a stream's chunk or a whole answer)."""
    for choice in event.get("choices") or []:
        if choice.get("finish_reason"):
            final.finish_reason = str(choice["finish_reason"])
            final.finished = True
    usage = event.get("usage")
    if usage:
        final.prompt_tokens = int(usage.get("prompt_tokens", 0))
        final.completion_tokens = int(usage.get("completion_tokens", 0))
    timings = event.get("timings")
    if timings:
        _timings(event, final)
        if not usage:  # a stream without stream_options.include_usage has timings only
            final.prompt_tokens = int(timings.get("cache_n", 0)) + int(timings.get("prompt_n", 0))
            final.completion_tokens = int(timings.get("predicted_n", 0))


def _last_data_events(chunk: bytes) -> list[bytes]:
    """The ``data:`` payloads in ``chunk`` that can carry totals: the last few."""
    return [line[6:] for line in chunk.split(b"\n") if line.startswith(b"data: {")][-2:]


# The last bytes of a stream kept to read its totals from (the closing events).
_TAIL_BYTES = 16384


async def relay(
    session: aiohttp.ClientSession,
    model_id: str,
    path: str,
    body: dict[str, Any],
    final: Final,
) -> AsyncGenerator[bytes, None]:
    """POST an OpenAI-shaped request and yield the child's answer as it comes, unchanged:
    a stream's SSE bytes, or a whole JSON answer. ``final`` gets the totals (finish
    reason, tokens, speeds), read from the answer's last events only: the bytes in
    between pass through without being parsed."""
    tail = b""
    try:
        response = await _send(session, path, body)
        async with response:
            if response.status != 200:
                raise _status_error(model_id, response.status, await response.read())
            if not body.get("stream"):
                data = await response.read()
                with contextlib.suppress(ValueError):
                    answer = json.loads(data)
                    if isinstance(answer, dict):
                        _read_relayed_event(answer, final)
                final.finished = True
                yield data
                return
            async for chunk in response.content.iter_any():
                yield chunk
                tail = chunk if len(chunk) >= _TAIL_BYTES else (tail + chunk)[-_TAIL_BYTES:]
    except aiohttp.ClientError as err:
        raise _lost(model_id, err) from None
    if not tail.rstrip().endswith(b"data: [DONE]"):
        raise RuntimeFailed(f"model {model_id!r}: llama-server ended the stream early")
    final.finished = True
    for data in _last_data_events(tail):
        with contextlib.suppress(ValueError):
            event = json.loads(data)
            if isinstance(event, dict):
                _read_relayed_event(event, final)
