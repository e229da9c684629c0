"""The budget rule: how many bytes mmd may hold per device, and when a device is over alert.

Pure: a memory snapshot (from :class:`mmd.host.memory.MemoryProbe`), the operator's settings
and what mmd's own children hold in; per device views out. Nothing here reads a device.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Literal, Protocol

from mmd.core.cores import parse_cpus_setting
from mmd.core.planner import DeviceBudget
from mmd.core.units import GIB, MIB, parse_size


class DeviceFigures(Protocol):
    """One device's reading as the budget rule needs it (mmd.host.memory.DeviceReading is
    one): a protocol, so that the core does not import the probe that takes it."""

    @property
    def id(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def total(self) -> int: ...
    @property
    def free(self) -> int: ...
    @property
    def used(self) -> int: ...


class Readings(Protocol):
    """A memory snapshot as the budget rule needs it (mmd.host.memory.MemorySnapshot)."""

    @property
    def devices(self) -> Sequence[DeviceFigures]: ...


BudgetMode = Literal["auto", "bytes", "percent"]

_PERCENT_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*%\s*$")


def parse_budget_setting(text: str) -> tuple[BudgetMode, float]:
    """``"auto"`` -> ("auto", 0); ``"90%"`` -> ("percent", 90); ``"20GiB"`` -> ("bytes", n)."""
    cleaned = text.strip()
    if cleaned.lower() == "auto":
        return "auto", 0.0
    if cleaned.startswith("-"):
        raise ValueError(f"memory budget must not be negative: {text!r}")
    if cleaned.endswith("%"):
        match = _PERCENT_RE.match(cleaned)
        if not match:
            raise ValueError(f"not a percentage: {text!r} (use e.g. '90%')")
        percent = float(match.group(1))
        if percent > 100:
            raise ValueError(f"memory budget must be at most 100%: {text!r}")
        return "percent", percent
    try:
        return "bytes", float(parse_size(cleaned))
    except ValueError:
        raise ValueError(
            f"not a memory budget: {text!r} (use 'auto', a percentage such as '90%' "
            "or a size such as '20GiB')"
        ) from None


@dataclass(frozen=True)
class BudgetSettings:
    gpu: str = "auto"
    ram: str = "auto"
    reserve_gpu: int = 512 * MIB  # kept free for the driver and CUDA context growth
    reserve_ram: int = 1 * GIB  # kept free for the OS and everything not managed by mmd
    alert_percent: float = 85.0
    cpus: str | int = "auto"  # the cores children compute on: "auto", a count or a CPU list

    def __post_init__(self) -> None:
        parse_budget_setting(self.gpu)
        parse_budget_setting(self.ram)
        parse_cpus_setting(self.cpus)
        if self.reserve_gpu < 0 or self.reserve_ram < 0:
            raise ValueError("memory reserves must not be negative")
        if not 0 < self.alert_percent <= 100:
            raise ValueError(f"alert_percent must be in (0, 100]: {self.alert_percent}")

    def for_kind(self, kind: str) -> tuple[str, int]:
        """(budget setting, reserve) for a device kind; unified memory counts as RAM."""
        if kind == "gpu":
            return self.gpu, self.reserve_gpu
        return self.ram, self.reserve_ram


@dataclass(frozen=True)
class DeviceBudgetView:
    id: str
    kind: str
    name: str
    total: int
    budget: int
    mmd_bytes: int
    other_bytes: int
    free: int

    @property
    def used_percent(self) -> float:
        """The share of the device's total in use (by mmd and others): alerts compare it."""
        return 100.0 * (self.total - self.free) / self.total if self.total else 0.0

    def to_planner(self) -> DeviceBudget:
        """The planner's view of this device: its id, kind and what mmd may use."""
        return DeviceBudget(self.id, "gpu" if self.kind == "gpu" else "ram", self.budget)


def configured_cap(total: int, setting: str, reserve: int) -> int:
    """The operator's cap on a device of ``total`` bytes, before live use is considered."""
    mode, value = parse_budget_setting(setting)
    if mode == "auto":
        return max(0, total - reserve)
    if mode == "percent":
        return int(total * value / 100)
    return int(value)


def compute_budgets(
    snapshot: Readings, settings: BudgetSettings, mmd_usage: Mapping[str, int]
) -> list[DeviceBudgetView]:
    """Per device: min(configured cap, free + mmd's own holdings - reserve), floored at 0.

    What mmd's children already hold counts as available to mmd (it can evict
    them); memory held by anything else does not.
    """
    views = []
    for device in snapshot.devices:
        setting, reserve = settings.for_kind(device.kind)
        mmd_bytes = max(0, mmd_usage.get(device.id, 0))
        live = max(0, device.free + mmd_bytes - reserve)
        budget = min(configured_cap(device.total, setting, reserve), live)
        views.append(
            DeviceBudgetView(
                id=device.id,
                kind=device.kind,
                name=device.name,
                total=device.total,
                budget=budget,
                mmd_bytes=mmd_bytes,
                other_bytes=max(0, device.used - mmd_bytes),
                free=device.free,
            )
        )
    return views


# ---------------------------------------------------------------------------
# Alerts


def over_alert(view: DeviceBudgetView, alert_percent: float) -> bool:
    """The alert rule: the device's total use (mmd's and everyone else's) has reached
    ``alert_percent`` of its total."""
    return view.used_percent >= alert_percent


@dataclass(frozen=True)
class AlertCrossing:
    device: str
    used_percent: float
    threshold_percent: float
    above: bool  # True: it went over the threshold; False: it came back below


def alert_crossings(
    views: Iterable[DeviceBudgetView], alert_percent: float, above: Set[str]
) -> list[AlertCrossing]:
    """The devices whose side of the threshold differs from ``above`` (the ids that were
    over it at the last look), in the order of ``views``."""
    return [
        AlertCrossing(view.id, view.used_percent, alert_percent, over)
        for view in views
        if (over := over_alert(view, alert_percent)) != (view.id in above)
    ]
