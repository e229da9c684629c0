"""The scheduler core: every transition by example, and random event sequences by property.

The scheduler is pure, so these tests feed it events with explicit clock values and check
the effects it returns; devices are a single RAM budget counted in GiB.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mmd.core.effects import AbortRunning, Admit, ArmTimer, Effect, Fail, Kind, StartLoad, Stop
from mmd.core.errors import (
    FailedPrecondition,
    InsufficientMemory,
    MmdError,
    QueueFull,
    RequestAborted,
    RuntimeFailed,
    UnknownModel,
)
from mmd.core.footprint import Footprint, LearnedBytes
from mmd.core.model_state import State
from mmd.core.planner import DeviceBudget
from mmd.core.scheduler import Scheduler
from mmd.core.spec import ModelSpec, SchedulerSettings
from mmd.core.units import GIB


def footprint(size_gib: float) -> Footprint:
    """A footprint of ``size_gib`` GiB, all of it in RAM."""
    size = int(size_gib * GIB)
    return Footprint((), 0, size, size, 0, 0)  # no layers, no fixed part: all overhead


def make(
    sizes: dict[str, float],
    budget: float = 10,
    specs: dict[str, dict[str, Any]] | None = None,
    **scheduler: Any,
) -> Scheduler:
    """A scheduler over models of the given sizes (GiB) and one RAM device of ``budget`` GiB."""
    options = specs or {}
    models = {
        m: (ModelSpec(id=m, path=Path(f"{m}.gguf"), **options.get(m, {})), footprint(size))
        for m, size in sizes.items()
    }
    core = Scheduler(SchedulerSettings(**scheduler), models)
    core.update_devices([DeviceBudget("ram", "ram", int(budget * GIB))], frozenset())
    return core


def state_of(core: Scheduler, model_id: str) -> State:
    return core.models[model_id].state


def admitted(effects: Sequence[Effect]) -> list[int]:
    return [e.ticket for e in effects if isinstance(e, Admit)]


def failed(effects: Sequence[Effect]) -> dict[int, MmdError]:
    return {e.ticket: e.error for e in effects if isinstance(e, Fail)}


def loads(effects: Sequence[Effect]) -> list[StartLoad]:
    return [e for e in effects if isinstance(e, StartLoad)]


def stops(effects: Sequence[Effect]) -> list[tuple[str, str]]:
    """(model, reason), an eviction's reason written with the model it makes room for."""
    return [
        (e.model_id, f"{e.reason} for {e.beneficiary}" if e.beneficiary else e.reason)
        for e in effects
        if isinstance(e, Stop)
    ]


def timers(effects: Sequence[Effect]) -> list[tuple[str, float]]:
    return [(e.model_id, e.at) for e in effects if isinstance(e, ArmTimer)]


def load(core: Scheduler, model_id: str, now: float = 0.0) -> list[Effect]:
    """An explicit load that completes at ``now``; returns the load_done effects."""
    ticket, effects = core.submit(model_id, Kind.LOAD, now)
    assert [s.model_id for s in loads(effects)] == [model_id]
    done = core.load_done(model_id, now)
    assert ticket in admitted(done)
    return done


def run(core: Scheduler, model_id: str, now: float, keep_alive: float | None = None) -> int:
    """Submit a request that must be admitted at once; returns its ticket."""
    ticket, effects = core.submit(model_id, Kind.INFER, now, keep_alive=keep_alive)
    assert admitted(effects) == [ticket]
    return ticket


def queue(core: Scheduler, model_id: str, now: float) -> int:
    """Submit a request that must wait; returns its ticket."""
    ticket, effects = core.submit(model_id, Kind.INFER, now)
    assert ticket not in admitted(effects)
    assert ticket not in failed(effects)
    return ticket


# --- loading and admission ----------------------------------------------------------------


def test_many_requests_for_an_unloaded_model_start_one_load() -> None:
    core = make({"a": 4})
    _ticket, effects = core.submit("a", Kind.INFER, 1.0)
    assert effects == [StartLoad("a", loads(effects)[0].placement, ())]
    assert loads(effects)[0].placement.usage == {"ram": 4 * GIB}
    assert state_of(core, "a") is State.LOADING
    for now in (2.0, 3.0):
        assert core.submit("a", Kind.INFER, now)[1] == []
    assert (core.models["a"].queued, core.active_total) == (3, 0)


def test_load_done_admits_up_to_parallel_and_request_done_admits_the_next() -> None:
    core = make({"a": 4}, specs={"a": {"parallel": 2}})
    tickets = [core.submit("a", Kind.INFER, float(i))[0] for i in range(3)]
    effects = core.load_done("a", 5.0)
    assert admitted(effects) == tickets[:2]
    assert (core.models["a"].queued, core.models["a"].active) == (1, 2)
    assert timers(effects) == []  # work is queued: no idle timer
    assert admitted(core.request_done(tickets[0], 6.0)) == [tickets[2]]
    assert core.active_total == 2


def test_max_concurrent_is_global_across_models() -> None:
    core = make({"a": 4, "b": 4}, specs={m: {"parallel": 2} for m in "ab"}, max_concurrent=2)
    load(core, "a")
    load(core, "b")
    first = run(core, "a", 1.0)
    run(core, "a", 2.0)
    waiting = queue(core, "b", 3.0)  # b has free slots, but two requests run in all
    assert core.active_total == 2
    assert admitted(core.request_done(first, 4.0)) == [waiting]


def test_oldest_request_goes_first_across_models() -> None:
    core = make({"a": 4, "b": 4}, max_concurrent=1)
    load(core, "a")
    load(core, "b")
    running = run(core, "a", 1.0)
    order = [queue(core, "b", 2.0), queue(core, "a", 3.0), queue(core, "b", 4.0)]
    served = []
    for step, ticket in enumerate([running, *order[:-1]]):
        served += admitted(core.request_done(ticket, 10.0 + step))
    assert served == order


def test_queue_full_refuses_waiting_requests_but_not_one_that_runs_at_once() -> None:
    core = make({"a": 4, "b": 4, "c": 1}, max_queue=2)
    load(core, "a")
    load(core, "b")
    run(core, "a", 1.0)
    queue(core, "a", 2.0)
    queue(core, "a", 3.0)
    with pytest.raises(QueueFull, match="queue full"):
        core.submit("a", Kind.INFER, 4.0)
    with pytest.raises(QueueFull):
        core.submit("c", Kind.INFER, 4.0)  # unloaded: it would have to wait
    run(core, "b", 5.0)  # a free slot on a ready model: accepted although the queue is full
    assert core.queued_total == 2


def test_autoload_off_refuses_unloaded_models_but_explicit_load_works() -> None:
    core = make({"a": 4}, autoload=False)
    with pytest.raises(FailedPrecondition, match="autoload is off"):
        core.submit("a", Kind.INFER, 0.0)
    assert state_of(core, "a") is State.UNLOADED
    assert core.tickets == {}
    load(core, "a", 1.0)
    run(core, "a", 2.0)


def test_embed_needs_an_embedding_model_and_unknown_models_are_refused() -> None:
    core = make({"chat": 1, "emb": 1}, specs={"emb": {"embedding": True}})
    with pytest.raises(FailedPrecondition, match="not an embedding model"):
        core.submit("chat", Kind.EMBED, 0.0)
    assert loads(core.submit("emb", Kind.EMBED, 0.0)[1])
    with pytest.raises(UnknownModel):
        core.submit("nope", Kind.INFER, 0.0)


def test_ready_model_is_served_while_another_loads() -> None:
    core = make({"a": 4, "b": 4})
    load(core, "b")
    queue(core, "a", 1.0)
    assert state_of(core, "a") is State.LOADING
    run(core, "b", 2.0)  # no head-of-line blocking behind a's load


def test_load_of_a_ready_model_is_done_at_once() -> None:
    core = make({"a": 4})
    load(core, "a")
    ticket, effects = core.submit("a", Kind.LOAD, 1.0)
    assert effects == [Admit(ticket)]
    with pytest.raises(FailedPrecondition, match="GPU layers"):
        core.submit("a", Kind.LOAD, 1.0, gpu_layers=3)


# --- failures -----------------------------------------------------------------------------


def test_load_failure_fails_every_waiter_and_backs_off() -> None:
    core = make({"a": 4})
    tickets = [core.submit("a", Kind.INFER, 0.0)[0], core.submit("a", Kind.INFER, 0.0)[0]]
    tickets.append(core.submit("a", Kind.LOAD, 0.0)[0])
    error = RuntimeFailed("bad file")
    effects = core.load_done("a", 1.0, error)
    assert failed(effects) == dict.fromkeys(tickets, error)
    entry = core.models["a"]
    assert (entry.state, entry.last_error, entry.queued, core.tickets) == (
        State.FAILED,
        "bad file",
        0,
        {},
    )
    # The first failure retries at once; the second waits 2 s.
    assert loads(core.submit("a", Kind.INFER, 1.0)[1])
    core.load_done("a", 1.5, error)
    with pytest.raises(RuntimeFailed, match="2 times in a row"):
        core.submit("a", Kind.INFER, 3.0)
    ticket, effects = core.submit("a", Kind.INFER, 3.5)
    assert loads(effects)
    # Once it has stayed ready for a minute, earlier failures are forgotten.
    core.load_done("a", 4.0)
    core.request_done(ticket, 100.0)
    core.unload("a", 101.0, force=False)
    core.stopped("a", 102.0)
    core.submit("a", Kind.INFER, 103.0)
    core.load_done("a", 104.0, error)
    assert core.models["a"].retry_after == 104.0  # a first failure again: retry at once


def test_crash_aborts_running_reloads_for_queued_and_backs_off_when_repeated() -> None:
    core = make({"a": 4})
    load(core, "a")
    running = run(core, "a", 1.0)
    waiting = queue(core, "a", 2.0)
    effects = core.crashed("a", 3.0, "killed by SIGSEGV")
    aborts = [e for e in effects if isinstance(e, AbortRunning)]
    assert [a.model_id for a in aborts] == ["a"]
    assert "SIGSEGV" in aborts[0].error.message
    assert loads(effects)
    assert state_of(core, "a") is State.LOADING
    assert failed(effects) == {}
    core.request_done(running, 3.1)  # the aborted request ends
    assert admitted(core.load_done("a", 4.0)) == [waiting]
    # It crashes again soon after: the queued request is refused and reloads wait 2 s.
    queued = queue(core, "a", 5.0)
    effects = core.crashed("a", 6.0, "exited with status 1")
    assert isinstance(failed(effects)[queued], RuntimeFailed)
    assert loads(effects) == []
    assert state_of(core, "a") is State.FAILED
    core.request_done(waiting, 6.1)
    with pytest.raises(RuntimeFailed, match="next retry in 2s"):
        core.submit("a", Kind.INFER, 6.2)
    third = queue(core, "a", 8.0)
    assert admitted(core.load_done("a", 8.5)) == [third]
    core.crashed("a", 9.0, "exited with status 1")
    core.request_done(third, 9.1)
    assert core.models["a"].retry_after == 13.0  # 3rd crash in a row: 4 s
    # A model that ran for a long while before crashing reloads at once again.
    core.submit("a", Kind.LOAD, 13.0)
    core.load_done("a", 13.5)
    run(core, "a", 1000.0)
    queue(core, "a", 1000.5)
    effects = core.crashed("a", 1001.0, "exited with status 1")
    assert loads(effects)
    assert failed(effects) == {}


def test_crash_without_waiters_leaves_the_model_failed_until_asked_again() -> None:
    core = make({"a": 4})
    load(core, "a")
    effects = core.crashed("a", 1.0, "exited with status 2")
    assert (effects, state_of(core, "a"), core.models["a"].usage) == ([], State.FAILED, {})
    assert loads(core.submit("a", Kind.INFER, 1.5)[1])  # the first crash retries at once


# --- eviction and memory ------------------------------------------------------------------


def test_load_evicts_the_least_recently_used_idle_model() -> None:
    core = make({"a": 4, "b": 4, "c": 4})
    load(core, "a", 0.0)
    load(core, "b", 1.0)
    core.request_done(run(core, "a", 2.0), 3.0)  # a is now more recent than b
    effects = core.submit("c", Kind.INFER, 4.0)[1]
    assert stops(effects) == [("b", "evicted for c")]
    assert loads(effects)[0].after == ("b",)
    assert state_of(core, "b") is State.UNLOADING
    assert core.stopped("b", 5.0) == []
    assert state_of(core, "b") is State.UNLOADED


def test_an_eviction_stops_at_once_and_an_unload_with_a_grace_period() -> None:
    core = make({"a": 4, "b": 4, "c": 4})
    load(core, "a", 0.0)
    load(core, "b", 1.0)
    (evict,) = [e for e in core.submit("c", Kind.INFER, 2.0)[1] if isinstance(e, Stop)]
    assert (evict.model_id, evict.at_once) == ("a", True)  # idle, and a load waits for it
    (unload,) = [e for e in core.unload("b", 3.0, force=False) if isinstance(e, Stop)]
    assert (unload.model_id, unload.at_once) == ("b", False)


def test_eviction_spares_pinned_and_busy_models() -> None:
    core = make({"p": 4, "busy": 4, "idle": 4, "new": 4}, budget=12, specs={"p": {"priority": 0}})
    load(core, "p", 0.0)
    load(core, "busy", 1.0)
    load(core, "idle", 5.0)
    run(core, "busy", 6.0)
    effects = core.submit("new", Kind.INFER, 7.0)[1]
    assert stops(effects) == [("idle", "evicted for new")]
    assert loads(effects)[0].after == ("idle",)


def test_load_that_never_fits_is_refused_with_the_numbers() -> None:
    core = make({"huge": 12, "a": 6, "p": 6}, specs={"p": {"priority": 0}})
    ticket, effects = core.submit("huge", Kind.INFER, 0.0)
    error = failed(effects)[ticket]
    assert isinstance(error, InsufficientMemory)
    assert "needs ram 12.0 GiB (CPU only); budget ram 10.0 GiB" in error.message
    assert (state_of(core, "huge"), core.queued_total) == (State.UNLOADED, 0)
    load(core, "p")  # pinned: a cannot fit while p stays loaded
    ticket, effects = core.submit("a", Kind.INFER, 1.0)
    error = failed(effects)[ticket]
    assert isinstance(error, InsufficientMemory)
    assert "pinned: p" in error.message


def test_swap_waits_for_a_busy_model_to_serve_its_batch_then_swaps_back() -> None:
    core = make({"a": 6, "b": 6}, swap_batch=2)
    load(core, "a")
    running = run(core, "a", 1.0)
    a_queued = [queue(core, "a", 2.0 + i) for i in range(4)]
    b_ticket, effects = core.submit("b", Kind.INFER, 10.0)
    assert (effects, state_of(core, "b"), core.models["a"].drain_for) == ([], State.UNLOADED, "b")
    # a serves swap_batch more of its queue, then is swapped out when idle.
    assert admitted(core.request_done(running, 11.0)) == [a_queued[0]]
    assert admitted(core.request_done(a_queued[0], 12.0)) == [a_queued[1]]
    effects = core.request_done(a_queued[1], 13.0)
    assert admitted(effects) == []
    assert stops(effects) == [("a", "evicted for b")]
    assert loads(effects)[0].after == ("a",)
    # a's remaining requests wait for b in turn instead of being refused.
    assert core.stopped("a", 14.0) == []
    assert (core.models["a"].queued, core.models["b"].drain_for) == (2, "a")
    assert state_of(core, "b") is State.LOADING
    effects = core.load_done("b", 15.0)
    assert admitted(effects) == [b_ticket]
    effects = core.request_done(b_ticket, 16.0)
    assert stops(effects) == [("b", "evicted for a")]
    core.stopped("b", 17.0)
    assert admitted(core.load_done("a", 18.0)) == a_queued[2:3]


def test_a_model_with_queued_work_stays_for_its_minimum_residency() -> None:
    core = make({"a": 6, "b": 6}, swap_batch=1, min_residency=30.0)
    load(core, "a", 0.0)
    running = run(core, "a", 1.0)
    a_queued = [queue(core, "a", 2.0 + i) for i in range(3)]
    queue(core, "b", 5.0)
    assert admitted(core.request_done(running, 6.0)) == [a_queued[0]]
    # Its batch is served, but it became ready only 7 s ago: it keeps its memory.
    effects = core.request_done(a_queued[0], 7.0)
    assert (stops(effects), loads(effects)) == ([], [])
    assert state_of(core, "a") is State.READY
    # Once the residency has passed, the next pump swaps it out.
    effects = core.pump(31.0)
    assert stops(effects) == [("a", "evicted for b")]
    assert [s.model_id for s in loads(effects)] == ["b"]


def test_second_model_waits_while_the_first_loads_or_unloads() -> None:
    core = make({"a": 6, "b": 6})
    a_ticket = queue(core, "a", 0.0)
    b_ticket = queue(core, "b", 1.0)  # a is loading: b waits, it is not refused
    assert state_of(core, "b") is State.UNLOADED
    assert core.models["a"].drain_for == "b"
    assert admitted(core.load_done("a", 2.0)) == [a_ticket]
    effects = core.request_done(a_ticket, 3.0)
    assert stops(effects) == [("a", "evicted for b")]
    assert loads(effects)[0].model_id == "b"
    core.stopped("a", 4.0)
    assert admitted(core.load_done("b", 5.0)) == [b_ticket]
    # An idle stop in progress: the new request waits for the memory it frees.
    core.request_done(b_ticket, 6.0)
    assert stops(core.idle_check("b", 1000.0)) == [("b", "idle")]
    queue(core, "a", 1001.0)
    assert state_of(core, "a") is State.UNLOADED
    assert loads(core.stopped("b", 1002.0))[0].model_id == "a"


def test_failed_model_waiting_for_room_loads_when_room_frees() -> None:
    core = make({"a": 6, "b": 6})
    core.submit("a", Kind.LOAD, 0.0)
    core.load_done("a", 0.5, RuntimeFailed("boom"))  # 1st failure: may retry at once
    load(core, "b", 1.0)
    b_running = run(core, "b", 2.0)
    a_ticket = queue(core, "a", 3.0)  # waits for b to drain
    effects = core.request_done(b_running, 4.0)
    assert stops(effects) == [("b", "evicted for a")]
    assert [s.model_id for s in loads(effects)] == ["a"]
    core.stopped("b", 5.0)
    assert admitted(core.load_done("a", 6.0)) == [a_ticket]


def test_cancelled_waiter_releases_the_draining_model() -> None:
    core = make({"a": 6, "b": 6}, swap_batch=1)
    load(core, "a")
    running = run(core, "a", 1.0)
    a_queued = [queue(core, "a", 2.0), queue(core, "a", 3.0)]
    b_ticket = queue(core, "b", 4.0)
    assert core.cancel(b_ticket, 5.0) == []
    assert admitted(core.request_done(running, 6.0)) == a_queued[:1]
    assert admitted(core.request_done(a_queued[0], 7.0)) == a_queued[1:]  # nobody waits now
    assert core.models["a"].drain_for is None


# --- learned footprints and runtime figures -----------------------------------------------


def test_a_learned_footprint_places_a_model_the_estimate_would_refuse() -> None:
    core = make({"a": 12}, budget=10)
    ticket, effects = core.submit("a", Kind.LOAD, 0.0)
    assert isinstance(failed(effects)[ticket], InsufficientMemory)

    core.set_learned("a", (LearnedBytes(0, 0, 8 * GIB),))
    _ticket, effects = core.submit("a", Kind.LOAD, 1.0)
    (start,) = loads(effects)
    assert start.placement.usage == {"ram": 8 * GIB}
    assert start.placement.source == "learned"


def test_learned_figures_for_a_pending_spec_wait_for_it() -> None:
    core = make({"a": 4})
    load(core, "a")
    changed = ModelSpec(id="a", path=Path("a.gguf"), ctx=8192)
    core.update_spec(changed, footprint(6))
    core.set_learned("a", (LearnedBytes(0, 0, 5 * GIB),), pending=True)
    assert core.models["a"].footprint.learned == ()  # the running child's settings
    core.unload("a", 1.0, force=False)
    core.stopped("a", 2.0)
    _ticket, effects = core.submit("a", Kind.LOAD, 3.0)
    assert loads(effects)[0].placement.usage == {"ram": 5 * GIB}
    assert core.models["a"].spec.ctx == 8192


def test_runtime_figures_last_as_long_as_the_process() -> None:
    core = make({"a": 4})
    core.set_runtime("a", {"ram": GIB})
    assert core.models["a"].runtime == {}  # nothing loaded: nothing to report
    load(core, "a")
    core.set_runtime("a", {"ram": 3 * GIB})
    assert core.models["a"].runtime == {"ram": 3 * GIB}
    core.unload("a", 1.0, force=False)
    core.stopped("a", 2.0)
    assert core.models["a"].runtime == {}
    load(core, "a", 3.0)
    core.set_runtime("a", {"ram": 3 * GIB})
    core.crashed("a", 4.0, "killed by SIGKILL")
    assert core.models["a"].runtime == {}


# --- keep-alive ---------------------------------------------------------------------------


def test_idle_timer_uses_the_models_keep_alive_after_the_last_request() -> None:
    core = make({"a": 4}, specs={"a": {"parallel": 2, "keep_alive": 30.0}})
    load(core, "a")
    first, second = run(core, "a", 1.0), run(core, "a", 2.0)
    assert timers(core.request_done(first, 3.0)) == []  # another one still runs
    assert timers(core.request_done(second, 4.0)) == [("a", 34.0)]
    assert core.idle_check("a", 33.9) == []
    third = run(core, "a", 33.95)  # a new request clears the deadline
    assert core.idle_check("a", 34.0) == []
    assert timers(core.request_done(third, 40.0)) == [("a", 70.0)]
    assert stops(core.idle_check("a", 70.0)) == [("a", "idle")]


def test_default_keep_alive_applies_when_the_model_sets_none() -> None:
    core = make({"a": 4}, default_keep_alive=7.0)
    assert timers(load(core, "a", 1.0)) == [("a", 8.0)]  # idle right after an explicit load


def test_request_keep_alive_wins_for_one_idle_period_only() -> None:
    core = make({"a": 4}, specs={"a": {"keep_alive": 30.0}})
    load(core, "a")
    assert timers(core.request_done(run(core, "a", 1.0, keep_alive=5.0), 2.0)) == [("a", 7.0)]
    assert core.models["a"].spec.keep_alive == 30.0
    assert timers(core.request_done(run(core, "a", 3.0), 4.0)) == [("a", 34.0)]
    assert core.idle_check("a", 7.0) == []  # the old deadline no longer applies


def test_keep_alive_zero_stops_at_once_and_negative_never() -> None:
    core = make({"now": 2, "never": 2}, specs={"never": {"keep_alive": -1.0}})
    load(core, "now")
    load(core, "never")
    effects = core.request_done(run(core, "now", 1.0, keep_alive=0.0), 2.0)
    assert stops(effects) == [("now", "idle")]
    assert timers(effects) == []
    assert core.request_done(run(core, "never", 3.0), 4.0) == []
    assert core.idle_check("never", 1e9) == []


def test_pinned_model_gets_no_idle_timer() -> None:
    core = make({"p": 2}, specs={"p": {"priority": 0, "keep_alive": 1.0}})
    load(core, "p")
    assert core.request_done(run(core, "p", 1.0, keep_alive=0.0), 2.0) == []
    assert core.idle_check("p", 1e9) == []
    assert state_of(core, "p") is State.READY


# --- cancel, unload, shutdown -------------------------------------------------------------


def test_cancel_removes_a_queued_ticket() -> None:
    core = make({"a": 4, "b": 4}, specs={"a": {"keep_alive": 10.0}}, max_concurrent=1)
    gone, kept = queue(core, "a", 0.0), queue(core, "a", 1.0)
    waiter = core.submit("a", Kind.LOAD, 1.5)[0]
    assert core.cancel(gone, 2.0) == []
    assert core.cancel(waiter, 2.0) == []  # an explicit load's waiter goes too
    assert admitted(core.load_done("a", 3.0)) == [kept]
    assert core.cancel(gone, 4.0) == []  # twice is harmless
    # The last queued ticket of an idle model going away arms its idle timer.
    load(core, "b", 5.0)
    core.request_done(kept, 6.0)
    run(core, "b", 7.0)
    late = queue(core, "a", 8.0)  # a is idle, but max_concurrent is reached
    assert timers(core.cancel(late, 9.0)) == [("a", 19.0)]


def test_unload_waits_for_running_requests_and_refuses_queued_ones() -> None:
    core = make({"a": 4}, specs={"a": {"parallel": 2}})
    load(core, "a")
    first, second = run(core, "a", 1.0), run(core, "a", 2.0)
    waiting = queue(core, "a", 3.0)
    effects = core.unload("a", 4.0, force=False)
    assert isinstance(failed(effects)[waiting], RequestAborted)
    assert stops(effects) == []
    assert core.models["a"].unload_requested
    with pytest.raises(FailedPrecondition, match="being unloaded"):
        core.submit("a", Kind.INFER, 5.0)
    assert core.request_done(first, 6.0) == []
    assert stops(core.request_done(second, 7.0)) == [("a", "unload")]
    ticket = queue(core, "a", 7.5)  # asked for again while it stops: reloaded once stopped
    assert loads(core.stopped("a", 8.0))[0].model_id == "a"
    assert admitted(core.load_done("a", 9.0)) == [ticket]


def test_forced_unload_aborts_running_requests() -> None:
    core = make({"a": 4})
    load(core, "a")
    run(core, "a", 1.0)
    effects = core.unload("a", 2.0, force=True)
    assert [type(e) for e in effects] == [AbortRunning, Stop]
    assert stops(effects) == [("a", "forced unload")]


def test_unload_of_loading_failed_and_unloaded_models() -> None:
    core = make({"a": 4, "b": 4})
    ticket = queue(core, "a", 0.0)
    effects = core.unload("a", 1.0, force=False)
    assert isinstance(failed(effects)[ticket], RequestAborted)
    assert stops(effects) == [("a", "unload")]
    assert core.load_done("a", 2.0) == []  # the cancelled load reports late: ignored
    core.stopped("a", 3.0)
    assert core.unload("a", 4.0, force=False) == []
    core.submit("b", Kind.LOAD, 5.0)
    core.load_done("b", 6.0, RuntimeFailed("boom"))
    assert core.unload("b", 7.0, force=False) == []
    assert state_of(core, "b") is State.UNLOADED


def test_cancel_unload_lets_the_model_serve_again() -> None:
    core = make({"a": 4})
    load(core, "a")
    running = run(core, "a", 1.0)
    core.unload("a", 2.0, force=False)
    assert core.cancel_unload("a", 3.0) == []
    waiting = queue(core, "a", 4.0)
    assert admitted(core.request_done(running, 5.0)) == [waiting]
    assert state_of(core, "a") is State.READY


def test_shutdown_refuses_everything_and_stops_loaded_models() -> None:
    core = make({"a": 4, "b": 4, "c": 1}, specs={"a": {"parallel": 1}})
    load(core, "a")
    run(core, "a", 1.0)
    waiting = queue(core, "a", 2.0)
    loading = queue(core, "b", 3.0)
    effects = core.shutdown()
    assert set(failed(effects)) == {waiting, loading}
    assert all(isinstance(e, RequestAborted) for e in failed(effects).values())
    assert [e.model_id for e in effects if isinstance(e, AbortRunning)] == ["a"]
    assert sorted(stops(effects)) == [("a", "shutdown"), ("b", "shutdown")]
    for model_id in ("a", "c"):
        with pytest.raises(RequestAborted, match="shutting down"):
            core.submit(model_id, Kind.INFER, 4.0)
    with pytest.raises(RequestAborted):
        core.submit("c", Kind.LOAD, 4.0)
    assert core.stopped("a", 5.0) + core.stopped("b", 5.0) == []


# --- the headroom gate --------------------------------------------------------------------


def test_headroom_gate_blocks_a_second_request_but_never_the_first() -> None:
    core = make({"a": 4}, specs={"a": {"parallel": 2}})
    load(core, "a")
    core.update_devices(core.devices, frozenset({"ram"}))
    first = run(core, "a", 1.0)  # nothing runs on the model: always allowed
    second = queue(core, "a", 2.0)
    assert core.pump(3.0) == []
    core.update_devices(core.devices, frozenset())
    assert core.pump(4.0) == [Admit(second)]
    core.request_done(first, 5.0)
    core.request_done(second, 6.0)
    core.update_devices(core.devices, frozenset({"gpu0"}))  # another device: no effect
    run(core, "a", 7.0)
    run(core, "a", 8.0)


# --- random event sequences ---------------------------------------------------------------

SIZES = {"a": 4.0, "b": 5.0, "c": 6.0, "p": 3.0, "huge": 11.0}
SPECS: dict[str, dict[str, Any]] = {
    "a": {"parallel": 2},
    "b": {"embedding": True, "keep_alive": 0.0},
    "c": {"keep_alive": -1.0},
    "p": {"priority": 0},
}
BUDGET = 10.0
LIMITS = {"max_concurrent": 3, "max_queue": 4, "swap_batch": 2, "default_keep_alive": 5.0}
MODELS = st.sampled_from(sorted(SIZES))


class SchedulerMachine(RuleBasedStateMachine):
    """Plays the engine: honours effects the way mmd.engine does and keeps a ledger."""

    def __init__(self) -> None:
        super().__init__()
        self.core = make(SIZES, BUDGET, SPECS, **LIMITS)
        self.now = 0.0
        self.outcome: dict[int, str] = {}  # ticket -> "admitted" | "failed" | "cancelled"
        self.kinds: dict[int, Kind] = {}
        self.model_of: dict[int, str] = {}
        self.running: dict[int, str] = {}  # admitted requests not done yet -> model
        self.pending_after: dict[str, set[str]] = {}  # loads waiting for victims to stop
        self.present: set[str] = set()  # models whose child process exists

    def apply(self, effects: Sequence[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Admit | Fail):
                assert effect.ticket in self.kinds, effect
                assert effect.ticket not in self.outcome, f"ticket ended twice: {effect}"
            match effect:
                case Admit(ticket):
                    self.outcome[ticket] = "admitted"
                    model_id = self.model_of[ticket]
                    if self.kinds[ticket] is Kind.LOAD:  # keep_alive 0 may stop it right after
                        assert state_of(self.core, model_id) in (State.READY, State.UNLOADING)
                    else:
                        assert state_of(self.core, model_id) is State.READY
                        self.running[ticket] = model_id
                case Fail(ticket, error):
                    self.outcome[ticket] = "failed"
                    if isinstance(error, InsufficientMemory):
                        self.check_never_fits(self.model_of[ticket])
                case StartLoad(model_id, _, after, replaced):
                    self.pending_after[model_id] = {*after, *replaced}
                    self.spawn_ready_loads()
                case Stop(model_id, reason):
                    if self.core.models[model_id].spec.pinned:
                        # Never evicted nor idled out; with a CPU budget it may be re-placed
                        # (restarted on fewer cores, loaded again at once).
                        allowed = ["unload", "forced unload", "shutdown"]
                        if self.core.cpu_budget is not None:
                            allowed.append("re-placed")
                        assert reason in allowed, reason

    def check_never_fits(self, model_id: str) -> None:
        """Memory refusals are for models that cannot fit beside the pinned ones."""
        pinned = self.present | {m for m, e in self.core.models.items() if e.holds_memory}
        held = sum(SIZES[m] for m in pinned if self.core.models[m].spec.pinned)
        assert SIZES[model_id] + held > BUDGET, f"{model_id} refused beside {pinned}"

    def spawn_ready_loads(self) -> None:
        for model_id, after in self.pending_after.items():
            if not after and self.core.models[model_id].state is State.LOADING:
                self.present.add(model_id)

    # --- events ---

    @rule(
        model_id=MODELS,
        kind=st.sampled_from([Kind.INFER, Kind.INFER, Kind.EMBED, Kind.LOAD]),
        keep_alive=st.sampled_from([None, None, 0.0, 3.0, -1.0]),
        dt=st.sampled_from([0.0, 0.5, 3.0]),
    )
    def submit(self, model_id: str, kind: Kind, keep_alive: float | None, dt: float) -> None:
        self.now += dt
        try:
            ticket, effects = self.core.submit(model_id, kind, self.now, keep_alive)
        except MmdError:
            return
        self.kinds[ticket] = kind
        self.model_of[ticket] = model_id
        self.apply(effects)

    @rule(model_id=MODELS)
    def submit_infer(self, model_id: str) -> None:  # requests are the most common event
        self.submit(model_id, Kind.INFER, None, 0.5)

    def in_state(self, state: State) -> list[str]:
        return [m for m, entry in self.core.models.items() if entry.state is state]

    def startable(self) -> list[str]:
        """Loading models whose child the engine has started (their victims have stopped)."""
        return [m for m in self.in_state(State.LOADING) if not self.pending_after.get(m)]

    @precondition(lambda self: self.startable())
    @rule(data=st.data(), ok=st.sampled_from([True, True, True, False]))
    def load_done(self, data: st.DataObject, ok: bool) -> None:
        self.finish_load(data.draw(st.sampled_from(self.startable())), ok)

    def finish_load(self, model_id: str, ok: bool) -> None:
        self.now += 1.0
        self.apply(self.core.load_done(model_id, self.now, None if ok else RuntimeFailed("x")))

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def request_done(self, data: st.DataObject) -> None:
        ticket = data.draw(st.sampled_from(sorted(self.running)))
        del self.running[ticket]
        self.now += 0.5
        self.apply(self.core.request_done(ticket, self.now))

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        waiting = sorted(set(self.kinds) - set(self.outcome))
        if not waiting:
            return
        ticket = data.draw(st.sampled_from(waiting))
        self.outcome[ticket] = "cancelled"
        self.apply(self.core.cancel(ticket, self.now))

    @precondition(lambda self: self.in_state(State.READY))
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        model_id = data.draw(st.sampled_from(self.in_state(State.READY)))
        self.now += 0.5
        self.apply(self.core.crashed(model_id, self.now, "exited with status 1"))

    @precondition(lambda self: self.in_state(State.READY))
    @rule(data=st.data(), dt=st.sampled_from([1.0, 10.0]))
    def idle_check(self, data: st.DataObject, dt: float) -> None:
        self.now += dt
        model_id = data.draw(st.sampled_from(self.in_state(State.READY)))
        self.apply(self.core.idle_check(model_id, self.now))

    @precondition(lambda self: self.in_state(State.UNLOADING))
    @rule(data=st.data())
    def stop_done(self, data: st.DataObject) -> None:
        self.stopped(data.draw(st.sampled_from(self.in_state(State.UNLOADING))))

    def stopped(self, model_id: str) -> None:
        self.present.discard(model_id)
        for after in self.pending_after.values():
            after.discard(model_id)
        self.spawn_ready_loads()
        self.apply(self.core.stopped(model_id, self.now))

    @rule(model_id=MODELS, force=st.booleans())
    def unload(self, model_id: str, force: bool) -> None:
        self.apply(self.core.unload(model_id, self.now, force=force))

    @precondition(lambda self: any(m.unload_requested for m in self.core.models.values()))
    @rule(model_id=MODELS)
    def cancel_unload(self, model_id: str) -> None:
        self.apply(self.core.cancel_unload(model_id, self.now))

    @rule(dt=st.sampled_from([1.0, 6.0]))
    def sample(self, dt: float) -> None:
        """The engine pumps after each memory sample (once a second): time-based
        conditions such as min_residency are re-checked there."""
        self.now += dt
        self.apply(self.core.pump(self.now))

    @rule(low=st.booleans())
    def memory_pressure(self, low: bool) -> None:
        self.core.update_devices(self.core.devices, frozenset({"ram"} if low else ()))
        self.apply(self.core.pump(self.now))

    # --- invariants ---

    @invariant()
    def counters_and_memory_hold(self) -> None:
        entries = self.core.models.values()
        assert self.core.active_total == sum(m.active for m in entries)
        assert all(m.active <= m.spec.parallel for m in entries)
        assert self.core.active_total <= self.core.settings.max_concurrent
        self.present = {m for m in self.present if self.core.models[m].holds_memory}
        held = sum(self.core.models[m].usage.get("ram", 0) for m in self.present)
        assert held <= BUDGET * GIB, (self.present, held)
        for model_id, entry in self.core.models.items():
            running = sum(1 for m in self.running.values() if m == model_id)
            assert entry.active == running, (model_id, entry.active, running)

    def teardown(self) -> None:
        """Let every load, request and stop finish: then every ticket has ended."""
        if len(self.kinds) % 2:  # shut down with work in flight in about half of the runs
            self.apply(self.core.shutdown())
        self.core.update_devices(self.core.devices, frozenset())
        self.apply(self.core.pump(self.now))
        for _ in range(50):
            if not (self.running or set(self.kinds) - set(self.outcome)):
                break
            self.now += 100.0
            for model_id in sorted(SIZES):
                if model_id in self.startable():
                    self.finish_load(model_id, ok=True)
                if state_of(self.core, model_id) is State.UNLOADING:
                    self.stopped(model_id)
                self.apply(self.core.idle_check(model_id, self.now))
            for ticket in sorted(self.running):
                del self.running[ticket]
                self.apply(self.core.request_done(ticket, self.now))
            self.apply(self.core.pump(self.now))  # the engine's once-a-second sample
            self.counters_and_memory_hold()
        assert (self.running, self.core.active_total) == ({}, 0)
        assert set(self.kinds) == set(self.outcome), set(self.kinds) - set(self.outcome)


SchedulerMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None
)
test_random_event_sequences = SchedulerMachine.TestCase


def test_cancel_of_a_request_admitted_in_the_same_instant_gives_its_slot_back() -> None:
    core = make({"a": 4}, specs={"a": {"parallel": 1}})
    load(core, "a")
    running = run(core, "a", 1.0)
    waiting = queue(core, "a", 2.0)
    # The running request ends and admits the waiting one, whose client has just gone.
    assert admitted(core.request_done(running, 3.0)) == [waiting]
    core.cancel(waiting, 3.0)
    assert (core.models["a"].active, core.active_total) == (0, 0)
    assert run(core, "a", 4.0)  # the slot is free again
