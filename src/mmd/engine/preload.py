"""Preloading at start: the ``preload`` and pinned models, loaded within the budget."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from mmd.core.errors import MmdError
from mmd.core.model_state import State
from mmd.core.planner import Refusal

if TYPE_CHECKING:
    from mmd.engine.engine import Engine

log = logging.getLogger("mmd.engine")


async def preload_models(
    engine: Engine, report: Callable[[int, int, str], None] | None = None
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
