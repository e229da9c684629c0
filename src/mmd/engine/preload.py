"""Preloading at start: the ``preload`` and pinned models, loaded within the budget."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Protocol

from mmd.config.settings import Config
from mmd.core.errors import MmdError
from mmd.core.model_state import ModelEntry, State
from mmd.core.planner import Plan, Refusal
from mmd.core.scheduler import Scheduler
from mmd.engine.children import LoadStage

log = logging.getLogger("mmd.engine")


class Preloading(Protocol):
    """What a preload needs of the engine (mmd.engine.engine.Engine is one): the config,
    the registry, a plan and the one way to load. A protocol rather than the Engine, so
    that the engine can import this module without the two importing each other."""

    @property
    def config(self) -> Config: ...

    @property
    def core(self) -> Scheduler: ...

    def find_entry(self, model_id: str) -> ModelEntry | None: ...

    async def plan(self, model_id: str, gpu_layers: int | None) -> Plan | Refusal: ...

    def load_stages(
        self, model_id: str, gpu_layers: int | None = None
    ) -> AsyncGenerator[LoadStage, None]: ...


async def preload_models(
    engine: Preloading, report: Callable[[int, int, str], None] | None = None
) -> list[str]:
    """Load the ``preload`` and pinned models, in priority order then id, within the
    budget: a preload never evicts another model. Failures are logged; returns the ids
    that are ready."""
    wanted = sorted(
        (s for s in engine.config.models.values() if s.preload or s.pinned),
        key=lambda s: (s.priority, s.id),
    )
    ready: list[str] = []
    for index, spec in enumerate(wanted, 1):
        entry = engine.find_entry(spec.id)
        if entry is None or spec.id in engine.core.removing:
            continue  # removed by a reload meanwhile
        if report:
            report(index, len(wanted), spec.id)
        try:
            if entry.state not in (State.READY, State.LOADING):
                plan = await engine.plan(spec.id, None)
                if isinstance(plan, Refusal):
                    log.error("preload of %s refused: %s", spec.id, plan.reason)
                    continue
                if plan.evict:
                    log.error(
                        "preload of %s skipped: it would evict %s (not within the budget)",
                        spec.id,
                        ", ".join(plan.evict),
                    )
                    continue
            async with contextlib.aclosing(engine.load_stages(spec.id)) as stages:
                async for _ in stages:
                    pass
        except MmdError as err:
            log.error("preload of %s failed: %s", spec.id, err.message)
            continue
        ready.append(spec.id)
    return ready
