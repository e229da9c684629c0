"""The SIGILL diagnosis names the features of the machine's own architecture: x86-64's
from /proc/cpuinfo's "flags", 64-bit Arm's from its "Features" (no x86 assumption)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmd.runtime.cpu import ARM_FEATURES, machine_features, parse_cpu_flags, sigill_line

# /proc/cpuinfo of a Raspberry Pi 4 (Cortex-A72, armv8.0: NEON only).
CORTEX_A72 = """\
processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

processor\t: 1
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
"""

# One core of an NVIDIA Grace (Neoverse V2, armv9.0: SVE2 and i8mm, no SME).
NEOVERSE_V2 = """\
processor\t: 0
BogoMIPS\t: 2000.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid \
asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc \
flagm ssbs sb paca pacg dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint \
svei8mm svebf16 i8mm bf16 dgh bti
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd4f
CPU revision\t: 0
"""


def test_arm_features_are_read_from_the_features_line() -> None:
    flags = parse_cpu_flags(NEOVERSE_V2)
    assert {"asimd", "asimddp", "sve", "sve2", "i8mm"} <= flags
    assert "sme" not in flags
    # "svei8mm" (SVE's int8 matrix multiply) is a word of its own, not "i8mm".
    assert parse_cpu_flags(CORTEX_A72) == frozenset({"fp", "asimd", "evtstrm", "crc32", "cpuid"})


@pytest.mark.parametrize("machine", ["aarch64", "arm64"])
def test_an_arm_machine_is_diagnosed_with_arm_features(machine: str) -> None:
    assert machine_features(machine) == ARM_FEATURES
    line = sigill_line(Path("/opt/llama-server"), parse_cpu_flags(CORTEX_A72), machine)
    assert line.startswith("llama-server /opt/llama-server: illegal instruction: ")
    assert "(this CPU has asimd; lacks asimddp asimdhp sve i8mm sve2 sme)" in line
    assert "avx" not in line
    assert "sse" not in line
    assert "make llama" in line


def test_a_grace_cpu_lacks_only_sme() -> None:
    line = sigill_line(Path("/x"), parse_cpu_flags(NEOVERSE_V2), "aarch64")
    assert "(this CPU has asimd asimddp asimdhp sve i8mm sve2; lacks sme)" in line


def test_x86_flags_on_an_x86_machine() -> None:
    flags = parse_cpu_flags("processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma f16c bmi2\n")
    line = sigill_line(Path("/x"), flags, "x86_64")
    assert "(this CPU has sse4_2 avx f16c fma avx2 bmi2; lacks avx_vnni" in line
    assert "asimd" not in line


def test_an_unknown_architecture_gets_no_feature_list() -> None:
    line = sigill_line(Path("/x"), frozenset({"v", "zba"}), "riscv64")
    assert line.startswith("llama-server /x: illegal instruction: built for CPU features")
    assert "this CPU has" not in line
    assert "make llama" in line
    assert "\n" not in line


def test_no_cpuinfo_flags_means_none() -> None:
    assert parse_cpu_flags("processor\t: 0\nmodel name\t: something\n") == frozenset()
