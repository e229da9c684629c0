"""The budget rule and the alert rule (mmd.core.budget): pure, no device read."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmd.core.budget import (
    BudgetSettings,
    DeviceBudgetView,
    alert_crossings,
    compute_budgets,
    over_alert,
    parse_budget_setting,
)
from mmd.core.units import GIB, MIB
from mmd.host.memory import DeviceReading, MemorySnapshot

# --- budget settings ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("auto", ("auto", 0.0)),
        (" AUTO ", ("auto", 0.0)),
        ("90%", ("percent", 90.0)),
        ("12.5 %", ("percent", 12.5)),
        ("0%", ("percent", 0.0)),
        ("100%", ("percent", 100.0)),
        ("20GiB", ("bytes", float(20 * GIB))),
        ("512MB", ("bytes", 512e6)),
        ("0", ("bytes", 0.0)),
    ],
)
def test_parse_budget_setting(text: str, expected: tuple[str, float]) -> None:
    assert parse_budget_setting(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-5GiB", "negative"),
        ("-10%", "negative"),
        ("101%", "at most 100%"),
        ("abc%", "not a percentage"),
        ("%", "not a percentage"),
        ("lots", "not a memory budget"),
        ("", "not a memory budget"),
        ("20 GiBs", "not a memory budget"),
    ],
)
def test_parse_budget_setting_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_budget_setting(text)


@pytest.mark.parametrize(
    "kwargs",
    [{"gpu": "150%"}, {"ram": "huge"}, {"reserve_gpu": -1}, {"alert_percent": 0.0}],
)
def test_budget_settings_are_validated_up_front(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        BudgetSettings(**kwargs)  # type: ignore[arg-type]


# --- compute_budgets ---------------------------------------------------------------

GPU_TOTAL = 24 * GIB
RAM_TOTAL = 64 * GIB


def _gpu(free: int, *, index: int = 0, total: int = GPU_TOTAL) -> DeviceReading:
    return DeviceReading(f"gpu{index}", "gpu", "Test GPU", total, free, total - free)


def _ram(free: int, total: int = RAM_TOTAL) -> DeviceReading:
    return DeviceReading("ram", "ram", "System RAM", total, free, total - free)


@pytest.mark.parametrize(
    ("setting", "free", "mmd_bytes", "expected"),
    [
        # auto: total minus the reserve when the card is empty
        ("auto", GPU_TOTAL, 0, GPU_TOTAL - 512 * MIB),
        # another process holds 8 GiB: that is not mmd's to take
        ("auto", GPU_TOTAL - 8 * GIB, 0, GPU_TOTAL - 8 * GIB - 512 * MIB),
        # mmd's own 6 GiB count as available (mmd can evict them); others hold 2 GiB
        ("auto", GPU_TOTAL - 8 * GIB, 6 * GIB, GPU_TOTAL - 2 * GIB - 512 * MIB),
        # percent of total, within what is live
        ("50%", GPU_TOTAL, 0, 12 * GIB),
        ("90%", 10 * GIB, 0, 10 * GIB - 512 * MIB),
        ("0%", GPU_TOTAL, 0, 0),
        # an absolute cap is the operator's choice: no reserve taken off it...
        ("20GiB", GPU_TOTAL, 0, 20 * GIB),
        # ...but still clamped by the live figure
        ("20GiB", 10 * GIB, 4 * GIB, 14 * GIB - 512 * MIB),
        ("100GiB", GPU_TOTAL, 0, GPU_TOTAL - 512 * MIB),
        ("0", GPU_TOTAL, 0, 0),
        # floors at zero when less than the reserve is free
        ("auto", 256 * MIB, 0, 0),
        ("20GiB", 0, 0, 0),
    ],
)
def test_gpu_budget(setting: str, free: int, mmd_bytes: int, expected: int) -> None:
    snapshot = MemorySnapshot((_gpu(free),), 0.0)
    settings = BudgetSettings(gpu=setting, ram="1GiB")
    (view,) = compute_budgets(snapshot, settings, {"gpu0": mmd_bytes})
    assert view.budget == expected
    assert view.mmd_bytes == mmd_bytes
    assert view.other_bytes == GPU_TOTAL - free - mmd_bytes
    assert (view.free, view.total) == (free, GPU_TOTAL)


def test_each_device_takes_its_own_kind_of_setting_and_usage() -> None:
    snapshot = MemorySnapshot(
        (_ram(40 * GIB), _gpu(20 * GIB, index=0), _gpu(24 * GIB, index=1)), 0.0
    )
    settings = BudgetSettings(gpu="75%", ram="auto", reserve_gpu=GIB, reserve_ram=2 * GIB)
    views = compute_budgets(snapshot, settings, {"ram": 4 * GIB, "gpu0": 2 * GIB})
    assert [(v.id, v.kind) for v in views] == [("ram", "ram"), ("gpu0", "gpu"), ("gpu1", "gpu")]
    ram, gpu0, gpu1 = views
    assert ram.budget == 42 * GIB  # live 40 + 4 - 2 is below total 64 - 2
    assert ram.other_bytes == 20 * GIB
    assert gpu0.budget == 18 * GIB  # 75% of 24 = 18 < live 20 + 2 - 1
    assert gpu1.budget == 18 * GIB
    assert (gpu1.mmd_bytes, gpu1.other_bytes) == (0, 0)


def test_reserve_is_configurable() -> None:
    snapshot = MemorySnapshot((_gpu(GPU_TOTAL),), 0.0)
    (view,) = compute_budgets(snapshot, BudgetSettings(reserve_gpu=0), {})
    assert view.budget == GPU_TOTAL


def test_alert_rule_compares_the_share_of_the_total_in_use() -> None:
    snapshot = MemorySnapshot((_ram(8 * GIB), _gpu(2 * GIB)), 0.0)
    ram, gpu = compute_budgets(snapshot, BudgetSettings(), {})
    assert ram.used_percent == 87.5
    assert (over_alert(ram, 90.0), over_alert(gpu, 90.0)) == (False, True)
    assert (over_alert(ram, 87.5), over_alert(ram, 85.0)) == (True, True)
    empty = DeviceBudgetView("gpu1", "gpu", "gone", 0, 0, 0, 0, 0)
    assert not over_alert(empty, 1.0)  # no total: nothing in use


def test_alert_crossings_report_each_side_change_once() -> None:
    snapshot = MemorySnapshot((_ram(8 * GIB), _gpu(2 * GIB)), 0.0)
    views = compute_budgets(snapshot, BudgetSettings(), {})
    crossed = alert_crossings(views, 85.0, set())
    assert [(c.device, c.above, c.threshold_percent) for c in crossed] == [
        ("ram", True, 85.0),
        ("gpu0", True, 85.0),
    ]
    assert crossed[1].used_percent == pytest.approx(100 * 22 / 24)
    assert alert_crossings(views, 85.0, {"ram", "gpu0"}) == []
    back = alert_crossings(views, 90.0, {"ram", "gpu0"})
    assert [(c.device, c.above) for c in back] == [("ram", False)]


sizes = st.integers(min_value=0, max_value=256 * GIB)


@given(
    total=st.integers(min_value=1, max_value=256 * GIB),
    free_fraction=st.floats(min_value=0, max_value=1),
    mmd_fraction=st.floats(min_value=0, max_value=1),
    reserve=sizes,
    setting=st.one_of(
        st.just("auto"),
        st.integers(min_value=0, max_value=100).map(lambda p: f"{p}%"),
        sizes.map(str),
    ),
)
def test_budget_never_exceeds_live_memory_or_the_cap(
    total: int,
    free_fraction: float,
    mmd_fraction: float,
    reserve: int,
    setting: str,
) -> None:
    free = int(total * free_fraction)
    mmd_bytes = int((total - free) * mmd_fraction)
    snapshot = MemorySnapshot((_gpu(free, total=total),), 0.0)
    settings = BudgetSettings(gpu=setting, reserve_gpu=reserve)
    (view,) = compute_budgets(snapshot, settings, {"gpu0": mmd_bytes})
    assert 0 <= view.budget <= max(0, free + mmd_bytes - reserve)
    if setting == "auto":
        assert view.budget <= total - reserve or view.budget == 0
    assert view.other_bytes + view.mmd_bytes == total - free
