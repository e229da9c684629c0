"""Memory probes on this machine's real RAM, and the budget rule as a pure function."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from mmd.core.budget import BudgetSettings, compute_budgets
from mmd.core.units import GIB
from mmd.host.memory import (
    APPLE_UNIFIED_NOTE,
    MemoryProbe,
    MemorySnapshot,
    ProcessMemory,
    visible_gpus,
)


def _nvml_works() -> bool:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- readings ---------------------------------------------------------------


def test_ram_reading_matches_psutil() -> None:
    with MemoryProbe(use_nvml=False) as probe:
        ram = probe.read().device("ram")
    vm = psutil.virtual_memory()
    assert ram is not None
    assert (ram.kind, ram.name) == ("ram", "System RAM")
    assert ram.total == vm.total
    # Other processes on the machine move "available" between the two calls.
    assert abs(ram.free - vm.available) < 0.1 * vm.total
    assert ram.used == ram.total - ram.free
    assert 0 < ram.free <= ram.total
    assert dict(ram.process_bytes) == {}


@pytest.mark.skipif(_nvml_works(), reason="NVML works here; the no-NVML path is not taken")
def test_without_nvml_budgets_ram_only_with_one_note_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    caplog.set_level(logging.DEBUG, logger="mmd.memory")
    with MemoryProbe(max_age=1.0, clock=clock) as probe:
        snapshots = []
        for _ in range(3):
            snapshots.append(probe.read())
            clock.now += 2.0  # past max_age: each read is a fresh one
        usage = probe.process_usage(psutil.Process().pid)
    assert len({id(s) for s in snapshots}) == 3
    for snapshot in snapshots:
        assert [d.id for d in snapshot.devices] == ["ram"]
        assert len(snapshot.notes) == 1
        assert snapshot.notes[0].startswith("NVML unavailable (")
        assert snapshot.notes[0].endswith("budgeting system RAM only")
    logged = [r.getMessage() for r in caplog.records if r.name == "mmd.memory"]
    assert logged == [snapshots[0].notes[0]]
    assert set(usage) == {"ram"}


def test_nvml_disabled_says_so_once() -> None:
    with MemoryProbe(use_nvml=False) as probe:
        snapshot = probe.read()
    assert snapshot.notes == ("NVML disabled: budgeting system RAM only",)
    assert [d.kind for d in snapshot.devices] == ["ram"]


def test_apple_reports_one_unified_device_from_psutil() -> None:
    with MemoryProbe(system="Darwin") as probe:
        snapshot = probe.read()
    assert snapshot.notes == (APPLE_UNIFIED_NOTE,)
    (device,) = snapshot.devices
    assert (device.id, device.kind, device.name) == ("ram", "unified", "Unified memory (Apple)")
    assert device.total == psutil.virtual_memory().total
    # Unified memory takes the RAM settings, not the GPU ones.
    settings = BudgetSettings(gpu="1%", ram="auto", reserve_ram=GIB)
    (view,) = compute_budgets(MemorySnapshot((device,), 0.0), settings, {"ram": 0})
    assert view.budget == max(0, device.free - GIB)


def test_reads_within_max_age_share_one_snapshot() -> None:
    clock = FakeClock()
    with MemoryProbe(use_nvml=False, max_age=0.25, clock=clock) as probe:
        first = probe.read()
        clock.now += 0.1
        assert probe.read() is first
        clock.now += 0.2
        second = probe.read()
    assert second is not first
    assert second.taken_at == clock.now


def test_max_age_zero_reads_every_time() -> None:
    with MemoryProbe(use_nvml=False, max_age=0.0) as probe:
        assert probe.read() is not probe.read()


async def test_concurrent_async_reads_share_one_in_flight_read() -> None:
    with MemoryProbe(use_nvml=False, max_age=0.0) as probe:
        results = await asyncio.gather(*(probe.read_async() for _ in range(8)))
        later = await probe.read_async()
    assert all(r is results[0] for r in results)
    assert later is not results[0]


async def test_cancelling_one_async_reader_leaves_the_others_their_result() -> None:
    with MemoryProbe(use_nvml=False, max_age=0.0) as probe:
        cancelled = asyncio.create_task(probe.read_async())
        survivor = asyncio.create_task(probe.read_async())
        await asyncio.sleep(0)  # both are now awaiting the same in-flight read
        cancelled.cancel()
        snapshot = await asyncio.wait_for(survivor, timeout=30)
    assert cancelled.cancelled()
    assert snapshot.device("ram") is not None


async def test_async_read_returns_the_cached_snapshot() -> None:
    with MemoryProbe(use_nvml=False, max_age=3600) as probe:
        first = probe.read()
        assert await probe.read_async() is first


def test_read_after_close_still_budgets_ram() -> None:
    probe = MemoryProbe()
    probe.read()
    probe.close()
    probe.close()  # idempotent
    snapshot = probe.read()
    assert [d.id for d in snapshot.devices] == ["ram"]
    assert len(snapshot.notes) == 1


# --- per-process usage --------------------------------------------------------


def test_process_usage_of_this_process() -> None:
    with MemoryProbe(use_nvml=False) as probe:
        usage = probe.process_usage(psutil.Process().pid)
    assert set(usage) == {"ram"}
    assert 0 < usage["ram"] <= psutil.virtual_memory().total


@pytest.fixture
def shell_with_two_sleeps() -> Iterator[psutil.Process]:
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    try:
        shell = psutil.Process(proc.pid)
        deadline = time.monotonic() + 30
        while len(shell.children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        yield shell
    finally:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait()


def test_process_usage_of_a_child_and_its_descendants(
    shell_with_two_sleeps: psutil.Process,
) -> None:
    sleeps = shell_with_two_sleeps.children()
    assert len(sleeps) == 2
    with MemoryProbe(use_nvml=False) as probe:
        tree = probe.process_usage(shell_with_two_sleeps.pid)
        per_sleep = [probe.process_usage(s.pid)["ram"] for s in sleeps]
    assert all(ram > 0 for ram in per_sleep)
    # The shell itself holds memory too, so its tree holds more than its children.
    assert tree["ram"] > sum(per_sleep)


def test_process_usage_of_an_exited_process_is_empty() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with MemoryProbe(use_nvml=False) as probe:
        assert probe.process_usage(proc.pid) == {}
        assert probe.measure_process(proc.pid) == ProcessMemory({}, 0)


def test_a_process_tree_is_measured_with_its_resident_set(
    shell_with_two_sleeps: psutil.Process,
) -> None:
    """RSS counts the pages the three processes share (the C library) in each of them;
    PSS splits them, so the tree's RSS is the larger and does not depend on the sharing."""
    with MemoryProbe(use_nvml=False) as probe:
        reading = probe.measure_process(shell_with_two_sleeps.pid)
    rss = sum(
        p.memory_info().rss for p in [shell_with_two_sleeps, *shell_with_two_sleeps.children()]
    )
    assert reading.usage["ram"] < reading.ram_rss
    assert reading.ram_rss == pytest.approx(rss, rel=0.2)


UUIDS = ["GPU-aaaa1111", "GPU-bbbb2222", "GPU-abcd3333"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, [0, 1, 2]),  # unset: every GPU
        ("", []),  # set and empty: none
        ("-1", []),
        ("1", [1]),
        ("2,0", [2, 0]),  # CUDA's order, not NVML's
        ("0,7,1", [0]),  # the list ends at the first entry that names no GPU
        ("GPU-bbbb", [1]),  # a unique UUID prefix
        ("GPU-a", []),  # ambiguous: names no single GPU
        ("1, GPU-abcd3333", [1, 2]),
        ("1,1", [1]),
    ],
)
def test_cuda_visible_devices_is_read_as_cuda_does(value: str | None, expected: list[int]) -> None:
    assert visible_gpus(value, UUIDS) == expected


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
def test_descendants_from_proc_are_psutils_including_grandchildren() -> None:
    from mmd.host.memory import _descendant_pids

    proc = subprocess.Popen(["sh", "-c", "sh -c 'sleep 60 & wait' & sleep 60 & wait"])
    try:
        shell = psutil.Process(proc.pid)
        deadline = time.monotonic() + 30
        while len(shell.children(recursive=True)) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        expected = {child.pid for child in shell.children(recursive=True)}
        assert len(expected) == 3  # the inner shell, its sleep and the outer sleep
        assert set(_descendant_pids(proc.pid)) == expected
    finally:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait()
