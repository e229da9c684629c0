"""Reading llama-server's event streams: events split across reads, batched within one."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mmd.runtime.upstream import Final, _read_chat, _read_completion, _sse_batches


class Chunks:
    """A response whose body arrives in the given reads (``response.content.iter_any()``)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.content = self
        self.chunks = chunks

    async def iter_any(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


def batches(chunks: list[bytes]) -> list[list[dict[str, Any]]]:
    async def collect() -> list[list[dict[str, Any]]]:
        response: Any = Chunks(chunks)
        return [batch async for batch in _sse_batches(response)]

    return asyncio.run(collect())


def event(content: str, **extra: Any) -> bytes:
    body = json.dumps({"content": content, **extra}, ensure_ascii=False)
    return b"data: " + body.encode() + b"\n\n"


def test_events_split_across_reads_are_joined() -> None:
    whole = event("héllo") + event("wörld")
    cut = whole.index("ö".encode()) + 1  # inside a multi-byte character
    got = batches([whole[:5], whole[5:cut], whole[cut:]])
    assert [e["content"] for batch in got for e in batch] == ["héllo", "wörld"]


def test_events_completed_by_one_read_form_one_batch() -> None:
    got = batches([event("a") + event("b") + event("c"), event("d")])
    assert [[e["content"] for e in batch] for batch in got] == [["a", "b", "c"], ["d"]]


def test_done_marker_ends_the_stream_and_comments_are_ignored() -> None:
    got = batches([b": ping\n\n" + event("a") + b"data: [DONE]\n\n" + event("after")])
    assert [[e["content"] for e in batch] for batch in got] == [["a"]]


def test_completion_totals_from_the_closing_event() -> None:
    final = Final()
    assert _read_completion({"content": "x"}, final) == "x"
    assert not final.finished
    closing = {
        "content": "",
        "stop": True,
        "stop_type": "limit",
        "tokens_evaluated": 3,
        "tokens_predicted": 7,
        "timings": {"prompt_per_second": 10.0, "predicted_per_second": 20.0},
    }
    assert _read_completion(closing, final) == ""
    assert (final.finished, final.finish_reason) == (True, "length")
    assert (final.prompt_tokens, final.completion_tokens) == (3, 7)
    assert final.generation_per_second == 20.0


def test_chat_chunks_text_finish_and_usage() -> None:
    final = Final()
    text = _read_chat({"choices": [{"delta": {"content": "hi"}, "finish_reason": None}]}, final)
    assert text == "hi"
    assert not final.finished
    _read_chat({"choices": [{"delta": {}, "finish_reason": "stop"}]}, final)
    _read_chat({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}, final)
    assert (final.finished, final.finish_reason) == (True, "stop")
    assert (final.prompt_tokens, final.completion_tokens) == (5, 2)


# A server on a Unix socket that misbehaves as llama-server does under load, one way per
# connection, then answers properly: what mmd must resend, and what it must not.
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def _serve(path: str, behaviours: list[str]) -> tuple[asyncio.AbstractServer, list[str]]:
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        behaviour = behaviours.pop(0) if behaviours else "answer"
        seen.append(behaviour)
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        if behaviour == "close":  # read the request, close without a word
            writer.close()
            return
        writer.write(ANSWER)
        writer.write(_chunk(event("hel")))
        if behaviour == "break":  # the answer has begun, then the connection dies
            await writer.drain()
            writer.transport.abort()
            return
        await writer.drain()
        await asyncio.sleep(0.001)  # the next piece comes in a read of its own
        done = {"content": "lo", "stop": True, "tokens_predicted": 2, "tokens_evaluated": 1}
        writer.write(_chunk(b"data: " + json.dumps(done).encode() + b"\n\n"))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(handle, path)
    return server, seen


class FailingFirst(aiohttp.UnixConnector):
    """Raises the given connection errors, one per request, before sending for real: the
    ways a connection fails before any response that a real server cannot be made to show
    on demand (a reset mid-send, a write to a closing connection, a full accept queue)."""

    def __init__(self, path: str, errors: list[str]) -> None:
        super().__init__(path=path)
        self.errors = errors

    async def connect(self, req: Any, *args: Any, **kwargs: Any) -> Any:
        if self.errors:
            error = self.errors.pop(0)
            if error == "reset":
                raise aiohttp.ClientOSError(errno.ECONNRESET, "injected")
            if error == "closing":
                raise aiohttp.ClientConnectionResetError("injected")
            raise aiohttp.ClientConnectorError(
                req.connection_key, OSError(errno.EAGAIN, "injected")
            )
        return await super().connect(req, *args, **kwargs)


def _generate(
    path: str, behaviours: list[str], errors: list[str] | None = None
) -> tuple[list[str | Final] | str, list[str]]:
    from mmd.core.errors import RuntimeFailed
    from mmd.runtime.upstream import InferParams, stream_infer

    async def run() -> tuple[list[str | Final] | str, list[str]]:
        server, seen = await _serve(path, behaviours)
        connector = FailingFirst(path, errors or [])
        session = aiohttp.ClientSession(base_url="http://llama-server", connector=connector)
        try:
            pieces = [p async for p in stream_infer(session, "m", InferParams(prompt="hi"))]
            return pieces, seen
        except RuntimeFailed as err:
            return err.message, seen
        finally:
            await session.close()
            server.close()

    return asyncio.run(run())


def test_a_request_that_was_not_answered_is_sent_again(tmp_path: Any) -> None:
    pieces, seen = _generate(str(tmp_path / "s.sock"), ["close"], ["reset", "closing", "full"])
    assert seen == ["close", "answer"]  # after the three that failed before reaching it
    assert isinstance(pieces, list)
    assert pieces[:-1] == ["hel", "lo"]
    final = pieces[-1]
    assert isinstance(final, Final)
    assert final.completion_tokens == 2


def test_a_request_whose_answer_began_is_never_sent_again(tmp_path: Any) -> None:
    pieces, seen = _generate(str(tmp_path / "s.sock"), ["break"])
    assert seen == ["break"]  # one connection: not resent
    assert isinstance(pieces, str)
    assert pieces.startswith("model 'm': connection to llama-server lost: ")


def test_a_stream_to_a_real_llama_server_is_never_sent_twice(
    model_files: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """llama-server closes a connection once a streamed answer is over, whatever its
    headers say: a pooled one would fail on the next request, which then goes out again
    on a new connection, every time. Streams are asked for on connections that are not
    pooled; an answer that is not streamed keeps its connection."""
    from mmd.runtime.server import LaunchSpec, LlamaServer, probe_binary, resolve_llama_server
    from mmd.runtime.upstream import InferParams, relay, stream_infer

    binary = resolve_llama_server(None)
    options = probe_binary(binary)[1]
    spec = LaunchSpec(
        model_id="tiny",
        model_path=model_files["tiny"],
        socket=tmp_path / "tiny.sock",
        log_path=tmp_path / "tiny.log",
        ctx=256,
        parallel=1,
        gpu_layers=0,
        supports_fit="--fit" in options,
        supports_cache_ram="--cache-ram" in options,
        no_devices=True,
    )

    async def run() -> tuple[list[int], int]:
        server = LlamaServer(binary, spec)
        await server.start(timeout=60)
        lengths = []
        try:
            for _ in range(4):
                pieces = [p async for p in stream_infer(server.session, "tiny", params)]
                assert isinstance(pieces[-1], Final)
                assert pieces[-1].completion_tokens == 4
                lengths.append(len(pieces))
                body = {"prompt": "hi", "max_tokens": 4, "stream": True}
                final = Final()
                relayed = b"".join(
                    [c async for c in relay(server.session, "tiny", path, body, final)]
                )
                assert final.finished
                assert relayed.rstrip().endswith(b"data: [DONE]")
            async with server.session.get("/health") as first:
                assert first.status == 200
            async with server.session.get("/health") as second:
                assert second.status == 200
            pooled = sum(len(c) for c in server.session.connector._conns.values())  # type: ignore[union-attr]
        finally:
            await server.stop(grace=2.0)
        return lengths, pooled

    params = InferParams(prompt="The quick brown fox", max_tokens=4)
    path = "/v1/completions"
    with caplog.at_level(logging.DEBUG, logger="mmd.upstream"):
        lengths, pooled = asyncio.run(run())
    assert len(lengths) == 4
    assert all(n >= 2 for n in lengths)
    resent = [r.getMessage() for r in caplog.records if "sent again" in r.getMessage()]
    assert resent == []
    assert pooled == 1  # the two health checks went out on one kept connection
