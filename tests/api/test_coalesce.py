"""coalesce_text: order, joining under a slow consumer, errors, and closing early."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

import pytest

from mmd.api.coalesce import coalesce_text


class Source:
    """An async generator fed by the test, which records how it ended."""

    def __init__(self) -> None:
        self.items: asyncio.Queue[str | int | Exception | None] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.cancelled = False

    async def run(self) -> AsyncGenerator[str | int, None]:
        try:
            while (item := await self.items.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        finally:
            self.closed.set()


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_consumer_that_keeps_up_gets_every_piece_as_it_arrives() -> None:
    source = Source()
    async with contextlib.aclosing(coalesce_text(source.run())) as items:
        for piece in ("a", "b", "c"):
            source.items.put_nowait(piece)
            assert await anext(items) == piece
        source.items.put_nowait(7)
        assert await anext(items) == 7
        source.items.put_nowait(None)
        with pytest.raises(StopAsyncIteration):
            await anext(items)
    assert source.closed.is_set()


async def test_text_that_piles_up_while_the_consumer_is_busy_leaves_as_one_piece() -> None:
    source = Source()
    async with contextlib.aclosing(coalesce_text(source.run())) as items:
        source.items.put_nowait("first")
        assert await anext(items) == "first"
        # The consumer is "writing": the source goes on meanwhile.
        for piece in ("a", "b", "c", 1, "d", "e", None):
            source.items.put_nowait(piece)
        await settle()
        rest = [item async for item in items]
    assert rest == ["abc", 1, "de"]


async def test_an_error_comes_after_the_items_before_it() -> None:
    source = Source()
    for piece in ("x", "y", RuntimeError("child died")):
        source.items.put_nowait(piece)
    received: list[str | int] = []

    async def consume() -> None:
        async with contextlib.aclosing(coalesce_text(source.run())) as items:
            async for item in items:
                received.append(item)

    with pytest.raises(RuntimeError, match="child died"):
        await consume()
    assert "".join(str(item) for item in received) == "xy"


async def test_closing_after_the_first_piece_closes_the_source_at_once() -> None:
    source = Source()
    items = coalesce_text(source.run())
    source.items.put_nowait("a")
    assert await anext(items) == "a"
    await items.aclose()  # a client that went away
    assert source.closed.is_set()


async def test_closing_early_cancels_the_source_and_runs_its_cleanup() -> None:
    source = Source()
    items = coalesce_text(source.run())
    source.items.put_nowait("a")
    assert await anext(items) == "a"
    source.items.put_nowait("b")
    assert await anext(items) == "b"  # the rest is read in a task of its own
    await items.aclose()  # a client that went away
    assert source.closed.is_set()
    assert source.cancelled


async def test_cancelling_the_consumer_while_it_waits_cancels_the_source() -> None:
    source = Source()

    async def consume() -> list[str | int]:
        async with contextlib.aclosing(coalesce_text(source.run())) as items:
            return [item async for item in items]

    task = asyncio.get_running_loop().create_task(consume())
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert source.closed.is_set()
    assert source.cancelled


async def test_with_an_interval_pieces_are_held_and_joined_but_the_end_is_not() -> None:
    source = Source()
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with contextlib.aclosing(coalesce_text(source.run(), min_interval=30.0)) as items:
        source.items.put_nowait("a")
        assert await anext(items) == "a"  # the first piece goes at once
        source.items.put_nowait("b")
        following = loop.create_task(anext(items))
        await settle()
        assert not following.done()  # "b" waits for the interval
        source.items.put_nowait("c")
        source.items.put_nowait(7)
        source.items.put_nowait(None)  # the end: nothing is held any longer
        assert await following == "bc"
        rest = [item async for item in items]
    assert rest == [7]
    assert loop.time() - began < 5.0


async def test_with_an_interval_an_error_is_not_held() -> None:
    source = Source()
    async with contextlib.aclosing(coalesce_text(source.run(), min_interval=30.0)) as items:
        source.items.put_nowait("a")
        assert await anext(items) == "a"
        source.items.put_nowait("b")
        source.items.put_nowait(RuntimeError("child died"))
        assert await asyncio.wait_for(anext(items), 5.0) == "b"
        with pytest.raises(RuntimeError, match="child died"):
            await asyncio.wait_for(anext(items), 5.0)
