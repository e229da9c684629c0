"""A load that fails for any reason ends as ``failed`` with the reason (exit 6), never
stays ``loading``, and the daemon keeps serving the other models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import Daemon


def test_a_log_that_cannot_be_written_fails_the_load(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(
        f'[models.a]\npath = "{model_files["tiny"]}"\nctx = 256\n'
        f'[models.b]\npath = "{model_files["tiny2"]}"\nctx = 256\n'
    )
    blocked = daemon.root / "logs" / "a.log"
    blocked.mkdir(parents=True)  # even root cannot open a directory for appending
    load = daemon.mmctl("load", "a", timeout=20)
    assert load.returncode == 6
    assert load.stderr.decode().splitlines()[-1] == (
        f"mmctl: model 'a': cannot write its log {blocked}: Is a directory"
    )
    states = {m["id"]: m["state"] for m in json.loads(daemon.mmctl("models", "--json").stdout)}
    assert states == {"a": "failed", "b": "unloaded"}
    assert daemon.mmctl("load", "b").returncode == 0
    log = (daemon.root / "logs" / "b.log").stat()
    assert oct(log.st_mode & 0o777) == "0o640"
    assert "Task exception was never retrieved" not in daemon.log_path.read_text()
