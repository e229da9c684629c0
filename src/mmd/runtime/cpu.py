"""The CPU's instruction-set features, and what to say when a binary needs more of them."""

from __future__ import annotations

import signal
from pathlib import Path

# The instruction-set extensions llama.cpp's CPU backends are built for, oldest first:
# what a SIGILL diagnosis lists as present or missing.
CPU_FEATURES = (
    "sse4_2",
    "avx",
    "f16c",
    "fma",
    "avx2",
    "bmi2",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512vbmi",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
)

BUILD_HINT = (
    "run 'make llama' for a build that picks the CPU variant at start, "
    "or set daemon.llama_server to a llama-server built for this machine"
)


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def sigill_line(binary: Path, flags: frozenset[str] | None = None) -> str:
    """The one-line diagnosis of a llama-server killed by SIGILL."""
    flags = cpu_flags() if flags is None else flags
    has = [f for f in CPU_FEATURES if f in flags]
    lacks = [f for f in CPU_FEATURES if f not in flags]
    return (
        f"llama-server {binary}: illegal instruction: built for CPU features this machine "
        f"lacks (this CPU has {' '.join(has) or 'none of them'}; lacks "
        f"{' '.join(lacks) or 'none of them'}); {BUILD_HINT}"
    )


def is_sigill(status: int | None) -> bool:
    """Whether an exit status (negative: the signal) is an illegal-instruction death."""
    return status == -signal.SIGILL
