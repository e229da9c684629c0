"""What the core decides about: one model's settings and the scheduler's.

Plain frozen data, filled in by :mod:`mmd.config.settings` from the TOML file. They live in
the core, not with the parser, so that the scheduler, the planner and the footprint
arithmetic need nothing that reads a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmd.core.units import MIB


@dataclass(frozen=True)
class ModelSpec:
    """One ``[models.<id>]`` table."""

    id: str
    path: Path
    role: str = ""
    ctx: int = 4096
    parallel: int = 1
    gpu_layers: int | None = None  # None: "auto", mmd's planner decides
    priority: int = 1  # lower stays loaded longer; 0 = pinned, never evicted
    keep_alive: float | None = None  # seconds; None: [scheduler] default; < 0: forever
    embedding: bool = False
    args: tuple[str, ...] = ()
    memory: int | None = None  # overrides the footprint estimate
    preload: bool = False
    # Where the model came from: "config" (a [models.<id>] table) or the discovery that
    # found its file ("dir:/path", "huggingface:ORG/NAME", "ollama:NAME:TAG", ...; see
    # mmd.config.discovery).
    source: str = "config"

    @property
    def pinned(self) -> bool:
        return self.priority == 0


@dataclass(frozen=True)
class SchedulerSettings:
    max_concurrent: int = 8
    max_queue: int = 256
    min_headroom: int = 512 * MIB
    autoload: bool = True
    default_keep_alive: float = 300.0
    # A model is not evicted within this time of becoming ready unless memory demands it.
    min_residency: float = 5.0
    # Queued requests of a loaded model served before it may be swapped out.
    swap_batch: int = 8
