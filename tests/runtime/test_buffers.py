"""llama-server's own buffer sizes, read from its log and mapped to mmd's devices."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmd.core.units import MIB
from mmd.runtime.buffers import buffer_sizes, device_for, runtime_bytes

# The load of a 4-layer synthetic model (embedding 256, ctx 4096, 2 slots), captured from
# the bundled llama-server started as mmd starts a CPU placement (--device none
# --verbosity 4), with mmd's start line first; the model and socket paths neutralised.
CPU_LOAD = (Path(__file__).parents[1] / "fixtures" / "llama_server_load_cpu.log").read_text()

# The same lines as a CUDA build prints them for a split (llama.cpp's format: the buffer
# type, the kind, the size in MiB), and a Vulkan build's names.
GPU_LINES = """\
load_tensors: offloaded 15/33 layers to GPU
load_tensors:   CPU_Mapped model buffer size =  2116.25 MiB
load_tensors:        CUDA0 model buffer size =  1723.00 MiB
load_tensors:        CUDA1 model buffer size =   512.50 MiB
llama_context:  CUDA_Host  output buffer size =     0.49 MiB
llama_kv_cache:        CPU KV buffer size =   544.00 MiB
llama_kv_cache:      CUDA0 KV buffer size =   480.00 MiB
sched_reserve:      CUDA0 compute buffer size =   300.01 MiB
sched_reserve:  CUDA_Host compute buffer size =    24.01 MiB
load_tensors:      Vulkan2 model buffer size =   100.00 MiB
load_tensors:  Vulkan_Host model buffer size =     1.00 MiB
load_tensors: RPC[127.0.0.1:50052] model buffer size =    64.00 MiB
"""


def test_a_cpu_load_reports_its_buffers_in_ram() -> None:
    sizes = buffer_sizes(CPU_LOAD)
    # The four lines of that log: weights (CPU_Mapped), output, KV cache and compute.
    assert sizes == {
        "ram": {
            "model": round(9.45 * MIB),
            "output": 0,
            "kv": 8 * MIB,
            "compute": round(6.51 * MIB),
        }
    }
    assert runtime_bytes(CPU_LOAD) == {"ram": round(9.45 * MIB) + 8 * MIB + round(6.51 * MIB)}


def test_gpu_and_host_buffers_map_to_gpu_ids_and_ram() -> None:
    sizes = buffer_sizes(GPU_LINES)
    assert sizes["gpu0"] == {
        "model": 1723 * MIB,
        "kv": 480 * MIB,
        "compute": round(300.01 * MIB),
    }
    assert sizes["gpu1"] == {"model": round(512.5 * MIB)}
    assert sizes["gpu2"] == {"model": 100 * MIB}
    # Pinned host buffers (CUDA_Host, Vulkan_Host) are RAM, added up per kind.
    assert sizes["ram"] == {
        "model": round(2116.25 * MIB) + MIB,
        "output": round(0.49 * MIB),
        "kv": 544 * MIB,
        "compute": round(24.01 * MIB),
    }
    # A remote (RPC) buffer is on no device of this machine.
    assert set(sizes) == {"ram", "gpu0", "gpu1", "gpu2"}


@pytest.mark.parametrize(
    ("buffer_type", "device"),
    [
        ("CPU", "ram"),
        ("CPU_Mapped", "ram"),
        ("CPU_REPACK", "ram"),
        ("CUDA_Host", "ram"),
        ("Vulkan_Host", "ram"),
        ("BLAS", "ram"),
        ("Metal", "ram"),  # Apple: unified memory, budgeted as RAM
        ("MTL0", "ram"),
        ("CUDA0", "gpu0"),
        ("CUDA12", "gpu12"),
        ("Vulkan1", "gpu1"),
        ("ROCm0", "gpu0"),
        ("SYCL3", "gpu3"),
        ("RPC[host:1]", None),
        ("Mystery0x", None),
    ],
)
def test_device_for(buffer_type: str, device: str | None) -> None:
    assert device_for(buffer_type) == device


def test_a_log_without_buffer_lines_reports_nothing() -> None:
    # llama-server at its default verbosity (3) prints none of them.
    default_level = "\n".join(line for line in CPU_LOAD.splitlines() if "buffer size" not in line)
    assert buffer_sizes(default_level) == {}
    assert runtime_bytes("") == {}
