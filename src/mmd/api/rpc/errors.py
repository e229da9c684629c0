"""Domain errors to gRPC statuses, in one place, for every servicer method."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from mmd.core.errors import ERROR_KIND_KEY, MmdError, RequestAborted

log = logging.getLogger("mmd.service")

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]

# What a request cut off by a shutdown is told (the scheduler says the same to queued ones).
SHUTDOWN_MESSAGE = "mmd is shutting down"
# How long interrupt_calls waits for the handlers it cancelled to send their status.
_INTERRUPT_WAIT_S = 5.0


async def _abort(context: Context, error: Exception) -> None:
    if isinstance(error, MmdError):
        await context.abort(
            grpc.StatusCode[error.status], error.message, ((ERROR_KIND_KEY, error.kind),)
        )
    log.exception("internal error", exc_info=error)
    await context.abort(
        grpc.StatusCode.INTERNAL, f"internal error: {error}", ((ERROR_KIND_KEY, "internal"),)
    )


async def _interrupted(servicer: Any, context: Context) -> None:
    """A handler cancelled by the daemon, not by its client: say so instead of going silent.

    Only a daemon that is stopping cancels handlers (``servicer.stopping``, see
    interrupt_calls), and the call then ends as every request a shutdown refuses does:
    ABORTED, kind ``aborted``. Any other cancellation is a client that went away, and an
    abort sent to it would only cost time (during a burst of 10,000 cancellations, half
    of the event loop's).
    """
    if not getattr(servicer, "stopping", True) or context.cancelled() or context.done():
        return
    error = RequestAborted(SHUTDOWN_MESSAGE)
    with contextlib.suppress(Exception):
        await context.abort(
            grpc.StatusCode[error.status], error.message, ((ERROR_KIND_KEY, error.kind),)
        )


def _track(servicer: Any, name: str) -> asyncio.Task[Any] | None:
    """Record the running handler in ``servicer.calls`` (when it keeps one) until it ends
    (_untrack), so that a stopping daemon can end it with a status of its own."""
    calls: dict[asyncio.Task[Any], str] | None = getattr(servicer, "calls", None)
    task = asyncio.current_task()
    if calls is None or task is None:
        return None
    calls[task] = name
    return task


def _untrack(servicer: Any, task: asyncio.Task[Any] | None) -> None:
    if task is not None:
        servicer.calls.pop(task, None)


async def interrupt_calls(
    calls: dict[asyncio.Task[Any], str], spare: frozenset[str] = frozenset()
) -> None:
    """End the handlers still running (but those named in ``spare``) at shutdown, once the
    drain period is over: each is cancelled and tells its client ABORTED ("mmd is shutting
    down") at once. Left to grpc's own shutdown, they would end as UNAVAILABLE "Cancelling
    all calls", which a client cannot tell from an unreachable daemon."""
    doomed = [task for task, name in calls.items() if name not in spare and not task.done()]
    for task in doomed:
        task.cancel()
    if doomed:
        await asyncio.wait(doomed, timeout=_INTERRUPT_WAIT_S)


def unary(
    method: Callable[[Any, Any, Context], Awaitable[T]],
) -> Callable[[Any, Any, Context], Awaitable[T]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> T:
        task = _track(self, method.__name__)
        try:
            return await method(self, request, context)
        except Exception as error:
            await _abort(context, error)
            raise  # unreachable: abort raises
        except asyncio.CancelledError:
            await _interrupted(self, context)
            raise
        finally:
            _untrack(self, task)

    return wrapper


def streaming(
    method: Callable[[Any, Any, Context], AsyncGenerator[T, None]],
) -> Callable[[Any, Any, Context], Any]:
    """A server-streaming method written as an async generator, served with context.write.

    The generator is always closed when the call ends (aclosing): a client that goes
    away while a message is being written cancels this coroutine, and the generator's
    ``finally`` blocks (which give back slots, close upstream streams) run at once
    instead of whenever the garbage collector finalizes it.
    """

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> None:
        task = _track(self, method.__name__)
        try:
            async with contextlib.aclosing(method(self, request, context)) as items:
                async for item in items:
                    await context.write(item)
        except Exception as error:
            await _abort(context, error)
        except asyncio.CancelledError:
            await _interrupted(self, context)
            raise
        finally:
            _untrack(self, task)

    return wrapper
