"""What the engine needs of a llama-server child, and how it makes one.

:class:`mmd.runtime.LlamaServer` is the real child; the engine is given a
:data:`ChildFactory` (``LlamaServer`` itself by default) so that it can be driven
with stand-ins that hold no process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import httpx

from mmd.runtime import LaunchSpec, LlamaBinary


class Child(Protocol):
    """A llama-server child as the engine uses it (see LlamaServer for the contract)."""

    binary: LlamaBinary
    spec: LaunchSpec
    client: httpx.AsyncClient  # requests to the child, once start() has begun

    @property
    def pid(self) -> int:
        """The process id; 0 before it runs."""
        ...

    async def start(self, timeout: float) -> None:
        """Run the child and wait until it serves; RuntimeFailed (the child stopped) when
        it exits first or is not ready within ``timeout`` seconds."""
        ...

    async def wait(self) -> int:
        """Wait for the child to exit; its exit status (negative: killed by signal)."""
        ...

    async def stop(self, grace: float) -> int | None:
        """End the child (SIGTERM, ``grace`` seconds, then SIGKILL); its exit status."""
        ...


ChildFactory = Callable[[LlamaBinary, LaunchSpec], Child]
