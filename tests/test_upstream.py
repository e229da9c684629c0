"""Reading llama-server's event streams: events split across reads, batched within one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from mmd.upstream import Final, _read_chat, _read_completion, _sse_batches


class Chunks(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


def batches(chunks: list[bytes]) -> list[list[dict[str, Any]]]:
    async def collect() -> list[list[dict[str, Any]]]:
        response = httpx.Response(200, stream=Chunks(chunks))
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
