"""The CPU budget rule: which cores each llama-server child computes on, and with how many
threads.

Pure: the cores mmd may use (:class:`CpuBudget`, read from the machine by mmd.host.cpu_topology)
and the core sets the loaded models hold in; a decision out. Nothing here reads the machine.

Why cores are budgeted at all: llama.cpp's CPU threads meet at a spinning barrier after
every operation of a token's graph. Two children whose threads outnumber the cores they
run on keep descheduling each other in the middle of those barriers, and both slow down a
hundredfold (two small models on 2 cores: under 1% of their speed each). One child per
core set, with as many threads as cores in its set, never waits at a barrier for a thread
that is not running.

The policy:

* Every model that computes on the CPU (a CPU or a split placement) gets a set of whole
  cores of its own, with one thread per core, pinned.
* The share is the budget divided by the number of such models loaded, at least one core:
  a model loaded alone gets every core; two loaded together get half each.
* When a model loads and the models already loaded hold more than their new fair share,
  those are *re-placed*: stopped (once idle) and started again on their smaller share. A
  model that unloads gives its cores back to the next load; the others keep their share
  until their own next load (a restart only to widen would cost a reload for nothing).
* With more CPU models than cores, each gets one core and one thread; single-threaded
  children that share a core take turns without a barrier to wait at.
* A model whose ``args`` set threads, affinity, polling or priority is left to them: mmd
  passes none of its own and counts none of the model's cores.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# llama-server's flags for CPU threads and placement: a model whose args name any of them
# is placed by its args, not by mmd.
THREAD_FLAGS = frozenset(
    {
        "-t",
        "--threads",
        "-tb",
        "--threads-batch",
        "-C",
        "--cpu-mask",
        "-Cr",
        "--cpu-range",
        "--cpu-strict",
        "-Cb",
        "--cpu-mask-batch",
        "-Crb",
        "--cpu-range-batch",
        "--cpu-strict-batch",
        "--poll",
        "--poll-batch",
        "--prio",
        "--prio-batch",
    }
)

_RANGE_RE = re.compile(r"^(\d+)(?:-(\d+))?$")


@dataclass(frozen=True)
class CpuBudget:
    """The cores mmd may give its children: one logical CPU per physical core."""

    cpus: tuple[int, ...]  # ascending
    source: str  # how they were found, for health and doctor: "affinity, 2 cores" ...

    @property
    def count(self) -> int:
        return len(self.cpus)


@dataclass(frozen=True)
class CoreShare:
    """One child's cores and threads."""

    cpus: tuple[int, ...]
    threads: int
    shared_with: tuple[str, ...] = ()  # models whose sets overlap this one (more models than cores)

    @property
    def mask(self) -> str:
        """llama-server's --cpu-mask: hexadecimal, bit N for CPU N."""
        return f"{sum(1 << cpu for cpu in self.cpus):x}"


@dataclass(frozen=True)
class CoreDecision:
    share: CoreShare
    replace: tuple[str, ...]  # loaded models to restart on a smaller share first
    reason: str  # one line for plan: "1 of 2 cores: shared with coder"


def args_place_threads(args: Sequence[str]) -> bool:
    """True when a model's own args choose its threads or cores (``--threads=4`` too)."""
    return any(arg.split("=", 1)[0] in THREAD_FLAGS for arg in args)


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """``"0-3,8,10-11"`` -> (0, 1, 2, 3, 8, 10, 11); raises ValueError with a readable line."""
    cpus: set[int] = set()
    for part in text.split(","):
        match = _RANGE_RE.match(part.strip())
        if not match:
            raise ValueError(f"not a CPU list: {text!r} (use e.g. '0-7,16-23')")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise ValueError(f"not a CPU list: {text!r} ({part.strip()} runs backwards)")
        cpus.update(range(low, high + 1))
    return tuple(sorted(cpus))


def parse_cpus_setting(value: str | int) -> str | int | tuple[int, ...]:
    """``[budget] cpus``: "auto", a core count, or a CPU list. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"not a CPU setting: {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"cpus must be at least 1: {value}")
        return value
    text = value.strip()
    if text.lower() == "auto":
        return "auto"
    if text.isdigit():
        return parse_cpus_setting(int(text))
    return parse_cpu_list(text)


def fair_size(users: int, cores: int) -> int:
    """Cores per CPU model when ``users`` of them share ``cores``: at least one."""
    return max(1, cores // max(1, users))


def decide_cores(
    budget: CpuBudget, held: Mapping[str, tuple[int, ...]], newcomer: str
) -> CoreDecision:
    """The cores for ``newcomer``, given the sets ``held`` by the CPU models that stay
    loaded (in load order). Models holding more than the new fair share are re-placed."""
    size = fair_size(len(held) + 1, budget.count)
    replace = tuple(model for model, cpus in held.items() if len(cpus) > size)
    kept = {model: cpus for model, cpus in held.items() if model not in replace}
    share = _pick(budget, kept, size)
    return CoreDecision(share, replace, _reason(budget, share, tuple(held)))


def _pick(budget: CpuBudget, kept: Mapping[str, tuple[int, ...]], size: int) -> CoreShare:
    taken = Counter(cpu for cpus in kept.values() for cpu in cpus)
    free = [cpu for cpu in budget.cpus if not taken[cpu]]
    if len(free) >= size:
        return CoreShare(tuple(free[:size]), size)
    # More CPU models than cores: the least shared core, one thread (no barrier to wait at).
    cpu = min(budget.cpus, key=lambda c: (taken[c], c))
    shared_with = tuple(sorted(model for model, cpus in kept.items() if cpu in cpus))
    return CoreShare((cpu,), 1, shared_with)


def _reason(budget: CpuBudget, share: CoreShare, others: tuple[str, ...]) -> str:
    cores = f"{len(share.cpus)} of {budget.count} {'core' if budget.count == 1 else 'cores'}"
    if share.shared_with:
        return f"{cores}, 1 thread: core {share.cpus[0]} shared with {', '.join(share.shared_with)}"
    if not others:
        return f"{cores}: the only model on the CPU"
    return f"{cores}: the CPU is split with {', '.join(others)}"
