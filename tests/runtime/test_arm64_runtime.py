"""mmd serves a model through an aarch64 llama-server, proven without Arm hardware.

`make arm64-runtime` (part of `make test`) cross-builds llama-server for 64-bit Arm with
`make llama`'s recipe (CROSS=aarch64: every Arm CPU variant the compiler can build) and
caches it. Here ``qemu-aarch64 -cpu NAME`` runs it as mmd's child on three emulated Arm
CPUs: a Cortex-A53 (armv8.0, NEON only), a Neoverse N1 (armv8.2: dotprod, fp16) and qemu's
"max" (SVE2, i8mm, SME). On each, the verify-before-trust check passes, a model loads and
answers, and llama-server loaded the CPU variant that CPU should get: the best one built
whose features the CPU has, with the features read from the emulated CPU itself (its
hwcaps), not assumed.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import serving_through

ROOT = Path(__file__).resolve().parents[2]
SYSROOT = Path("/usr/aarch64-linux-gnu")  # Debian's arm64 cross libc, libstdc++ and libgomp
QEMU = shutil.which("qemu-aarch64")
CROSS_CC = shutil.which("aarch64-linux-gnu-gcc")


def cached_build() -> Path:
    """Where scripts/cross_arm64.sh keeps the build for this pin and recipe."""
    script = ROOT / "scripts" / "cross_arm64.sh"
    prefix = subprocess.run(
        ["bash", str(script), "--prefix"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return Path(prefix) / "bin" / "llama-server"


BUILD = cached_build()
if os.environ.get("MMD_REQUIRE_ARM64") and not (QEMU and CROSS_CC and BUILD.exists()):
    raise RuntimeError(
        f"MMD_REQUIRE_ARM64 is set but qemu-aarch64, aarch64-linux-gnu-gcc or {BUILD} is "
        "missing (make arm64-runtime builds it)"
    )
pytestmark = pytest.mark.skipif(
    QEMU is None or CROSS_CC is None or not BUILD.exists() or platform.machine() != "x86_64",
    reason="needs qemu-user, g++-aarch64-linux-gnu on x86-64 and `make arm64-runtime`",
)

# llama.cpp's Arm variants (ggml/src/CMakeLists.txt, GGML_CPU_ALL_VARIANTS on Linux) and
# the hwcaps each needs, by the kernel's names; at start ggml loads the one with the
# highest score, which grows with each feature: the most demanding one the CPU runs.
VARIANTS = {
    "armv8.0_1": set(),
    "armv8.2_1": {"asimddp"},
    "armv8.2_2": {"asimddp", "asimdhp"},
    "armv8.2_3": {"asimddp", "asimdhp", "sve"},
    "armv8.6_1": {"asimddp", "asimdhp", "sve", "i8mm"},
    "armv8.6_2": {"asimddp", "asimdhp", "sve", "i8mm", "sve2"},
    "armv9.2_1": {"asimddp", "asimdhp", "sve", "i8mm", "sme"},
    "armv9.2_2": {"asimddp", "asimdhp", "sve", "i8mm", "sve2", "sme"},
}

# Prints the emulated CPU's features as the kernel (here qemu) reports them to a program.
HWCAPS_C = r"""
#include <stdio.h>
#include <sys/auxv.h>
#include <asm/hwcap.h>
int main(void) {
    unsigned long h = getauxval(AT_HWCAP), h2 = getauxval(AT_HWCAP2);
    if (h & HWCAP_ASIMD) printf("asimd ");
    if (h & HWCAP_ASIMDDP) printf("asimddp ");
    if (h & HWCAP_ASIMDHP) printf("asimdhp ");
    if (h & HWCAP_SVE) printf("sve ");
    if (h2 & HWCAP2_I8MM) printf("i8mm ");
    if (h2 & HWCAP2_SVE2) printf("sve2 ");
    if (h2 & HWCAP2_SME) printf("sme ");
    return 0;
}
"""


def emulated(directory: Path, cpu: str, program: Path) -> Path:
    """A wrapper that runs the aarch64 ``program`` on an emulated ``cpu``."""
    directory.mkdir(parents=True, exist_ok=True)
    wrapper = directory / program.name
    wrapper.write_text(f'#!/bin/sh\nexec "{QEMU}" -L "{SYSROOT}" -cpu {cpu} "{program}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def cross_compile(tmp_path: Path, name: str, source: str, *flags: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / f"{name}.c").write_text(source)
    program = tmp_path / name
    subprocess.run(
        [str(CROSS_CC), "-O1", *flags, "-o", str(program), str(tmp_path / f"{name}.c")],
        check=True,
    )
    return program


def features(tmp_path: Path, cpu: str) -> set[str]:
    program = cross_compile(tmp_path, "hwcaps", HWCAPS_C)
    wrapper = emulated(tmp_path / cpu, cpu, program)
    run = subprocess.run([str(wrapper)], capture_output=True, text=True, check=True)
    return set(run.stdout.split())


def expected_variant(cpu_features: set[str]) -> str:
    libraries = BUILD.parent.glob("libggml-cpu-*.so")
    built = {p.name.removeprefix("libggml-cpu-").removesuffix(".so") for p in libraries}
    fitting = [v for v in VARIANTS if v in built and VARIANTS[v] <= cpu_features]
    return max(fitting, key=lambda v: len(VARIANTS[v]))


def test_the_build_has_arm_variants_and_the_emulated_cpus_differ(tmp_path: Path) -> None:
    """The control: the two CPUs must tell variants apart, and the build must hold them."""
    built = sorted(p.name for p in BUILD.parent.glob("libggml-cpu-*.so"))
    assert "libggml-cpu-armv8.0_1.so" in built
    assert "libggml-cpu-armv8.6_2.so" in built
    assert features(tmp_path, "cortex-a53") == {"asimd"}
    assert {"asimd", "asimddp", "asimdhp", "sve", "i8mm", "sve2"} <= features(tmp_path, "max")
    # An SVE instruction is illegal on the Cortex-A53 and runs on "max".
    sve = cross_compile(
        tmp_path,
        "sve",
        'int main(void){__asm__ volatile("ptrue p0.b");return 0;}\n',
        "-march=armv8.2-a+sve",
    )
    a53 = subprocess.run([str(emulated(tmp_path / "a53", "cortex-a53", sve))], capture_output=True)
    assert a53.returncode == -4 or b"Illegal instruction" in a53.stderr
    assert subprocess.run([str(emulated(tmp_path / "max", "max", sve))]).returncode == 0


@pytest.mark.timeout(600)
@pytest.mark.parametrize("cpu", ["cortex-a53", "neoverse-n1", "max"])
def test_a_model_is_served_on_an_emulated_arm_cpu(
    cpu: str, make_daemon: Any, model_files: dict[str, Path], tmp_path: Path
) -> None:
    variant = expected_variant(features(tmp_path / "probe", cpu))
    wrapper = emulated(tmp_path / "bin", cpu, BUILD)
    daemon = serving_through(
        make_daemon, model_files["tiny"], wrapper, tmp_path, load_timeout=300, timeout=400
    )
    (child,) = daemon.children()
    assert child.cmdline()[0] == QEMU
    # qemu-user maps the guest's libraries into its own address space, so the child's
    # maps show the one CPU variant ggml kept (it unloads the others after scoring them).
    mapped = {Path(m.path).name for m in child.memory_maps() if "libggml-cpu-" in m.path}
    assert mapped == {f"libggml-cpu-{variant}.so"}
    # And llama-server's own account of the CPU backend it runs agrees.
    log = (daemon.root / "logs" / "tiny.log").read_text(errors="replace")
    (system_info,) = re.findall(r"system_info: .*", log)
    assert ("SVE = 1" in system_info) == ("sve" in VARIANTS[variant]), system_info
    assert ("DOTPROD = 1" in system_info) == ("asimddp" in VARIANTS[variant]), system_info
