"""The cores this daemon may use, read from the machine: its CPU affinity, a cgroup CPU
quota, and which logical CPUs are SMT siblings of one physical core.

The rule that turns them into a budget (:func:`cpu_budget`) takes what was read as plain
values, so tests give it any machine's topology without that machine.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from mmd.core.cores import CpuBudget, parse_cpu_list, parse_cpus_setting

_SYS_CPU = Path("/sys/devices/system/cpu")
_CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CpuFacts:
    affinity: tuple[int, ...]  # logical CPUs this process may run on
    siblings: dict[int, tuple[int, ...]]  # logical CPU -> the logical CPUs of its core
    quota: float | None  # cgroup CPU quota in CPUs (1.5 = 150 ms per 100 ms), None: none


def read_cpu_facts() -> CpuFacts:
    affinity = tuple(sorted(os.sched_getaffinity(0)))
    return CpuFacts(affinity, {cpu: _siblings(cpu) for cpu in affinity}, _cgroup_quota())


def read_cpu_budget(setting: str | int = "auto") -> CpuBudget:
    """This machine's budget for ``[budget] cpus`` as written in the config: the daemon's
    (at start and each reload) and doctor's, read the same way."""
    return cpu_budget(read_cpu_facts(), parse_cpus_setting(setting))


def cpu_budget(facts: CpuFacts, setting: str | int | tuple[int, ...] = "auto") -> CpuBudget:
    """One CPU per physical core of the affinity, cut to the quota; ``setting`` is
    ``[budget] cpus``: "auto", a count of cores, or the CPUs to use."""
    if isinstance(setting, tuple):
        allowed = set(facts.affinity)
        chosen = tuple(cpu for cpu in setting if cpu in allowed)
        if not chosen:
            # The daemon cannot run a child anywhere else: the setting names no usable CPU.
            chosen = _physical(facts)
            return CpuBudget(chosen, f"affinity, {_count(chosen)} (cpus names none of them)")
        return CpuBudget(chosen, f"config, {_count(chosen)}")
    cores = _physical(facts)
    source = "affinity"
    if len(cores) < len(facts.affinity):
        source += " (one per physical core)"
    if facts.quota is not None and facts.quota < len(cores):
        cores = cores[: max(1, math.floor(facts.quota))]
        source = f"cgroup quota of {facts.quota:g} CPUs"
    if isinstance(setting, int) and setting < len(cores):
        cores = cores[:setting]
        source = "config"
    return CpuBudget(cores, f"{source}, {_count(cores)}")


def _count(cpus: tuple[int, ...]) -> str:
    return f"{len(cpus)} {'core' if len(cpus) == 1 else 'cores'}"


def _physical(facts: CpuFacts) -> tuple[int, ...]:
    """The first allowed logical CPU of each physical core: SMT siblings share one core's
    arithmetic units, so two threads on them run matrix work little faster than one."""
    seen: set[int] = set()
    chosen: list[int] = []
    for cpu in facts.affinity:
        if cpu in seen:
            continue
        chosen.append(cpu)
        seen.update(facts.siblings.get(cpu, (cpu,)))
    return tuple(chosen)


def _siblings(cpu: int) -> tuple[int, ...]:
    topology = _SYS_CPU / f"cpu{cpu}" / "topology"
    for name in ("core_cpus_list", "thread_siblings_list"):
        try:
            return parse_cpu_list((topology / name).read_text().strip())
        except (OSError, ValueError):
            continue
    return (cpu,)


def _cgroup_quota() -> float | None:
    """The tightest CPU quota on this process's cgroup path (v2 ``cpu.max``, or v1
    ``cpu.cfs_quota_us``): systemd's CPUQuota= and container CPU limits."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: cpu.max in each directory up the path
            quotas += _v2_quotas(_CGROUP_ROOT, path)
        elif "cpu" in controllers.split(","):
            quotas += _v1_quotas(_CGROUP_ROOT / controllers, path)
    return min(quotas) if quotas else None


def _ancestors(base: Path, path: str) -> list[Path]:
    parts = [p for p in path.split("/") if p]
    return [base.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _v2_quotas(base: Path, path: str) -> list[float]:
    found: list[float] = []
    for directory in _ancestors(base, path):
        try:
            quota, period = (directory / "cpu.max").read_text().split()
        except (OSError, ValueError):
            continue
        if quota != "max" and int(period) > 0:
            found.append(int(quota) / int(period))
    return found


def _v1_quotas(base: Path, path: str) -> list[float]:
    found: list[float] = []
    for directory in _ancestors(base, path):
        try:
            quota = int((directory / "cpu.cfs_quota_us").read_text())
            period = int((directory / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        if quota > 0 and period > 0:
            found.append(quota / period)
    return found
