"""What llama-server itself says it allocated, per mmd device, read from its log.

At load llama-server logs one line per buffer it allocates (at ``--verbosity 4``; the
default level 3 leaves them out), each naming its backend buffer type::

    load_tensors:   CPU_Mapped model buffer size =   235.16 MiB
    llama_kv_cache:      CUDA0 KV buffer size =   448.00 MiB
    sched_reserve:  CUDA_Host compute buffer size =    12.01 MiB

Buffer types map to mmd's device ids: host types (``CPU``, ``CPU_Mapped``,
``CPU_REPACK``, ``CUDA_Host``, ``Vulkan_Host``, ``BLAS``, and Apple's ``Metal``/``MTL0``,
which share unified memory) to ``ram``; a numbered GPU backend (``CUDA0``, ``Vulkan1``,
``ROCm0``, ``SYCL0``...) to ``gpuN``. CUDA numbers devices as NVML does (mmd starts
children with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``); Vulkan's order is its own, which is the
same on a machine with GPUs of one vendor. Types mmd does not know are left out.

Pure: text in, bytes out.
"""

from __future__ import annotations

import re

from mmd.core.units import MIB
from mmd.host.memory import RAM_ID, gpu_id

_BUFFER_LINE = re.compile(
    r"(?P<type>[\w.\[\]:-]+)\s+(?P<kind>model|KV|RS|compute|output)\s+buffer size\s*=\s*"
    r"(?P<mib>\d+(?:\.\d+)?)\s*MiB"
)
_GPU_BACKEND = re.compile(r"^(?:CUDA|ROCm|HIP|Vulkan|SYCL|MUSA|CANN|OpenCL)(?P<index>\d+)$")
_HOST_BACKEND = re.compile(r"^(?:CPU(?:_\w+)?|\w+_Host|BLAS|Metal|MTL\d*)$")

# The kinds of buffer, as mmd names them: weights, KV cache, recurrent state, compute
# graph, output (logits and embeddings).
KINDS = {"model": "model", "KV": "kv", "RS": "rs", "compute": "compute", "output": "output"}


def device_for(buffer_type: str) -> str | None:
    """The mmd device id of a llama.cpp buffer type; None when mmd does not know it."""
    gpu = _GPU_BACKEND.match(buffer_type)
    if gpu:
        return gpu_id(int(gpu["index"]))
    if _HOST_BACKEND.match(buffer_type):
        return RAM_ID
    return None


def buffer_sizes(log_text: str) -> dict[str, dict[str, int]]:
    """Device id -> buffer kind (``model``, ``kv``, ``rs``, ``compute``, ``output``) -> bytes.

    Lines of the same device and kind are added up (a model split between CPU_Mapped and
    CPU_REPACK, the two caches of a sliding-window model). ``{}`` when the log has none.
    """
    sizes: dict[str, dict[str, int]] = {}
    for match in _BUFFER_LINE.finditer(log_text):
        device = device_for(match["type"])
        if device is None:
            continue
        kinds = sizes.setdefault(device, {})
        kind = KINDS[match["kind"]]
        kinds[kind] = kinds.get(kind, 0) + round(float(match["mib"]) * MIB)
    return sizes


def runtime_bytes(log_text: str) -> dict[str, int]:
    """Device id -> all the buffers llama-server reported on it, in bytes."""
    return {device: sum(kinds.values()) for device, kinds in buffer_sizes(log_text).items()}
