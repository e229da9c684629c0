"""The scheduler core: the one owner of all scheduling state.

Synchronous and free of I/O: the engine (mmd.engine) feeds it events — a
request arrived, a load finished, a request finished, a child crashed, an idle
timer fired — and executes the effects it returns (admit a request, fail one,
start a load, stop a runtime, abort running requests, arm a timer). That keeps
every policy decision in one place that unit tests drive without processes.

This module holds the queues and the admission policy (:class:`Scheduler`). The rest of
the core: the requests and effects exchanged with the engine (mmd.core.effects), a model's
states and the one table of moves between them (mmd.core.model_state), and the registry of
models with what the planner sees of them and what a reload leaves pending (mmd.core.registry).

Policy, in short (the README's "Scheduling" section says it for users):

* Admission: a request runs when its model is ready, the model has a free
  server slot (``parallel``), fewer than ``max_concurrent`` requests run in
  all, and the model's devices have ``min_headroom`` free (measured) — except
  that a model with nothing running may always start one request, so a
  pressured machine slows down instead of deadlocking. Among admissible
  requests the oldest goes first.
* At most ``max_queue`` requests wait; one more is refused (queue full).
* A request for an unloaded model starts its load (one load however many
  requests wait). The planner picks the placement and the idle models to evict.
  If the model would fit once busy (or loading, or unloading) models are done,
  the load waits; those models then admit at most ``swap_batch`` more of their
  queued requests (and stay at least ``min_residency`` after becoming ready)
  before they are swapped out.
  If it cannot fit even then, its requests are refused at once.
* Keep-alive: when a model's last request ends its idle timer starts. The
  timeout is the finished request's own keep-alive if it gave one, otherwise
  the model's ``keep_alive``, otherwise ``[scheduler] default_keep_alive``; a
  request's keep-alive never changes the model's setting. 0 unloads at once,
  negative never. Pinned models (priority 0) are never unloaded for idleness.
* A crash fails the requests running on the model; queued ones get a reload,
  unless the model keeps crashing: after the 1st crash it reloads at once, then
  waits 2, 4, 8 ... s (at most 60 s), refusing requests during the wait. Load
  failures count the same way; a model that stays ready for a minute starts afresh.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

from mmd.core.effects import (
    AbortRunning,
    Admit,
    ArmTimer,
    Effect,
    Fail,
    Kind,
    LoadFailed,
    StartLoad,
    Ticket,
)
from mmd.core.errors import (
    FailedPrecondition,
    InsufficientMemory,
    MmdError,
    QueueFull,
    RequestAborted,
    RuntimeFailed,
)
from mmd.core.footprint import Footprint
from mmd.core.model_state import ModelEntry, State
from mmd.core.planner import Plan, plan_load
from mmd.core.registry import ModelRegistry
from mmd.core.spec import ModelSpec, SchedulerSettings

# Importable from here as before; the definitions live in mmd.core.effects and mmd.core.model_state.


class Scheduler(ModelRegistry):
    """All queues and counters over the registry's models. Every public method is an
    event that returns the effects the engine is to carry out."""

    def __init__(
        self,
        settings: SchedulerSettings,
        models: Mapping[str, tuple[ModelSpec, Footprint]],
    ) -> None:
        super().__init__(settings, models)
        self.tickets: dict[int, Ticket] = {}
        self.active_total = 0
        self.closed = False  # shut down: every new request is refused
        self._ids = itertools.count(1)

    # --- inputs from the engine -----------------------------------------------------------

    def submit(
        self,
        model_id: str,
        kind: Kind,
        now: float,
        keep_alive: float | None = None,
        gpu_layers: int | None = None,
    ) -> tuple[int, list[Effect]]:
        """A new request. Returns its ticket id and the effects; raises when refused at once."""
        entry = self.entry(model_id)
        if self.closed:
            raise RequestAborted("mmd is shutting down")
        if entry.unload_requested:
            raise FailedPrecondition(f"model {model_id!r} is being unloaded")
        if kind is Kind.LOAD:
            return self._submit_load(entry, now, gpu_layers)
        if kind is Kind.EMBED and not entry.spec.embedding:
            raise FailedPrecondition(
                f"model {model_id!r} is not an embedding model (set embedding = true)"
            )
        if self.queued_total >= self.settings.max_queue and not self._can_run_now(entry):
            raise QueueFull(
                f"queue full ({self.settings.max_queue} requests waiting); try again later"
            )
        if entry.state in (State.UNLOADED, State.FAILED):
            self._check_may_load(entry, now)
        ticket = Ticket(next(self._ids), model_id, kind, now, keep_alive)
        self.tickets[ticket.id] = ticket
        entry.queue[ticket.id] = ticket
        entry.idle_deadline = None
        effects: list[Effect] = []
        if entry.state in (State.UNLOADED, State.FAILED):
            effects += self._start_load(entry, now)
        # Only this model's queue changed: nothing else became admissible (a full pump
        # per request would cost O(models) each, with thousands arriving at once).
        effects += self._admit_waiting(entry)
        return ticket.id, effects

    def _can_run_now(self, entry: ModelEntry) -> bool:
        return (
            entry.state == State.READY
            and entry.active < entry.spec.parallel
            and self.active_total < self.settings.max_concurrent
            and not entry.queue
        )

    def _check_may_load(self, entry: ModelEntry, now: float) -> None:
        if not self.settings.autoload:
            raise FailedPrecondition(
                f"model {entry.spec.id!r} is not loaded and autoload is off "
                f"(run 'mmctl load {entry.spec.id}')"
            )
        if entry.state == State.FAILED and now < entry.retry_after:
            raise RuntimeFailed(
                f"model {entry.spec.id!r} failed {entry.crashes} times in a row "
                f"({entry.last_error}); next retry in {entry.retry_after - now:.0f}s"
            )

    def _submit_load(
        self, entry: ModelEntry, now: float, gpu_layers: int | None
    ) -> tuple[int, list[Effect]]:
        ticket = Ticket(next(self._ids), entry.spec.id, Kind.LOAD, now)
        effects: list[Effect] = []
        if entry.state in (State.LOADING, State.READY, State.UNLOADING):
            current = entry.placement.gpu_layers if entry.placement else 0
            if gpu_layers is not None and gpu_layers != current:
                raise FailedPrecondition(
                    f"model {entry.spec.id!r} is already loaded with {current} GPU layers; "
                    "unload it first to load it with a different number"
                )
        if entry.state == State.READY:
            return ticket.id, [Admit(ticket.id)]
        if entry.state == State.FAILED:
            entry.retry_after = 0.0  # an explicit load retries at once
        self.tickets[ticket.id] = ticket
        entry.load_waiters.append(ticket.id)
        if entry.state in (State.UNLOADED, State.FAILED):
            entry.gpu_layers_override = gpu_layers
            effects += self._start_load(entry, now)
        return ticket.id, effects

    def _start_load(self, entry: ModelEntry, now: float) -> list[Effect]:
        """Plan and start a load; or wait for busy models to drain; or refuse."""
        self._apply_pending_spec(entry)
        problem = self.file_problem(entry.spec)
        if problem is not None:
            return self._fail_before_load(entry, now, RuntimeFailed(problem))
        layers = (
            entry.gpu_layers_override
            if entry.gpu_layers_override is not None
            else entry.spec.gpu_layers
        )
        plan = plan_load(
            entry.spec.id, entry.footprint, self.devices, self.residents(now), gpu_layers=layers
        )
        if isinstance(plan, Plan):
            cores = self.decide_cores(entry, plan.placement, leaving=plan.evict)
            replace = cores.replace if cores else ()
            busy = [self.models[m] for m in replace if not self._may_replace(self.models[m])]
            if busy:
                # Its cores are held by models at work: wait for them, as for memory.
                for holder in busy:
                    if holder.drain_for is None:
                        holder.drain_for = entry.spec.id
                        holder.admitted_while_draining = 0
                return []
            effects: list[Effect] = []
            for victim_id in plan.evict:
                victim = self.models[victim_id]
                effects += self._begin_stop(
                    victim, "evicted", at_once=True, beneficiary=entry.spec.id
                )
            for holder_id in replace:
                holder = self.models[holder_id]
                holder.replacing = True
                effects += self._begin_stop(
                    holder, "re-placed", at_once=True, beneficiary=entry.spec.id
                )
            if cores is None:
                entry.start_loading(plan.placement)
            else:
                entry.start_loading(plan.placement, cores.share, cores.reason)
            effects.append(StartLoad(entry.spec.id, plan.placement, plan.evict, replace))
            return effects
        eventual = plan_load(
            entry.spec.id,
            entry.footprint,
            self.devices,
            self.residents(treat_busy_as_idle=True),
            gpu_layers=layers,
        )
        if isinstance(eventual, Plan) and not plan.impossible:
            # Fits once these busy models drain: wait, and bound their remaining batch.
            for victim_id in eventual.evict:
                victim = self.models[victim_id]
                if victim.drain_for is None and victim.state != State.UNLOADING:
                    victim.drain_for = entry.spec.id
                    victim.admitted_while_draining = 0
            return []
        return self._refuse(entry, InsufficientMemory(plan.reason))

    @staticmethod
    def _may_replace(holder: ModelEntry) -> bool:
        """A model is re-placed only when idle: stopping it must cost no request."""
        return holder.state == State.READY and holder.active == 0

    def _fail_before_load(self, entry: ModelEntry, now: float, error: MmdError) -> list[Effect]:
        """The model fails as a load that failed would (and counts as one), with nothing
        planned, evicted or started."""
        entry.failed(error.message, now)
        return [LoadFailed(entry.spec.id, error.message), *self._refuse(entry, error)]

    def _refuse(self, entry: ModelEntry, error: MmdError) -> list[Effect]:
        effects: list[Effect] = [Fail(t, error) for t in entry.queue]
        effects += [Fail(t, error) for t in entry.load_waiters]
        for ticket_id in entry.queue:
            self.tickets.pop(ticket_id, None)
        for ticket_id in entry.load_waiters:
            self.tickets.pop(ticket_id, None)
        entry.queue.clear()
        entry.load_waiters.clear()
        entry.gpu_layers_override = None
        return effects

    def _begin_stop(
        self, entry: ModelEntry, reason: str, at_once: bool = False, beneficiary: str = ""
    ) -> list[Effect]:
        return [entry.begin_stop(reason, at_once, beneficiary)]

    def load_done(self, model_id: str, now: float, error: MmdError | None = None) -> list[Effect]:
        entry = self.entry(model_id)
        if entry.state != State.LOADING:
            return []
        effects: list[Effect] = []
        entry.gpu_layers_override = None
        if error is None:
            entry.became_ready(now)
            effects += [Admit(t) for t in entry.load_waiters]
            for ticket_id in entry.load_waiters:
                self.tickets.pop(ticket_id, None)
            entry.load_waiters.clear()
            if not entry.queue:
                effects += self._arm_idle(entry, now, None)
        else:
            entry.failed(error.message, now)
            effects += self._refuse(entry, error)
        return effects + self.pump(now)

    def request_done(self, ticket_id: int, now: float) -> list[Effect]:
        ticket = self.tickets.pop(ticket_id, None)
        if ticket is None:
            return []
        entry = self.models[ticket.model_id]
        entry.active -= 1
        self.active_total -= 1
        entry.last_used = now
        effects: list[Effect] = []
        if entry.active == 0 and not entry.queue:
            if entry.unload_requested:  # set only while ready (ModelEntry.move)
                entry.unload_requested = False
                effects += self._begin_stop(entry, "unload")
            elif entry.state == State.READY:
                effects += self._arm_idle(entry, now, ticket.keep_alive)
        return effects + self.pump(now)

    def cancel(self, ticket_id: int, now: float) -> list[Effect]:
        """A request whose client went away before it started running.

        It may have been admitted in the meantime (its client left in the same loop
        iteration as its Admit): then its slot is given back as by request_done.
        """
        ticket = self.tickets.get(ticket_id)
        if ticket is None:
            return []
        if ticket.admitted:
            return self.request_done(ticket_id, now)
        del self.tickets[ticket_id]
        entry = self.models[ticket.model_id]
        if ticket.kind is Kind.LOAD:
            if ticket_id in entry.load_waiters:
                entry.load_waiters.remove(ticket_id)
            return []
        entry.queue.pop(ticket_id, None)
        # A request that never ran frees no capacity: no pump (a thousand clients leaving
        # at once must not cost a thousand scans of the registry). A model left draining
        # for a waiter that is gone is released at the next pump.
        if entry.state == State.READY and entry.active == 0 and not entry.queue:
            return self._arm_idle(entry, now, None)
        return []

    def _arm_idle(self, entry: ModelEntry, now: float, keep_alive: float | None) -> list[Effect]:
        entry.idle_keep_alive = keep_alive
        timeout = self.keep_alive_of(entry)
        if entry.spec.pinned or timeout < 0:
            entry.idle_deadline = None
            return []
        entry.idle_deadline = now + timeout
        if timeout == 0:
            return self._begin_stop(entry, "idle")
        return [ArmTimer(entry.spec.id, entry.idle_deadline)]

    def idle_check(self, model_id: str, now: float) -> list[Effect]:
        entry = self.entry(model_id)
        if (
            entry.state == State.READY
            and entry.active == 0
            and not entry.queue
            and entry.idle_deadline is not None
            and entry.idle_deadline <= now
        ):
            return self._begin_stop(entry, "idle")
        return []

    def stopped(self, model_id: str, now: float) -> list[Effect]:
        """A stop the scheduler asked for has completed (the child is reaped)."""
        entry = self.entry(model_id)
        if entry.state != State.UNLOADING:
            return []
        entry.stopped()
        effects: list[Effect] = []
        if entry.queue or entry.load_waiters or entry.replacing:
            entry.replacing = False  # a re-placed model starts again on its new share
            effects += self._start_load(entry, now)
        return effects + self.pump(now)

    def crashed(self, model_id: str, now: float, description: str) -> list[Effect]:
        """The child exited on its own. ``description`` names the exit status."""
        entry = self.entry(model_id)
        if entry.state not in (State.READY, State.LOADING):
            return []
        error = RuntimeFailed(f"model {model_id!r} crashed: {description}")
        effects: list[Effect] = []
        if entry.active:
            effects.append(AbortRunning(model_id, error))
        entry.failed(error.message, now)
        if entry.queue or entry.load_waiters:
            if now >= entry.retry_after and self.settings.autoload:
                effects += self._start_load(entry, now)
            else:
                effects += self._refuse(entry, error)
        return effects + self.pump(now)

    def unload(self, model_id: str, now: float, *, force: bool) -> list[Effect]:
        """An operator's unload. Without force, waits for running requests (the engine bounds
        the wait); queued requests are refused either way."""
        entry = self.entry(model_id)
        if entry.state in (State.UNLOADED, State.UNLOADING):
            return []
        if entry.state == State.FAILED:
            entry.clear_failure()
            return []
        aborted = RequestAborted(f"model {model_id!r} was unloaded by an operator")
        effects: list[Effect] = [Fail(t, aborted) for t in entry.queue]
        for ticket_id in entry.queue:
            self.tickets.pop(ticket_id, None)
        entry.queue.clear()
        if entry.state == State.LOADING:
            effects += self._refuse(entry, aborted)
            return effects + self._begin_stop(entry, "unload")
        if entry.active and not force:
            entry.unload_requested = True
            return effects
        if entry.active:
            effects.append(AbortRunning(model_id, aborted))
        entry.unload_requested = False
        return effects + self._begin_stop(entry, "forced unload" if force else "unload")

    def cancel_unload(self, model_id: str, now: float) -> list[Effect]:
        """An unload that timed out waiting: the model keeps serving."""
        entry = self.entry(model_id)
        entry.unload_requested = False
        return self.pump(now)

    def shutdown(self) -> list[Effect]:
        """Refuse everything queued and stop every runtime (running requests were drained)."""
        error = RequestAborted("mmd is shutting down")
        self.closed = True
        effects: list[Effect] = []
        for entry in self.models.values():
            effects += self._refuse(entry, error)
            if entry.active:
                effects.append(AbortRunning(entry.spec.id, error))
            if entry.state in (State.LOADING, State.READY):
                effects += self._begin_stop(entry, "shutdown")
        return effects

    # --- admission --------------------------------------------------------------------

    def pump(self, now: float) -> list[Effect]:
        """Admit what can run, oldest first; restart loads that wait for room."""
        # One pass over the registry picks the models with requests or loads waiting; the
        # rest of the pump looks at those alone. (Every finished request pumps: with a
        # thousand models registered, three full scans per pump made 10,000 cancelled
        # requests take seconds to settle.)
        waiting: list[ModelEntry] = []
        for entry in self.models.values():
            if entry.crashes:
                entry.forget_old_failures(now)
            if entry.drain_for is not None and not self._waits_for_room(entry.drain_for):
                entry.drain_for = None
            if entry.queue or entry.load_waiters:
                waiting.append(entry)
        effects: list[Effect] = []
        while self.active_total < self.settings.max_concurrent:
            # Admitting only empties queues: ``waiting`` still holds every candidate.
            ready = [m for m in waiting if m.queue and self._may_admit(m)]
            if not ready:
                break
            effects.append(self._admit_head(min(ready, key=lambda m: m.head_arrival)))
        for entry in waiting:
            if self._waits_for_room(entry.spec.id):
                effects += self._start_load(entry, now)
        return effects

    def _admit_waiting(self, entry: ModelEntry) -> list[Effect]:
        """Admit from one model's queue while it and the global cap allow."""
        effects: list[Effect] = []
        while (
            entry.queue
            and self.active_total < self.settings.max_concurrent
            and self._may_admit(entry)
        ):
            effects.append(self._admit_head(entry))
        return effects

    def _admit_head(self, entry: ModelEntry) -> Admit:
        _, ticket = entry.queue.popitem(last=False)
        ticket.admitted = True
        entry.active += 1
        self.active_total += 1
        entry.idle_deadline = None
        if entry.drain_for is not None:
            entry.admitted_while_draining += 1
        return Admit(ticket.id)

    def _waits_for_room(self, model_id: str) -> bool:
        """Requests wait for this model, whose load waits for room (a FAILED one after a
        retry was allowed: its queue was refused otherwise)."""
        entry = self.models.get(model_id)
        return (
            entry is not None
            and entry.state in (State.UNLOADED, State.FAILED)
            and bool(entry.queue or entry.load_waiters)
        )

    def _may_admit(self, entry: ModelEntry) -> bool:
        if entry.state != State.READY or entry.unload_requested:
            return False
        if entry.active >= entry.spec.parallel:
            return False
        if (
            entry.drain_for is not None
            and entry.admitted_while_draining >= self.settings.swap_batch
            and not entry.spec.pinned
        ):
            return False
        return not (
            entry.active and entry.placement and self.low_memory & set(entry.placement.usage)
        )

    # --- registry changes (reload) ----------------------------------------------------

    def remove_model(self, model_id: str, now: float) -> list[Effect]:
        """Drain a model out of the registry: queued requests are refused, running ones
        finish, then its child stops. The entry goes once it holds no process
        (:meth:`forget_removed`)."""
        entry = self.entry(model_id)
        self.removing.add(model_id)
        self.pending_specs.pop(model_id, None)
        entry.idle_deadline = None
        effects = self._refuse(
            entry, FailedPrecondition(f"model {model_id!r} was removed from the config")
        )
        if entry.state == State.LOADING:
            effects += self._begin_stop(entry, "removed from the config")
        elif entry.state == State.READY:
            if entry.active:
                entry.unload_requested = True  # request_done stops it after the last one
            else:
                entry.unload_requested = False
                effects += self._begin_stop(entry, "removed from the config")
        self.forget_removed()
        return effects + self.pump(now)

    def update_settings(self, settings: SchedulerSettings, now: float) -> list[Effect]:
        """New [scheduler] settings, in force at once (a larger cap admits waiting requests)."""
        self.settings = settings
        return self.pump(now)
