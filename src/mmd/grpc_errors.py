"""Domain errors to gRPC statuses, in one place, for every servicer method."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from mmd.errors import ERROR_KIND_KEY, MmdError

log = logging.getLogger("mmd.service")

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]


async def _abort(context: Context, error: Exception) -> None:
    if isinstance(error, MmdError):
        await context.abort(error.code, error.message, ((ERROR_KIND_KEY, error.kind),))
    log.exception("internal error", exc_info=error)
    await context.abort(
        grpc.StatusCode.INTERNAL, f"internal error: {error}", ((ERROR_KIND_KEY, "internal"),)
    )


async def _interrupted(servicer: Any, context: Context) -> None:
    """A handler cancelled by the daemon, not by its client: say so instead of going silent.

    Only a daemon that is stopping cancels handlers (``servicer.stopping``); any other
    cancellation is a client that went away, and an abort sent to it would only cost
    time (during a burst of 10,000 cancellations, half of the event loop's).
    """
    if not getattr(servicer, "stopping", True) or context.cancelled() or context.done():
        return
    with contextlib.suppress(Exception):
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            "the request was interrupted (mmd is shutting down?)",
            ((ERROR_KIND_KEY, "interrupted"),),
        )


def unary(
    method: Callable[[Any, Any, Context], Awaitable[T]],
) -> Callable[[Any, Any, Context], Awaitable[T]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> T:
        try:
            return await method(self, request, context)
        except Exception as error:
            await _abort(context, error)
            raise  # unreachable: abort raises
        except asyncio.CancelledError:
            await _interrupted(self, context)
            raise

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
        try:
            async with contextlib.aclosing(method(self, request, context)) as items:
                async for item in items:
                    await context.write(item)
        except Exception as error:
            await _abort(context, error)
        except asyncio.CancelledError:
            await _interrupted(self, context)
            raise

    return wrapper
