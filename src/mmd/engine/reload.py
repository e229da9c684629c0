"""Config reload: what changed between two configs, and re-reading the daemon's file.

What a reload does (:func:`apply_config` applies it to the engine, see ``Engine.reload``):

* added models join the registry at once;
* removed models are drained: their queued requests are refused, running ones finish, then
  the child stops and the id leaves the registry;
* a model whose settings changed keeps its running child; the new settings apply at its
  next load;
* ``[scheduler]``, ``[budget]`` and most ``[daemon]`` settings apply at once; the few that
  are bound at start (:data:`RESTART_KEYS`) are reported as needing a restart and keep
  their old value until then.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mmd.config.discovery import load_registry, log_discovery
from mmd.config.settings import Config
from mmd.core.effects import Effect
from mmd.core.footprint import Footprint
from mmd.core.model_state import State
from mmd.core.scheduler import Scheduler
from mmd.engine.children import Children
from mmd.engine.monitor import MemoryMonitor
from mmd.runtime.gguf import footprint_for

log = logging.getLogger("mmd.reload")
engine_log = logging.getLogger("mmd.engine")  # what the engine logged as it applied a reload

# Settings bound at start: the socket is bound, the binary probed, the state directory in
# use, the metrics and HTTP listeners open. Whole sections are named by their table.
RESTART_KEYS = ("daemon.socket", "daemon.llama_server", "daemon.state_dir", "metrics", "http")

RESTART_NOTE = "needs a restart"


@dataclass(frozen=True)
class ConfigDiff:
    source: Path | None
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()  # model ids: their new settings apply at the next load
    applied: tuple[str, ...] = ()  # settings in force at once, e.g. "scheduler.max_queue"
    restart_needed: tuple[str, ...] = ()  # settings kept until a restart, e.g. "daemon.socket"

    def changed_entries(self) -> list[str]:
        """The response's ``changed`` list: model ids, then settings keys."""
        return [
            *self.changed,
            *self.applied,
            *(f"{key} ({RESTART_NOTE})" for key in self.restart_needed),
        ]

    def summary(self) -> str:
        parts = [
            f"{label} {', '.join(ids)}"
            for label, ids in (
                ("added", self.added),
                ("removed", self.removed),
                ("changed", self.changed),
                ("applied", self.applied),
            )
            if ids
        ]
        return "; ".join(parts) or "no changes"


def _changed_fields(section: str, old: Any, new: Any) -> list[str]:
    return [
        f"{section}.{item.name}"
        for item in dataclasses.fields(old)
        if getattr(old, item.name) != getattr(new, item.name)
    ]


def diff_configs(
    old: Config,
    new: Config,
    old_footprints: Mapping[str, Footprint] | None = None,
    new_footprints: Mapping[str, Footprint] | None = None,
) -> ConfigDiff:
    """Compare two validated configs. A model counts as changed when its settings differ,
    or (footprints given) when its file now reads differently."""
    old_fp = old_footprints or {}
    new_fp = new_footprints or {}
    added = tuple(sorted(set(new.models) - set(old.models)))
    removed = tuple(sorted(set(old.models) - set(new.models)))
    changed = tuple(
        sorted(
            model_id
            for model_id in set(old.models) & set(new.models)
            if old.models[model_id] != new.models[model_id]
            or (model_id in old_fp and model_id in new_fp and old_fp[model_id] != new_fp[model_id])
        )
    )
    keys = [
        key
        for section in _sections(old)
        for key in _changed_fields(section, getattr(old, section), getattr(new, section))
    ]
    restart = tuple(k for k in keys if _needs_restart(k))
    applied = tuple(k for k in keys if not _needs_restart(k))
    return ConfigDiff(new.source, added, removed, changed, applied, restart)


def _sections(config: Config) -> list[str]:
    """The settings tables: every field of Config but its source, models and notes."""
    return [
        f.name for f in dataclasses.fields(config) if f.name not in ("source", "models", "notes")
    ]


def _needs_restart(key: str) -> bool:
    return key in RESTART_KEYS or key.split(".", 1)[0] in RESTART_KEYS


def keep_restart_settings(old: Config, new: Config) -> Config:
    """``new`` with the settings bound at start kept as they are in ``old``."""
    sections: dict[str, Any] = {}
    for section in _sections(old):
        if section in RESTART_KEYS:
            sections[section] = getattr(old, section)
            continue
        kept = {
            key.split(".", 1)[1]: getattr(getattr(old, section), key.split(".", 1)[1])
            for key in RESTART_KEYS
            if key.startswith(f"{section}.")
        }
        if kept:
            sections[section] = dataclasses.replace(getattr(new, section), **kept)
    return dataclasses.replace(new, **sections)


# --- applying a reload to the running engine ------------------------------------------


class Reloading(Protocol):
    """What a reload needs of the engine (mmd.engine.engine.Engine is one): its config, its
    scheduler and parts, and the few engine services that act on effects and timers. A
    protocol rather than the Engine, so that the engine can import this module without
    the two importing each other."""

    config: Config
    removal_task: asyncio.Task[None] | None

    @property
    def core(self) -> Scheduler: ...

    @property
    def monitor(self) -> MemoryMonitor: ...

    @property
    def children(self) -> Children: ...

    @property
    def reload_lock(self) -> asyncio.Lock: ...

    def now(self) -> float: ...

    def apply(self, effects: Sequence[Effect]) -> None: ...

    def cancel_timer(self, model_id: str) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]: ...

    async def refresh_memory(self, *, measure_children: bool = True) -> None: ...

    def read_cpus(self) -> None: ...

    async def reload(
        self, new_config: Config, footprints: dict[str, Footprint] | None = None
    ) -> ConfigDiff: ...


async def apply_config(
    engine: Reloading, new_config: Config, footprints: dict[str, Footprint] | None = None
) -> ConfigDiff:
    """Apply a validated config to ``engine``: the registry, the settings, the budget."""
    if footprints is None:
        footprints = {m: footprint_for(s) for m, s in new_config.models.items()}
    core = engine.core
    current = {
        m: core.pending_specs.get(m, (e.spec, e.footprint))[1] for m, e in core.models.items()
    }
    diff = diff_configs(engine.config, new_config, current, footprints)
    old_log_dir = engine.config.daemon.log_dir
    engine.config = keep_restart_settings(engine.config, new_config)
    log_dir = engine.config.daemon.log_dir
    if log_dir != old_log_dir:
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            engine_log.error("cannot create log directory %s: %s", log_dir, err)
    now = engine.now()
    for model_id in diff.added:
        core.add_model(new_config.models[model_id], footprints[model_id])
    for model_id in diff.changed:
        core.update_spec(new_config.models[model_id], footprints[model_id])
    engine.monitor.attach_learned([*diff.added, *diff.changed])
    effects: list[Effect] = []
    for model_id in diff.removed:
        engine.cancel_timer(model_id)
        effects += core.remove_model(model_id, now)
    effects += core.update_settings(new_config.scheduler, now)
    engine.apply(effects)
    forget_removed(engine)
    if core.removing and (engine.removal_task is None or engine.removal_task.done()):
        engine.removal_task = engine.spawn(finish_removals(engine))
    await engine.refresh_memory()  # the new budget, at once
    engine.read_cpus()  # the cores, for the next loads
    engine.apply(core.pump(engine.now()))
    return diff


def forget_removed(engine: Reloading) -> None:
    """Drop the removed models whose child has stopped from the registry."""
    for model_id in engine.core.forget_removed():
        engine.children.stops.pop(model_id, None)
        engine.cancel_timer(model_id)
        engine_log.info("%s: removed from the registry", model_id)


async def finish_removals(engine: Reloading) -> None:
    """Drop removed models once their child has stopped."""
    core = engine.core
    while core.removing and not core.closed:
        forget_removed(engine)
        for model_id in list(core.removing):
            entry = core.models[model_id]
            if entry.state == State.READY and not entry.unload_requested:
                # An operator's unload timed out and cancelled the drain: drain again.
                engine.apply(core.remove_model(model_id, engine.now()))
        await asyncio.sleep(0.05)


def read_config(source: Path | None) -> tuple[Config, dict[str, Footprint]]:
    """Read and validate the config, discover the models it asks for (a rescan), and
    read every model's footprint (blocking; raises ConfigError with the one-line reason)."""
    config = load_registry(source)
    footprints = {model_id: footprint_for(spec) for model_id, spec in config.models.items()}
    return config, footprints


async def reload_config(engine: Reloading) -> ConfigDiff:
    """Re-read the file the daemon started with and apply it.

    An invalid config raises ConfigError and changes nothing: the old one stays in force.
    """
    async with engine.reload_lock:
        source = engine.config.source
        config, footprints = await asyncio.to_thread(read_config, source)
        diff = await engine.reload(config, footprints)
    where = diff.source or "built-in defaults"
    log.info("config reloaded from %s: %s", where, diff.summary())
    for key in diff.restart_needed:
        log.warning("%s changed: %s (the old value stays in force until then)", key, RESTART_NOTE)
    log_discovery(config)
    return diff
