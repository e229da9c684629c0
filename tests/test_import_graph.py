"""What the import-linter contracts (pyproject.toml, run by `make lint`) cannot say: what a
running daemon has imported, and who reaches into the engine's scheduler."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def test_the_daemon_does_not_import_httpx() -> None:
    """The daemon reads its children through aiohttp only (mmctl's client is httpx)."""
    probe = "import sys, mmd.daemon, mmd.engine.engine; print('httpx' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False"


def test_only_the_engine_touches_its_scheduler() -> None:
    """``Engine.core`` (the scheduler) is the engine's own: the front doors, the daemon and
    mmctl go through the engine's methods."""
    engine_package = SRC / "mmd" / "engine"
    outside = [
        path
        for package in ("mmd", "mmctl")
        for path in (SRC / package).rglob("*.py")
        if engine_package not in path.parents and "v1" not in path.parts
    ]
    assert len(outside) > 20  # the tree is read, not empty
    reaching = [
        f"{path.relative_to(SRC)}:{number}"
        for path in outside
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\bengine\.core\b", line)
    ]
    assert reaching == []
