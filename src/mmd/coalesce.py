"""Text pieces joined while the previous one is still being written to the client.

Every gRPC message costs the daemon about as much CPU as llama-server spends on a
token of a small model, and on a busy machine that CPU is taken from generation.
Reading the child's stream in a task of its own lets it go on while a write is in
flight; whatever text arrives in the meantime leaves as one message. A client
that keeps up still gets each piece the moment it arrives: there is no timer and
no delay, only fewer messages when writing is the bottleneck.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

T = TypeVar("T")


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


async def coalesce_text(source: AsyncIterator[str | T]) -> AsyncGenerator[str | T, None]:
    """The items of ``source`` in order, text that piles up joined into one piece.

    ``source`` is iterated in a task of its own. Closing this generator (a client
    that went away) cancels that task, so ``source``'s own clean-up runs at once.
    An exception from ``source`` is raised here after the items before it.
    """
    queue: deque[str | T] = deque()
    wake = asyncio.Event()
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
            wake.set()

    task = asyncio.get_running_loop().create_task(pump())
    try:
        while True:
            await wake.wait()
            wake.clear()
            for item in _drain(queue):
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
