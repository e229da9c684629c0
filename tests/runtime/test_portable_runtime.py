"""The default llama-server runs on every x86-64 CPU from Haswell (AVX2) up.

Whatever CPU runs the suite, ``qemu-x86_64 -cpu Haswell`` runs llama-server as an
AVX2-only CPU would: an instruction Haswell lacks (AVX-512, AVX-VNNI, AMX) ends it
with SIGILL. mmd serves a model through it here, exactly as on such a machine.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import serving_through

from mmd.runtime.server import resolve_llama_server

QEMU = shutil.which("qemu-x86_64")
if os.environ.get("MMD_REQUIRE_QEMU") and QEMU is None:
    raise RuntimeError("MMD_REQUIRE_QEMU is set but qemu-x86_64 is not on PATH")
pytestmark = pytest.mark.skipif(
    QEMU is None or platform.machine() != "x86_64",
    reason="needs qemu-user on x86-64 (apt-get install qemu-user; .ci/run installs it)",
)


def haswell(directory: Path, program: Path) -> Path:
    """A wrapper that runs ``program`` on an emulated Haswell CPU."""
    directory.mkdir(parents=True, exist_ok=True)
    wrapper = directory / "llama-server"
    wrapper.write_text(f'#!/bin/sh\nexec "{QEMU}" -cpu Haswell "{program}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_the_emulated_haswell_has_no_avx512(tmp_path: Path) -> None:
    """The control: without it, a pass below could mean the emulator hides nothing."""
    source = tmp_path / "zmm.c"
    source.write_text('int main(void){__asm__ volatile("vpxord %zmm0,%zmm0,%zmm0");return 0;}\n')
    program = tmp_path / "zmm"
    subprocess.run(["cc", "-o", str(program), str(source)], check=True)
    run = subprocess.run([str(haswell(tmp_path / "bin", program))], capture_output=True)
    assert run.returncode == -4 or b"Illegal instruction" in run.stderr


def test_a_model_is_served_on_a_haswell_cpu(
    make_daemon: Any, model_files: dict[str, Path], tmp_path: Path
) -> None:
    wrapper = haswell(tmp_path / "bin", resolve_llama_server(None).path)
    daemon = serving_through(
        make_daemon, model_files["tiny"], wrapper, tmp_path, load_timeout=120, timeout=180
    )
    assert "qemu-x86_64" in " ".join(p.cmdline()[0] for p in daemon.children())
