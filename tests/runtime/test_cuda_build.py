"""The CUDA build of `make llama BACKEND=cuda`: found by itself, and proven before it serves.

The build is looked for where `make llama` installs it, ``$XDG_DATA_HOME/mmd/llama/cuda``,
or in ``$MMD_TEST_CUDA_BUILD`` (its PREFIX). On a machine without the NVIDIA driver it has
no GPU to use: mmd's check must still find it working (it serves on its CPU variants) and
a model must be served by it, not by the next candidate and not in a crash loop.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon

from mmd.runtime.server import llama_server_candidates


def fake_server(directory: Path) -> Path:
    directory.mkdir(parents=True)
    binary = directory / "llama-server"
    binary.write_text("#!/bin/sh\nexit 1\n")
    binary.chmod(0o755)
    return binary


def test_the_cuda_build_comes_before_the_other_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MMD_LLAMA_SERVER", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    builds = tmp_path / "data" / "mmd" / "llama"
    cpu = fake_server(builds / "cpu" / "bin")
    cuda = fake_server(builds / "cuda" / "bin")
    candidates, explicit = llama_server_candidates(None)
    assert not explicit
    assert [(c.path, c.source) for c in candidates[:2]] == [
        (cuda, "built (cuda)"),
        (cpu, "built (cpu)"),
    ]


def cuda_build() -> Path | None:
    named = os.environ.get("MMD_TEST_CUDA_BUILD")
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    prefix = Path(named) if named else Path(data) / "mmd" / "llama" / "cuda"
    return prefix if (prefix / "bin" / "libggml-cuda.so").exists() else None


def has_nvidia_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


BUILD = cuda_build()


@pytest.mark.skipif(
    BUILD is None,
    reason="no CUDA build: 'make llama BACKEND=cuda CUDA_ARCHITECTURES=90', or set "
    "MMD_TEST_CUDA_BUILD to its PREFIX",
)
@pytest.mark.skipif(
    has_nvidia_driver(), reason="the NVIDIA driver is here: the gpu tests run this build"
)
def test_without_a_driver_the_cuda_build_serves_on_the_cpu(
    make_daemon: Any, model_files: dict[str, Path], tmp_path: Path
) -> None:
    assert BUILD is not None
    listed = subprocess.run(
        [str(BUILD / "bin" / "llama-server"), "--list-devices"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert "CUDA0" not in listed.stdout + listed.stderr
    # Where make llama puts it, so that mmd chooses it by itself; nothing on PATH before it.
    data = tmp_path / "data"
    (data / "mmd" / "llama").mkdir(parents=True)
    (data / "mmd" / "llama" / "cuda").symlink_to(BUILD)
    chosen = data / "mmd" / "llama" / "cuda" / "bin" / "llama-server"
    daemon: Daemon = make_daemon(
        '[models.tiny]\npath = "{}"\nctx = 256\n'.format(model_files["tiny"]),
        extra_env={"XDG_DATA_HOME": str(data), "PATH": "/usr/bin:/bin", "MMD_LLAMA_SERVER": ""},
    )
    daemon.load_and_answer("tiny", tokens=2, timeout=120)
    health = json.loads(daemon.mmctl("health", "--json").stdout)
    assert health["llama_server"].startswith(f"{chosen} (built (cuda)), version")
    assert "falling back" not in daemon.log_path.read_text()
    models = json.loads(daemon.mmctl("models", "--json").stdout)
    assert [m["state"] for m in models] == ["ready"]
