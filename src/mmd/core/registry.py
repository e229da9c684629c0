"""The scheduler's registry of models: what each one is, holds and has measured.

:class:`ModelRegistry` is the part of the scheduler core (mmd.core.scheduler) that no queue
or admission decision lives in: the entries by model id, the devices' budgets, what the
planner sees of the models holding memory (and which of them it may evict), the sizes the
engine measured, and the settings a config reload leaves pending until a model's next
load. :class:`mmd.core.scheduler.Scheduler` builds its events and effects on top of it; like
the scheduler it is synchronous and free of I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace

from mmd.core.cores import CoreDecision, CpuBudget, args_place_threads, decide_cores
from mmd.core.errors import UnknownModel
from mmd.core.footprint import Footprint, LearnedBytes
from mmd.core.model_state import ModelEntry, State
from mmd.core.planner import DeviceBudget, Placement, Plan, Refusal, Resident, plan_load
from mmd.core.spec import ModelSpec, SchedulerSettings


class ModelRegistry:
    """Every model's entry, and what the planner sees of them."""

    def __init__(
        self,
        settings: SchedulerSettings,
        models: Mapping[str, tuple[ModelSpec, Footprint]],
    ) -> None:
        self.settings = settings
        self.models: dict[str, ModelEntry] = {
            model_id: ModelEntry(spec, footprint) for model_id, (spec, footprint) in models.items()
        }
        self.devices: tuple[DeviceBudget, ...] = ()
        self.low_memory: frozenset[str] = frozenset()
        # Reload: specs that apply at a model's next load; models draining out of the registry.
        self.pending_specs: dict[str, tuple[ModelSpec, Footprint]] = {}
        self.removing: set[str] = set()
        # Why a model's file cannot be loaded now (gone, unreadable), or None: asked before
        # a load is planned, so that no model is evicted for one that cannot start. The
        # engine sets the check (I/O); by default every file is fine.
        self.file_problem: Callable[[ModelSpec], str | None] = lambda spec: None
        # The cores children may compute on; None: mmd leaves threads to llama-server.
        self.cpu_budget: CpuBudget | None = None

    # --- queries ----------------------------------------------------------------------

    @property
    def queued_total(self) -> int:
        return sum(m.queued for m in self.models.values())

    def entry(self, model_id: str) -> ModelEntry:
        try:
            return self.models[model_id]
        except KeyError:
            raise UnknownModel(model_id) from None

    def residents(
        self, now: float | None = None, *, treat_busy_as_idle: bool = False
    ) -> list[Resident]:
        """Models holding memory, as the planner sees them; ``now`` enables min_residency."""
        return [
            Resident(
                id=m.spec.id,
                usage=m.usage,
                last_used=max(m.last_used, m.ready_since),
                priority=m.spec.priority,
                busy=not self._evictable(m, now, treat_busy_as_idle=treat_busy_as_idle),
            )
            for m in self.models.values()
            if m.holds_memory
        ]

    def plan(
        self, model_id: str, gpu_layers: int | None = None, now: float | None = None
    ) -> Plan | Refusal:
        """What loading ``model_id`` would do now (pure; changes nothing)."""
        entry = self.entry(model_id)
        problem = self.file_problem(entry.spec)
        if problem is not None:
            return Refusal(problem, {}, {}, {}, (), (), impossible=True)
        layers = gpu_layers if gpu_layers is not None else entry.spec.gpu_layers
        return plan_load(
            model_id, entry.footprint, self.devices, self.residents(now), gpu_layers=layers
        )

    def decide_cores(
        self, entry: ModelEntry, placement: Placement, leaving: Collection[str] = ()
    ) -> CoreDecision | None:
        """The cores ``entry`` would get with ``placement``, and the loaded models that would
        be re-placed for it; None when mmd places no threads for it (see mmd.core.cores)."""
        if (
            self.cpu_budget is None
            or placement.kind == "gpu"
            or args_place_threads(entry.spec.args)
        ):
            return None
        held = {
            m.spec.id: m.cores.cpus
            for m in self.models.values()
            if m.cores is not None
            and m.state in (State.LOADING, State.READY)
            and m is not entry
            and m.spec.id not in leaving
        }
        return decide_cores(self.cpu_budget, held, entry.spec.id)

    def keep_alive_of(self, entry: ModelEntry) -> float:
        """How long the model stays loaded after its last request (negative: forever)."""
        if entry.idle_keep_alive is not None:
            return entry.idle_keep_alive
        if entry.spec.keep_alive is not None:
            return entry.spec.keep_alive
        return self.settings.default_keep_alive

    def _evictable(self, m: ModelEntry, now: float | None, *, treat_busy_as_idle: bool) -> bool:
        if m.spec.pinned:
            return False
        if treat_busy_as_idle:
            # Loading and unloading models also end up evictable (or gone) soon.
            return True
        if m.state != State.READY:
            return False
        if m.active:
            return False
        if not m.queue:
            return True
        # Queued work: swapped out only after serving its batch and its minimum residency.
        if m.drain_for is None or m.admitted_while_draining < self.settings.swap_batch:
            return False
        return now is None or now - m.ready_since >= self.settings.min_residency

    # --- what the engine reports -----------------------------------------------------

    def update_devices(self, devices: Sequence[DeviceBudget], low_memory: frozenset[str]) -> None:
        self.devices = tuple(devices)
        self.low_memory = low_memory

    def set_measured(self, model_id: str, usage: Mapping[str, int]) -> None:
        entry = self.entry(model_id)
        if entry.state in (State.LOADING, State.READY):
            entry.measured = dict(usage)

    def set_runtime(self, model_id: str, usage: Mapping[str, int]) -> None:
        """The buffer sizes the model's llama-server reported, per device."""
        entry = self.entry(model_id)
        if entry.state in (State.LOADING, State.READY):
            entry.runtime = dict(usage)

    def set_learned(
        self, model_id: str, learned: tuple[LearnedBytes, ...], *, pending: bool = False
    ) -> None:
        """What has been measured of the model as configured now (``pending``: as it will
        be configured at its next load, after a reload changed it)."""
        entry = self.entry(model_id)
        if pending:
            if model_id in self.pending_specs:
                spec, footprint = self.pending_specs[model_id]
                self.pending_specs[model_id] = (spec, replace(footprint, learned=learned))
            return
        entry.footprint = replace(entry.footprint, learned=learned)

    # --- registry changes (reload) ----------------------------------------------------

    def add_model(self, spec: ModelSpec, footprint: Footprint) -> None:
        """A model new to the registry (or one re-added while it was still draining out)."""
        if spec.id in self.models:
            self.removing.discard(spec.id)
            self.models[spec.id].unload_requested = False
            self.update_spec(spec, footprint)
            return
        self.models[spec.id] = ModelEntry(spec, footprint)

    def update_spec(self, spec: ModelSpec, footprint: Footprint) -> None:
        """New settings for a model: at once when it holds no process, else at its next load
        (a running child keeps the ctx, slots and layers it was started with)."""
        entry = self.entry(spec.id)
        if entry.holds_memory:
            self.pending_specs[spec.id] = (spec, footprint)
            return
        self.pending_specs.pop(spec.id, None)
        entry.spec, entry.footprint = spec, footprint

    def _apply_pending_spec(self, entry: ModelEntry) -> None:
        pending = self.pending_specs.pop(entry.spec.id, None)
        if pending is not None:
            entry.spec, entry.footprint = pending

    def forget_removed(self) -> list[str]:
        """Drop removed models that no longer hold a process; returns their ids."""
        gone = [
            model_id
            for model_id in self.removing
            if model_id in self.models
            and not self.models[model_id].holds_memory
            and not self.models[model_id].active
        ]
        for model_id in gone:
            self.removing.discard(model_id)
            del self.models[model_id]
        self.removing &= set(self.models)
        return gone
