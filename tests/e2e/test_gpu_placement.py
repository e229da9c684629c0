"""Placement on a real NVIDIA GPU through the daemon; skipped where there is none.

Run on a GPU machine with ``make test-gpu``. The children need a llama-server that
sees the GPU: ``MMD_TEST_LLAMA_SERVER`` names a CUDA build, else the bundled (Vulkan)
build is used when ``--list-devices`` shows a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import Daemon

from mmd.core.footprint import estimate
from mmd.runtime.gguf import read_shape
from mmd.runtime.server import resolve_llama_server
from mmd.runtime.synthetic import write_model

pytestmark = pytest.mark.gpu
LAYERS = 8


@pytest.fixture(scope="module")
def nvml() -> Iterator[Any]:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        pytest.skip(f"NVML unavailable: {exc}")
    if pynvml.nvmlDeviceGetCount() == 0:
        pytest.skip("NVML sees no GPU")
    yield pynvml
    pynvml.nvmlShutdown()


@pytest.fixture(scope="module")
def gpu_env(nvml: Any) -> dict[str, str]:
    binary = os.environ.get("MMD_TEST_LLAMA_SERVER") or str(resolve_llama_server(None).path)
    env = {"MMD_LLAMA_SERVER": binary}
    listing = subprocess.run(
        [binary, "--list-devices"], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    devices = [line.strip() for line in listing.split("Available devices:")[-1].splitlines()]
    if not [d for d in devices if d and d != "(none)"]:
        pytest.skip(f"{binary} sees no GPU")
    return env


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(
        tmp_path_factory.mktemp("gpu") / "gpu-model.gguf", embedding=1024, blocks=LAYERS, heads=8
    )


def vram_of(nvml: Any, pid: int) -> int:
    """Bytes the process holds on GPU 0 according to NVML (0 when not listed)."""
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    held = 0
    for getter in (
        nvml.nvmlDeviceGetComputeRunningProcesses,
        nvml.nvmlDeviceGetGraphicsRunningProcesses,
    ):
        for proc in getter(handle):
            if proc.pid == pid and proc.usedGpuMemory:
                held = max(held, int(proc.usedGpuMemory))
    return held


def ngl_of(pid: int) -> int:
    argv = psutil.Process(pid).cmdline()
    return int(argv[argv.index("--n-gpu-layers") + 1])


def test_health_budgets_every_gpu(make_daemon: Any, gpu_env: dict[str, str], nvml: Any) -> None:
    daemon: Daemon = make_daemon("", extra_env=gpu_env)
    health = json.loads(daemon.mmctl("health", "--json").stdout)
    gpus = {d["id"]: d for d in health["devices"] if d["kind"] == "gpu"}
    assert len(gpus) == nvml.nvmlDeviceGetCount()
    total = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(0)).total
    assert gpus["gpu0"]["total_bytes"] == total
    assert 0 < gpus["gpu0"]["budget_bytes"] <= total


def test_whole_model_on_the_gpu_and_its_measured_vram(
    make_daemon: Any, gpu_env: dict[str, str], nvml: Any, big_model: Path
) -> None:
    config = f'[models.g]\npath = "{big_model}"\nctx = 2048\n'
    daemon: Daemon = make_daemon(config, extra_env=gpu_env)
    loaded = json.loads(daemon.mmctl("load", "g", "--json").stdout)
    placement = loaded["placement"]
    assert placement["gpu_layers"] == placement["total_layers"] == LAYERS
    assert ngl_of(loaded["pid"]) == LAYERS + 1  # + the output layer
    planned = {s["device"]: s["bytes"] for s in placement["shares"]}
    measured = vram_of(nvml, loaded["pid"])
    if measured == 0:
        pytest.skip("NVML lists no VRAM for the child (PID namespace?)")
    # The plan must not underestimate (that is how a GPU runs out of memory), nor be wild.
    assert measured <= planned["gpu0"], (measured, planned)
    assert measured >= 0.3 * planned["gpu0"], (measured, planned)


def test_layer_split_follows_a_small_gpu_budget(
    make_daemon: Any, gpu_env: dict[str, str], nvml: Any, big_model: Path
) -> None:
    footprint = estimate(read_shape(big_model), ctx=2048, parallel=1)
    on_gpu, _ = footprint.split(3)
    budget = on_gpu + footprint.layer_bytes[0] // 2  # room for three layers, not four
    config = f'[budget]\ngpu = "{budget}"\n[models.g]\npath = "{big_model}"\nctx = 2048\n'
    daemon: Daemon = make_daemon(config, extra_env=gpu_env)
    plan = json.loads(daemon.mmctl("plan", "g", "--json").stdout)
    assert plan["feasible"] is True
    assert plan["placement"]["gpu_layers"] == 3
    loaded = json.loads(daemon.mmctl("load", "g", "--json").stdout)
    assert loaded["placement"]["gpu_layers"] == 3
    assert ngl_of(loaded["pid"]) == 3
    measured = vram_of(nvml, loaded["pid"])
    if measured == 0:
        pytest.skip("NVML lists no VRAM for the child (PID namespace?)")
    assert measured <= budget, (measured, budget)


def test_explicit_gpu_layers_is_honoured_or_refused(
    make_daemon: Any, gpu_env: dict[str, str], big_model: Path
) -> None:
    config = f'[models.g]\npath = "{big_model}"\nctx = 2048\n'
    daemon: Daemon = make_daemon(config, extra_env=gpu_env)
    refused = daemon.mmctl("load", "g", "--gpu-layers", str(LAYERS + 5))
    assert refused.returncode in (2, 5)
    assert str(LAYERS) in refused.stderr.decode()
    loaded = json.loads(daemon.mmctl("load", "g", "--gpu-layers", "2", "--json").stdout)
    assert loaded["placement"]["gpu_layers"] == 2
    assert ngl_of(loaded["pid"]) == 2
