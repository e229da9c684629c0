"""Text pieces (or bytes) joined while the previous one is being written, or sent too
recently.

Every gRPC message costs the daemon about as much CPU as llama-server spends on a
token of a small model, and on a busy machine that CPU is taken from generation.
The child's stream is read in a task of its own, so reading goes on while a write
is in flight, and text that piles up in the meantime leaves as one message. With
a ``min_interval``, a stream also sends at most one message per interval: the
first piece still goes at once, and the end of the stream (its last text, totals
or error) is never held back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import TypeVar

T = TypeVar("T")
U = TypeVar("U")


def _drain(queue: deque[str | T]) -> list[str | T]:
    """Everything queued, in order, with runs of text joined."""
    out: list[str | T] = []
    text: list[str] = []
    while queue:
        item = queue.popleft()
        if isinstance(item, str):
            text.append(item)
            continue
        if text:
            out.append("".join(text))
            text = []
        out.append(item)
    if text:
        out.append("".join(text))
    return out


def _drain_bytes(queue: deque[bytes]) -> list[bytes]:
    joined = b"".join(queue)
    queue.clear()
    return [joined]


def coalesce_text(
    source: AsyncGenerator[str | T, None], min_interval: float = 0.0
) -> AsyncGenerator[str | T, None]:
    """The items of ``source`` in order, text that piles up joined into one piece."""
    return _coalesce(source, min_interval, _drain)


def coalesce_bytes(
    source: AsyncGenerator[bytes, None], min_interval: float = 0.0
) -> AsyncGenerator[bytes, None]:
    """The bytes of ``source`` in order, what piles up joined: the same byte stream (a
    relayed stream of server-sent events) in fewer, larger writes."""
    return _coalesce(source, min_interval, _drain_bytes)


async def _coalesce(
    source: AsyncGenerator[U, None],
    min_interval: float,
    drain: Callable[[deque[U]], list[U]],
) -> AsyncGenerator[U, None]:
    """The items of ``source`` in order, what piles up joined by ``drain``.

    The first item is awaited in the caller's task: a request still queued for
    admission has no second task to cancel when its client goes away. The rest of
    ``source`` is iterated in a task of its own. Closing this generator (a client
    that went away) cancels that task, so ``source``'s own clean-up runs at once.
    An exception from ``source`` is raised here after the items before it.
    """
    loop = asyncio.get_running_loop()
    try:
        first = await anext(source)
    except StopAsyncIteration:
        return
    last_sent = loop.time()
    try:
        yield first
    except GeneratorExit:
        await source.aclose()
        raise
    queue: deque[U] = deque()
    wake = asyncio.Event()  # something was queued, or the source ended
    finished = asyncio.Event()
    ended: list[BaseException | None] = []  # one entry once the source is finished

    async def pump() -> None:
        try:
            async for item in source:
                queue.append(item)
                wake.set()
        except BaseException as error:  # handed to the consumer, CancelledError included
            ended.append(error)
        else:
            ended.append(None)
        finally:
            finished.set()
            wake.set()

    task = loop.create_task(pump())
    try:
        while True:
            await wake.wait()
            hold = last_sent + min_interval - loop.time()
            if hold > 0 and not finished.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(hold):
                        await finished.wait()
            wake.clear()
            last_sent = loop.time()
            for item in drain(queue):
                yield item
            if ended and not queue:
                if ended[0] is not None:
                    raise ended[0]
                return
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
