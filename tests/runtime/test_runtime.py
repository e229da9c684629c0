"""Child process plumbing that needs no model: the pidfd child watcher."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from mmd.runtime.server import watch_children_with_pidfd


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="Python 3.12+ uses pidfds itself")
async def test_children_are_started_and_reaped_through_pidfds() -> None:
    try:
        assert watch_children_with_pidfd() == hasattr(os, "pidfd_open")
        if hasattr(os, "pidfd_open"):
            assert isinstance(asyncio.get_child_watcher(), asyncio.PidfdChildWatcher)
        code = "raise SystemExit(7)"
        process = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
        assert await asyncio.wait_for(process.wait(), 30) == 7
        sleeper = await asyncio.create_subprocess_exec("sleep", "30")
        sleeper.kill()
        assert await asyncio.wait_for(sleeper.wait(), 30) == -9
    finally:
        asyncio.set_child_watcher(None)  # the next test's loop gets the default again
