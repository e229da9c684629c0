"""The daemon's view of memory: the devices' readings, what each child holds, the budgets
the scheduler plans with, the alerts, and what each model was measured to need.

The engine owns one :class:`MemoryMonitor`; it reads through a probe
(:class:`mmd.host.memory.MemoryProbe`), works the budgets out with :mod:`mmd.core.budget`, and
gives the scheduler both the budgets and each ready child's measurement. Runs on the
event-loop thread, as the engine does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

from mmd.config.settings import Config
from mmd.core.budget import DeviceBudgetView, alert_crossings, compute_budgets
from mmd.core.footprint import LearnedBytes
from mmd.core.model_state import State
from mmd.core.planner import Placement
from mmd.core.scheduler import Scheduler
from mmd.core.spec import ModelSpec
from mmd.engine.children import Child
from mmd.engine.events import AlertCrossed, EventBus, MemorySampled
from mmd.host.learned import LearnedStore, ModelIdentity, model_identity
from mmd.host.memory import RAM_ID, MemoryReader, MemorySnapshot, ProcessMemory
from mmd.runtime.check import LlamaRuntime

log = logging.getLogger("mmd.engine")

SAMPLE_INTERVAL_S = 1.0

# How long to wait for freed memory to show as free after an eviction.
_SETTLE_TIMEOUT_S = 5.0
_SETTLE_POLL_S = 0.01


class MemoryMonitor:
    """Readings, budgets, alerts and learned footprints, for one engine.

    ``children`` is the engine's live map of running children (model id -> child);
    ``config`` returns the config in force (a reload replaces it); ``spawn`` runs a
    background coroutine that the engine waits for at its close.
    """

    def __init__(
        self,
        probe: MemoryReader,
        core: Scheduler,
        events: EventBus,
        runtime: LlamaRuntime,
        children: Mapping[str, Child],
        *,
        config: Callable[[], Config],
        clock: Callable[[], float],
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
    ) -> None:
        self.probe = probe
        self.core = core
        self.events = events
        self.runtime = runtime
        self.children = children
        self._config = config
        self._clock = clock
        self._spawn = spawn
        self.snapshot: MemorySnapshot | None = None
        self.budgets: list[DeviceBudgetView] = []
        self._children_usage: dict[str, dict[str, int]] = {}  # model -> device -> bytes
        self._above_alert: set[str] = set()
        self._sampler: asyncio.Task[None] | None = None
        self.learned = LearnedStore(config().daemon.state_dir)
        # model -> (identity, offloaded layers) of its running child, for what it measures
        self._learning: dict[str, tuple[ModelIdentity, int]] = {}
        self.learned_runtime: Path | None = None  # the binary the learned figures are for

    # --- readings and budgets ---------------------------------------------------------

    async def refresh(self, *, measure_children: bool = True) -> None:
        """Read the devices and the children's use; update the scheduler's budgets.

        Measuring every child (PSS) takes milliseconds: a request that needs a load
        reuses the sampler's last measurement (a child started since then is not in it,
        which only makes the budget smaller).
        """
        snapshot = await self.probe.read_async()
        measured: dict[str, ProcessMemory] = {}
        if measure_children:
            pids = {m: child.pid for m, child in self.children.items() if child.pid}
            measured = await asyncio.to_thread(
                lambda: {m: self.probe.measure_process(pid) for m, pid in pids.items()}
            )
            self._children_usage = {m: reading.usage for m, reading in measured.items()}
        usages = {m: u for m, u in self._children_usage.items() if m in self.children}
        mmd_usage: dict[str, int] = {}
        for model_id, usage in usages.items():
            if self.children.get(model_id) and model_id in self.core.models:
                entry = self.core.models[model_id]
                if entry.state == State.READY:
                    self.core.set_measured(model_id, usage)
                    if model_id in measured:
                        self._learn(model_id, measured[model_id])
            for device, used in usage.items():
                mmd_usage[device] = mmd_usage.get(device, 0) + used
        config = self._config()
        self.snapshot = snapshot
        self.budgets = compute_budgets(snapshot, config.budget, mmd_usage)
        headroom = config.scheduler.min_headroom
        low = frozenset(d.id for d in snapshot.devices if d.free < headroom)
        self.core.update_devices([v.to_planner() for v in self.budgets], low)

    async def wait_settled(self, placement: Placement) -> None:
        """Drivers report frees late: wait (bounded) until the planned bytes show as free."""
        deadline = self._clock() + _SETTLE_TIMEOUT_S
        while self._clock() < deadline:
            snapshot = await self.probe.read_async(fresh=True)
            free = {d.id: d.free for d in snapshot.devices}
            if all(free.get(dev, 0) >= need for dev, need in placement.usage.items()):
                return
            await asyncio.sleep(_SETTLE_POLL_S)
        log.warning("freed memory did not show as free within %.0fs", _SETTLE_TIMEOUT_S)

    # --- sampling and publishing ----------------------------------------------------------

    def start(self, after_refresh: Callable[[], None]) -> None:
        """Sample every second: refresh, ``after_refresh()`` (the engine lets the scheduler
        act on the new budgets), then publish the sample and any alert crossing."""
        self._sampler = asyncio.get_running_loop().create_task(self._sample_forever(after_refresh))

    def stop(self) -> None:
        if self._sampler:
            self._sampler.cancel()

    async def _sample_forever(self, after_refresh: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL_S)
            try:
                await self.refresh()
            except Exception:  # a failed reading must not stop sampling
                log.exception("memory sampling failed")
                continue
            after_refresh()
            self.publish()

    def publish(self) -> None:
        """Publish the last sample, and each device that crossed the alert threshold."""
        views = tuple(self.budgets)
        self.events.publish(MemorySampled(views, self.core.active_total, self.core.queued_total))
        threshold = self._config().budget.alert_percent
        for crossing in alert_crossings(views, threshold, self._above_alert):
            device, used = crossing.device, crossing.used_percent
            if crossing.above:
                self._above_alert.add(device)
                log.warning("%s memory at %.0f%% (alert at %.0f%%)", device, used, threshold)
            else:
                self._above_alert.discard(device)
                log.info("%s memory back below %.0f%%", device, threshold)
            self.events.publish(AlertCrossed(device, used, threshold, crossing.above))

    # --- learned footprints -----------------------------------------------------------

    def track(self, model_id: str, spec: ModelSpec, binary: Path, gpu_layers: int) -> None:
        """A child of ``spec``'s model starts: what it measures once ready is learned."""
        identity = model_identity(spec, binary)
        if identity is not None:
            self._learning[model_id] = (identity, gpu_layers)

    def forget(self, model_id: str) -> None:
        """The model's child is gone (or never came): nothing more to learn from it."""
        self._learning.pop(model_id, None)

    def _learned_for(self, spec: ModelSpec) -> tuple[LearnedBytes, ...]:
        """What was measured of ``spec``'s model with the current binary (nothing when the
        registry's ``memory`` setting replaces the footprint)."""
        if spec.memory is not None:
            return ()
        return self.learned.for_model(model_identity(spec, self.runtime.binary.path))

    def attach_learned(self, model_ids: Sequence[str] | None = None) -> None:
        """Give the scheduler what was learned about these models (all by default)."""
        self.learned_runtime = self.runtime.binary.path
        for model_id in self.core.models if model_ids is None else model_ids:
            entry = self.core.models.get(model_id)
            if entry is None:
                continue
            self.core.set_learned(model_id, self._learned_for(entry.spec))
            pending = self.core.pending_specs.get(model_id)
            if pending is not None:
                self.core.set_learned(model_id, self._learned_for(pending[0]), pending=True)

    def _learn(self, model_id: str, reading: ProcessMemory) -> None:
        """Keep a ready child's measurement; save and apply it when it is new or larger.

        RAM is learned as RSS, not PSS: a figure that does not depend on which other
        models happen to share library pages with it (and is never below what the
        process has resident, as the estimate is calibrated to be).
        """
        key = self._learning.get(model_id)
        if key is None or RAM_ID not in reading.usage:
            return  # no identity, or the child is gone
        identity, layers = key
        gpu = sum(size for device, size in reading.usage.items() if device != RAM_ID)
        if not self.learned.record(identity, layers, gpu, reading.ram_rss):
            return
        text, generation = self.learned.dumps(), self.learned.generation
        self._spawn(asyncio.to_thread(self.learned.write, text, generation))
        if identity.runtime == str(self.learned_runtime):
            self.attach_learned([model_id])
