"""A model's life in the scheduler: its states, the one table of moves between them, and
what each move does to the model's bookkeeping.

Every state change goes through :meth:`ModelEntry.move`, which checks it against
:data:`ALLOWED`: a move the table does not list is a bug in the scheduler, raised as
:class:`InvalidTransition` at once instead of leaving a model in a state nothing expects
(a ready model with no placement, a stop nobody waits for). ``state`` itself is read-only.

Failures count "in a row" per model: after the 1st the model may reload at once, then it
waits 2, 4, 8 ... s (at most :data:`MAX_BACKOFF_S`); a model that stays ready that long
starts afresh.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass, field

from mmd.core.cores import CoreShare
from mmd.core.effects import Stop, Ticket
from mmd.core.footprint import Footprint
from mmd.core.planner import Placement
from mmd.core.spec import ModelSpec


class State(enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


ALLOWED: dict[State, frozenset[State]] = {
    State.UNLOADED: frozenset(
        {
            State.LOADING,  # a request or an explicit load (the model fits, or made room)
            State.FAILED,  # its file is gone: refused before anything was started
        }
    ),
    State.LOADING: frozenset(
        {
            State.READY,  # the child answers
            State.FAILED,  # the load failed, or the child died while loading
            State.UNLOADING,  # an operator's unload, removal from the config, shutdown
        }
    ),
    State.READY: frozenset(
        {
            State.UNLOADING,  # idle, evicted, unloaded, removed or shut down
            State.FAILED,  # the child crashed
        }
    ),
    State.UNLOADING: frozenset(
        {
            State.UNLOADED,  # the child is gone
        }
    ),
    State.FAILED: frozenset(
        {
            State.LOADING,  # a retry (after the back-off, or an explicit load)
            State.FAILED,  # a retry refused before it started: the file is still gone
            State.UNLOADED,  # an operator's unload clears the failure
        }
    ),
}

MAX_BACKOFF_S = 60.0


class InvalidTransition(AssertionError):
    """A state change that :data:`ALLOWED` does not list: a bug in the scheduler."""

    def __init__(self, model_id: str, old: State, new: State) -> None:
        super().__init__(f"model {model_id!r}: no move from {old.value} to {new.value}")
        self.model_id = model_id
        self.old = old
        self.new = new


@dataclass
class ModelEntry:
    spec: ModelSpec
    footprint: Footprint
    # Changed only by move(), which checks the table; read it as ``state``.
    _state: State = field(default=State.UNLOADED, init=False)
    # Waiting requests in arrival order, by ticket id: a client that leaves is removed in
    # O(1) even from a queue of thousands.
    queue: OrderedDict[int, Ticket] = field(default_factory=OrderedDict)
    load_waiters: list[int] = field(default_factory=list)
    active: int = 0
    last_used: float = 0.0
    ready_since: float = 0.0
    placement: Placement | None = None
    measured: dict[str, int] = field(default_factory=dict)
    runtime: dict[str, int] = field(default_factory=dict)  # buffers llama-server reported
    gpu_layers_override: int | None = None
    idle_keep_alive: float | None = None  # the finished request's own keep-alive
    idle_deadline: float | None = None
    unload_requested: bool = False
    drain_for: str | None = None  # a waiting model this one makes room for
    admitted_while_draining: int = 0
    crashes: int = 0
    retry_after: float = 0.0
    last_error: str = ""
    stop_reason: str = ""
    # The cores its child computes on (mmd.core.cores), None when it computes on none of mmd's
    # (unloaded, all on a GPU, or its args place its threads).
    cores: CoreShare | None = None
    cores_reason: str = ""
    replacing: bool = False  # stopped to start again on a smaller share of the cores

    @property
    def state(self) -> State:
        return self._state

    def move(self, new: State) -> None:
        """The one place a model's state changes; raises InvalidTransition on a move the
        table does not allow (and leaves the state as it was)."""
        if new not in ALLOWED[self._state]:
            raise InvalidTransition(self.spec.id, self._state, new)
        if self._state is State.READY:
            # An unload waiting for running requests meant this process; it is going
            # (stopped, crashed): the last request's end must not stop what comes next.
            self.unload_requested = False
        self._state = new

    # --- queries ----------------------------------------------------------------------

    @property
    def usage(self) -> dict[str, int]:
        """Bytes accounted per device: the measurement where it is known and larger."""
        planned = dict(self.placement.usage) if self.placement else {}
        for device, measured in self.measured.items():
            planned[device] = max(planned.get(device, 0), measured)
        return planned

    @property
    def holds_memory(self) -> bool:
        return self.state in (State.LOADING, State.READY, State.UNLOADING)

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def head_arrival(self) -> float:
        """When the oldest waiting request arrived (the queue must not be empty)."""
        return next(iter(self.queue.values())).arrived

    # --- moves, with the bookkeeping that goes with each ------------------------------

    def start_loading(
        self, placement: Placement, cores: CoreShare | None = None, cores_reason: str = ""
    ) -> None:
        self.move(State.LOADING)
        self.placement = placement
        self.cores = cores
        self.cores_reason = cores_reason
        self.measured = {}
        self.runtime = {}
        self.last_error = ""
        self.stop_reason = ""

    def became_ready(self, now: float) -> None:
        self.move(State.READY)
        self.ready_since = now

    def failed(self, message: str, now: float) -> None:
        """A load that failed (or was refused before it started), or a crash: the model
        holds nothing, and the failure counts towards its back-off."""
        self.forget_old_failures(now)
        self.move(State.FAILED)
        self.placement = None
        self.cores = None
        self.replacing = False
        self.measured = {}
        self.runtime = {}
        self.last_error = message
        self.idle_deadline = None
        self.drain_for = None
        self.note_failure(now)

    def begin_stop(self, reason: str, at_once: bool = False, beneficiary: str = "") -> Stop:
        """The model is to stop; the engine reports the end with Scheduler.stopped."""
        self.move(State.UNLOADING)
        self.stop_reason = reason
        self.idle_deadline = None
        self.drain_for = None
        return Stop(self.spec.id, reason, at_once, beneficiary)

    def stopped(self) -> None:
        self.move(State.UNLOADED)
        self.placement = None
        self.cores = None
        self.measured = {}
        self.runtime = {}

    def clear_failure(self) -> None:
        """An operator's unload of a failed model: it starts afresh."""
        self.move(State.UNLOADED)
        self.last_error = ""
        self.crashes = 0

    # --- crash back-off -------------------------------------------------------------

    def forget_old_failures(self, now: float) -> None:
        """Failures count "in a row" until the model has stayed ready for a while."""
        if self.state == State.READY and now - self.ready_since >= MAX_BACKOFF_S:
            self.crashes = 0

    def note_failure(self, now: float) -> None:
        self.crashes += 1
        delay = 0.0 if self.crashes <= 1 else min(MAX_BACKOFF_S, 2.0 ** (self.crashes - 1))
        self.retry_after = now + delay
