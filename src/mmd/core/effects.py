"""What passes between the engine and the scheduler core (mmd.core.scheduler).

The engine hands the scheduler requests (a :class:`Kind` of work for a model); the
scheduler keeps each waiting one as a :class:`Ticket` and answers every event with a list
of effects (:data:`Effect`) that the engine carries out: admit a request, fail one, start a
load, stop a runtime, abort running requests, arm a timer. Plain frozen data, so that the
scheduler stays free of I/O and its tests read effects as values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mmd.core.errors import MmdError
from mmd.core.planner import Placement

# --- requests -----------------------------------------------------------------------


class Kind(enum.Enum):
    INFER = "infer"
    EMBED = "embed"
    LOAD = "load"  # an explicit load: done when the model is ready, takes no slot


@dataclass
class Ticket:
    id: int
    model_id: str
    kind: Kind
    arrived: float
    keep_alive: float | None = None
    admitted: bool = False  # holds a slot (counted in active) until request_done


# --- effects ------------------------------------------------------------------------


@dataclass(frozen=True)
class Admit:
    ticket: int


@dataclass(frozen=True)
class Fail:
    ticket: int
    error: MmdError


@dataclass(frozen=True)
class StartLoad:
    model_id: str
    placement: Placement
    after: tuple[str, ...]  # evicted models whose stop must complete first
    # Models stopped to start again on a smaller share of the cores (mmd.core.cores): their
    # stop must complete first too.
    replaced: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoadFailed:
    """A load refused before anything was planned or evicted (its model file is gone)."""

    model_id: str
    message: str


@dataclass(frozen=True)
class Stop:
    model_id: str
    reason: str  # "evicted", "re-placed", "idle", "unload", "forced unload", "shutdown"
    # An idle model evicted for a load that waits on its memory: killed without a grace
    # period (it has nothing to finish, and the load starts once it is gone).
    at_once: bool = False
    beneficiary: str = ""  # for "evicted": the model it makes room for


@dataclass(frozen=True)
class AbortRunning:
    model_id: str
    error: MmdError


@dataclass(frozen=True)
class ArmTimer:
    model_id: str
    at: float


Effect = Admit | Fail | StartLoad | LoadFailed | Stop | AbortRunning | ArmTimer
