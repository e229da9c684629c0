"""Live memory readings: NVML for NVIDIA GPUs, psutil for RAM.

A :class:`MemoryProbe` reads every device mmd may place models on. Without NVML
(no NVIDIA driver, no GPU) it budgets system RAM only and says so once in the
snapshot's notes. On macOS GPU and CPU share one pool, reported as a single
"unified" device under the id ``"ram"`` so that RAM settings and RAM usage apply.

What mmd may hold of each device is worked out from these readings in :mod:`mmd.core.budget`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, Literal, Protocol

import psutil

log = logging.getLogger("mmd.memory")  # the name in the log, kept when the module moved

RAM_ID = "ram"
RAM_NOTE_SUFFIX = "budgeting system RAM only"
APPLE_UNIFIED_NOTE = "Apple unified memory: GPU memory is budgeted as system RAM"

DeviceKind = Literal["ram", "gpu", "unified"]


def _no_processes() -> Mapping[int, int]:
    return MappingProxyType({})


def gpu_id(index: int) -> str:
    """Device id of the GPU at NVML index ``index``."""
    return f"gpu{index}"


@dataclass(frozen=True)
class DeviceReading:
    id: str
    kind: DeviceKind
    name: str
    total: int
    free: int
    used: int
    # pid -> bytes on this device; left out of the hash since mappings are unhashable
    process_bytes: Mapping[int, int] = field(default_factory=_no_processes, hash=False)


@dataclass(frozen=True)
class ProcessMemory:
    """What a process tree holds: per device as mmd accounts it, and its resident set."""

    usage: dict[str, int]  # device id -> bytes ({} once it has exited)
    ram_rss: int  # RSS: shared pages counted in full, whatever else maps them


@dataclass(frozen=True)
class MemorySnapshot:
    devices: tuple[DeviceReading, ...]
    taken_at: float
    notes: tuple[str, ...] = ()

    def device(self, device_id: str) -> DeviceReading | None:
        return next((d for d in self.devices if d.id == device_id), None)


def read_ram(kind: Literal["ram", "unified"] = "ram") -> DeviceReading:
    """System RAM from psutil; ``available`` (not ``free``) counts reclaimable cache."""
    vm = psutil.virtual_memory()
    name = "Unified memory (Apple)" if kind == "unified" else "System RAM"
    free = min(int(vm.available), int(vm.total))
    return DeviceReading(RAM_ID, kind, name, int(vm.total), free, int(vm.total) - free)


VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"


def visible_gpus(value: str | None, uuids: Sequence[str]) -> list[int]:
    """The NVML indices that ``CUDA_VISIBLE_DEVICES`` leaves visible, in its order.

    CUDA's rules: unset shows every GPU; each entry is an index or a (prefix of a) UUID;
    the list ends at the first entry that names no GPU, so "" and "-1" hide them all.
    mmd's children inherit the variable, so a GPU hidden from them is hidden from mmd's
    budget too.
    """
    if value is None:
        return list(range(len(uuids)))
    chosen: list[int] = []
    for entry in (part.strip() for part in value.split(",")):
        if entry.isdigit() and int(entry) < len(uuids):
            index = int(entry)
        else:
            matches = [i for i, uuid in enumerate(uuids) if entry and uuid.startswith(entry)]
            if len(matches) != 1:
                break
            index = matches[0]
        if index in chosen:
            break
        chosen.append(index)
    return chosen


class _Nvml:
    """The NVML session: initialised once, then read under the probe's lock."""

    def __init__(self) -> None:
        import pynvml  # imported lazily: importing is cheap, but keep failures local

        self._nvml: Any = pynvml
        pynvml.nvmlInit()
        try:
            count = int(pynvml.nvmlDeviceGetCount())
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            uuids = [_as_text(pynvml.nvmlDeviceGetUUID(h)) for h in handles]
            # NVML numbers GPUs by PCI bus id; children use CUDA_DEVICE_ORDER=PCI_BUS_ID.
            self.indices = visible_gpus(os.environ.get(VISIBLE_ENV), uuids)
            self.count = len(self.indices)
            self._handles = {i: handles[i] for i in self.indices}
            self._names = {i: _as_text(pynvml.nvmlDeviceGetName(handles[i])) for i in self.indices}
        except BaseException:
            pynvml.nvmlShutdown()
            raise

    def read(self, index: int) -> DeviceReading:
        """The GPU at NVML index ``index`` (one of ``self.indices``)."""
        nvml = self._nvml
        handle = self._handles[index]
        try:
            # v2 counts driver-reserved memory as not free, as nvidia-smi does.
            info = nvml.nvmlDeviceGetMemoryInfo(handle, nvml.nvmlMemory_v2)
        except nvml.NVMLError:
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
        total, free = int(info.total), int(info.free)
        return DeviceReading(
            gpu_id(index),
            "gpu",
            self._names[index],
            total,
            free,
            total - free,
            MappingProxyType(self._process_bytes(handle)),
        )

    def _process_bytes(self, handle: Any) -> dict[int, int]:
        nvml = self._nvml
        usage: dict[int, int] = {}
        for list_processes in (
            nvml.nvmlDeviceGetComputeRunningProcesses,
            nvml.nvmlDeviceGetGraphicsRunningProcesses,
        ):
            try:
                processes = list_processes(handle)
            except nvml.NVMLError:
                continue
            for proc in processes:
                if proc.usedGpuMemory is None:  # not reported (e.g. some drivers)
                    continue
                # A process in both lists reports the same allocation twice: keep one.
                usage[int(proc.pid)] = max(usage.get(int(proc.pid), 0), int(proc.usedGpuMemory))
        return usage

    def shutdown(self) -> None:
        self._nvml.nvmlShutdown()


def _as_text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class MemoryReader(Protocol):
    """What the daemon needs of a probe (MemoryProbe is the real one)."""

    async def read_async(self, *, fresh: bool = False) -> MemorySnapshot:
        """The devices, no older than the probe's cache age (``fresh``: read now)."""
        ...

    def measure_process(self, pid: int) -> ProcessMemory:
        """What the process tree of ``pid`` holds (blocking)."""
        ...


class MemoryProbe:
    """Reads devices; NVML initialised once; readings cached for ``max_age`` seconds.

    ``system`` overrides ``platform.system()`` (to exercise the macOS branch
    elsewhere); ``clock`` overrides ``time.monotonic`` for the cache.
    """

    def __init__(
        self,
        *,
        use_nvml: bool = True,
        max_age: float = 0.25,
        system: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._use_nvml = use_nvml
        self._max_age = max_age
        self._apple = (system if system is not None else platform.system()) == "Darwin"
        self._clock = clock
        self._lock = threading.Lock()  # one NVML caller at a time; guards the cache
        self._nvml: _Nvml | None = None
        self._nvml_tried = False
        self._setup_notes: tuple[str, ...] = ()
        self._logged: set[str] = set()
        self._cached: MemorySnapshot | None = None
        self._inflight: asyncio.Task[MemorySnapshot] | None = None

    def read(self, *, fresh: bool = False) -> MemorySnapshot:
        """A snapshot no older than ``max_age`` (blocking: NVML calls may take milliseconds).

        ``fresh`` takes a new reading whatever the cache holds (after a stop, say).
        """
        with self._lock:
            cached = None if fresh else self._fresh()
            if cached is not None:
                return cached
            snapshot = self._take_snapshot()
            self._cached = snapshot
            return snapshot

    async def read_async(self, *, fresh: bool = False) -> MemorySnapshot:
        """:meth:`read` in a worker thread; concurrent callers share one in-flight read.

        Without GPUs a reading is one read of /proc/meminfo (microseconds, less than
        the hop to a thread): a fresh one is then taken at once, on the caller's thread.
        """
        if fresh:
            if self._nvml_tried and self._nvml is None:
                return self.read(fresh=True)
            return await asyncio.to_thread(self.read, fresh=True)
        cached = self._fresh()
        if cached is not None:
            return cached
        loop = asyncio.get_running_loop()
        task = self._inflight
        if task is None or task.done() or task.get_loop() is not loop:
            task = loop.create_task(asyncio.to_thread(self.read))
            self._inflight = task
        # Shielded: one caller being cancelled must not cancel the others' read.
        return await asyncio.shield(task)

    def process_usage(self, pid: int) -> dict[str, int]:
        """Device id -> bytes held by ``pid`` and its descendants ({} once it has exited).

        RAM is PSS where the kernel reports it (shared pages split fairly between
        processes), else RSS; each GPU is NVML's per-process used memory.
        """
        return self.measure_process(pid).usage

    def measure_process(self, pid: int) -> ProcessMemory:
        """:meth:`process_usage` and the resident set of the same processes."""
        try:
            tree = _process_tree(pid)
        except psutil.NoSuchProcess:
            return ProcessMemory({}, 0)
        readings = [_process_ram(proc) for proc in tree]
        pids = {proc.pid for proc in tree}
        usage = {RAM_ID: sum(ram for ram, _ in readings)}
        for device in self.read().devices:
            if device.kind == "gpu":
                usage[device.id] = sum(device.process_bytes.get(p, 0) for p in pids)
        return ProcessMemory(usage, sum(rss for _, rss in readings))

    def close(self) -> None:
        """Shut NVML down; later reads budget RAM only."""
        with self._lock:
            self._cached = None
            nvml, self._nvml = self._nvml, None
            if nvml is not None or not self._nvml_tried:
                self._setup_notes = (f"NVML closed: {RAM_NOTE_SUFFIX}",)
            self._nvml_tried = True
            if nvml is not None:
                try:
                    nvml.shutdown()
                except Exception as exc:  # shutting down must not fail the daemon's exit
                    log.debug("nvmlShutdown failed: %s", exc)

    def __enter__(self) -> MemoryProbe:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _fresh(self) -> MemorySnapshot | None:
        cached = self._cached
        if cached is not None and self._clock() - cached.taken_at < self._max_age:
            return cached
        return None

    def _take_snapshot(self) -> MemorySnapshot:
        if self._apple:
            return MemorySnapshot((read_ram("unified"),), self._clock(), (APPLE_UNIFIED_NOTE,))
        nvml = self._nvml_session()
        devices = [read_ram()]
        notes = list(self._setup_notes)
        if nvml is not None:
            for index in nvml.indices:
                try:
                    devices.append(nvml.read(index))
                except Exception as exc:  # a lost GPU must not take the RAM budget down
                    notes.append(self._note_once(f"{gpu_id(index)} unreadable ({exc}): skipped"))
        return MemorySnapshot(tuple(devices), self._clock(), tuple(notes))

    def _nvml_session(self) -> _Nvml | None:
        if self._nvml_tried:
            return self._nvml
        self._nvml_tried = True
        if not self._use_nvml:
            reason = "NVML disabled"
        else:
            try:
                session = _Nvml()
            except Exception as exc:  # no driver, no library, no permission: all mean RAM only
                reason = f"NVML unavailable ({exc})"
            else:
                if session.count > 0:
                    self._nvml = session
                    return session
                session.shutdown()
                hidden = os.environ.get(VISIBLE_ENV)
                reason = "NVML found no GPU"
                if hidden is not None:
                    reason = f"no GPU visible ({VISIBLE_ENV}={hidden!r})"
        self._setup_notes = (self._note_once(f"{reason}: {RAM_NOTE_SUFFIX}"),)
        return None

    def _note_once(self, note: str) -> str:
        """Log each distinct note once; snapshots keep carrying it."""
        if note not in self._logged:
            self._logged.add(note)
            log.info("%s", note)
        return note


# Linux lists each thread's children in /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN):
# a few small reads for one llama-server. psutil finds children by reading the parent of
# every process on the machine instead (~2 ms for 100 processes, more on a busy server),
# and the sampler does it for every child every second.
_PROC_CHILDREN = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def _process_tree(pid: int) -> list[psutil.Process]:
    """``pid`` and its descendants (raises psutil.NoSuchProcess when ``pid`` is gone)."""
    root = psutil.Process(pid)
    if not _PROC_CHILDREN:
        return [root, *root.children(recursive=True)]
    tree = [root]
    for child in _descendant_pids(pid):
        try:
            tree.append(psutil.Process(child))
        except psutil.NoSuchProcess:
            continue  # exited since it was listed: it holds nothing
    return tree


def _descendant_pids(pid: int) -> list[int]:
    """The descendants' PIDs from /proc. A child started or ended during the reading may
    be missed (the kernel's list is not frozen): a moment's child holds no memory worth it."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue  # gone
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as listing:
                    children = [int(word) for word in listing.read().split()]
            except OSError:
                continue  # the thread ended
            found += children
            pending += children
    return found


def _process_ram(proc: psutil.Process) -> tuple[int, int]:
    """(PSS, else RSS; RSS) of one process: one read of smaps where PSS is available."""
    try:
        with proc.oneshot():
            try:
                full = proc.memory_full_info()
            except psutil.AccessDenied:
                rss = int(proc.memory_info().rss)
                return rss, rss
            pss = getattr(full, "pss", None)
            return (int(pss) if pss is not None else int(full.rss)), int(full.rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0, 0  # exited (or hidden) between listing and reading: it holds nothing of ours
