"""The CPU's instruction-set features, and what to say when a binary needs more of them."""

from __future__ import annotations

import platform
import signal
from pathlib import Path

# The instruction-set extensions llama.cpp's CPU backends are built for, oldest first:
# what a SIGILL diagnosis lists as present or missing. x86-64, by /proc/cpuinfo's "flags":
X86_FEATURES = (
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
# 64-bit Arm, by /proc/cpuinfo's "Features" (the kernel's hwcap names): NEON (asimd), then
# what llama.cpp's Arm variants add from armv8.2 to armv9.2: dot product (asimddp), fp16
# vector arithmetic (asimdhp), SVE, int8 matrix multiply (i8mm), SVE2 and SME.
ARM_FEATURES = ("asimd", "asimddp", "asimdhp", "sve", "i8mm", "sve2", "sme")

BUILD_HINT = (
    "run 'make llama' for a build that picks the CPU variant at start, "
    "or set daemon.llama_server to a llama-server built for this machine"
)


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        return parse_cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return frozenset()


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The first processor's flags: x86 names the line "flags", Arm "Features"."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def machine_features(machine: str | None = None) -> tuple[str, ...]:
    """The features a diagnosis lists for this machine's architecture (``uname -m``);
    none for one whose llama.cpp variants mmd does not know."""
    name = (machine if machine is not None else platform.machine()).lower()
    if name in ("aarch64", "arm64"):
        return ARM_FEATURES
    if name in ("x86_64", "amd64", "i386", "i686"):
        return X86_FEATURES
    return ()


def sigill_line(
    binary: Path, flags: frozenset[str] | None = None, machine: str | None = None
) -> str:
    """The one-line diagnosis of a llama-server killed by SIGILL."""
    flags = cpu_flags() if flags is None else flags
    features = machine_features(machine)
    listed = ""  # an architecture whose variants mmd does not know gets no feature list
    if features:
        has = " ".join(f for f in features if f in flags) or "none of them"
        lacks = " ".join(f for f in features if f not in flags) or "none of them"
        listed = f" (this CPU has {has}; lacks {lacks})"
    return (
        f"llama-server {binary}: illegal instruction: built for CPU features this machine "
        f"lacks{listed}; {BUILD_HINT}"
    )


def is_sigill(status: int | None) -> bool:
    """Whether an exit status (negative: the signal) is an illegal-instruction death."""
    return status == -signal.SIGILL
