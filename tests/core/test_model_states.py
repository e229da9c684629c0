"""A model's state machine: the transition table itself, every move in it made by the
scheduler through its public calls, and random call sequences that never make a move the
table does not allow.

The random sequences here call the scheduler in any order, including calls the engine
would not make at that moment (a load_done for a model that is not loading, a stop report
for one that is not stopping): each must be ignored or handled, never a bad move.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from test_scheduler import admitted, footprint, make

from mmd.core.effects import Effect, Fail, Kind, Stop
from mmd.core.errors import MmdError, RuntimeFailed, UnknownModel
from mmd.core.model_state import ALLOWED, InvalidTransition, ModelEntry, State
from mmd.core.scheduler import Scheduler
from mmd.core.spec import ModelSpec

Move = tuple[State, State]
EVERY_MOVE: frozenset[Move] = frozenset((old, new) for old in ALLOWED for new in ALLOWED[old])


def path_to(target: State) -> list[State]:
    """The shortest run of allowed moves from UNLOADED (where every model starts)."""
    paths: dict[State, list[State]] = {State.UNLOADED: []}
    todo = deque([State.UNLOADED])
    while todo:
        state = todo.popleft()
        for new in sorted(ALLOWED[state], key=lambda s: s.value):
            if new not in paths:
                paths[new] = [*paths[state], new]
                todo.append(new)
    return paths[target]


def entry_in(state: State) -> ModelEntry:
    entry = ModelEntry(ModelSpec(id="m", path=Path("m.gguf")), footprint(1))
    for step in path_to(state):
        entry.move(step)
    assert entry.state is state
    return entry


# --- the table --------------------------------------------------------------------------


def test_every_state_has_a_row_and_is_reachable() -> None:
    assert set(ALLOWED) == set(State)
    for state in State:
        assert entry_in(state).state is state


@pytest.mark.parametrize(("old", "new"), sorted(EVERY_MOVE, key=lambda m: (m[0].value, m[1].value)))
def test_each_allowed_move_is_made(old: State, new: State) -> None:
    entry = entry_in(old)
    entry.move(new)
    assert entry.state is new


@pytest.mark.parametrize(
    ("old", "new"),
    sorted(
        set(itertools.product(State, State)) - EVERY_MOVE,
        key=lambda m: (m[0].value, m[1].value),
    ),
)
def test_a_move_the_table_lacks_raises_and_changes_nothing(old: State, new: State) -> None:
    entry = entry_in(old)
    with pytest.raises(InvalidTransition) as raised:
        entry.move(new)
    assert entry.state is old
    assert (raised.value.old, raised.value.new) == (old, new)
    assert f"from {old.value} to {new.value}" in str(raised.value)


def test_an_invalid_move_is_a_bug_not_a_client_error() -> None:
    assert issubclass(InvalidTransition, AssertionError)
    assert not issubclass(InvalidTransition, MmdError)  # never answered as a gRPC status


def test_state_changes_only_through_move() -> None:
    entry = entry_in(State.UNLOADED)
    with pytest.raises(AttributeError):
        entry.state = State.READY  # type: ignore[misc]


# --- every move in the table is one the scheduler makes -----------------------------------


@pytest.fixture
def moves(monkeypatch: pytest.MonkeyPatch) -> set[Move]:
    """The moves made while the test runs."""
    seen: set[Move] = set()
    original = ModelEntry.move

    def recording(self: ModelEntry, new: State) -> None:
        old = self.state
        original(self, new)
        seen.add((old, new))

    monkeypatch.setattr(ModelEntry, "move", recording)
    return seen


def load_ready(core: Scheduler, model_id: str, now: float = 0.0) -> None:
    core.submit(model_id, Kind.LOAD, now)
    core.load_done(model_id, now)
    assert core.models[model_id].state is State.READY


def running(core: Scheduler, model_id: str, now: float) -> int:
    ticket, effects = core.submit(model_id, Kind.INFER, now)
    assert admitted(effects) == [ticket]
    return ticket


def scenario_load_serve_idle(core: Scheduler) -> None:
    """UNLOADED → LOADING → READY → UNLOADING (idle) → UNLOADED."""
    ticket, _ = core.submit("a", Kind.INFER, 0.0)
    core.load_done("a", 1.0)
    core.request_done(ticket, 2.0)
    core.idle_check("a", 100.0)
    assert core.models["a"].state is State.UNLOADING
    core.stopped("a", 101.0)


def scenario_load_fails_then_retried(core: Scheduler) -> None:
    """LOADING → FAILED → LOADING (an explicit load retries at once) → FAILED (crash)."""
    core.submit("a", Kind.INFER, 0.0)
    core.load_done("a", 1.0, RuntimeFailed("bad"))
    core.submit("a", Kind.LOAD, 2.0)
    core.crashed("a", 3.0, "killed")
    assert core.models["a"].state is State.FAILED


def scenario_crash_and_unload_of_the_failed_model(core: Scheduler) -> None:
    """READY → FAILED (crash) → UNLOADED (an operator's unload)."""
    load_ready(core, "a")
    core.crashed("a", 1.0, "exited with status 1")
    core.unload("a", 2.0, force=False)
    assert core.models["a"].state is State.UNLOADED


def scenario_unload_while_loading(core: Scheduler) -> None:
    """LOADING → UNLOADING."""
    core.submit("a", Kind.LOAD, 0.0)
    core.unload("a", 1.0, force=True)
    assert core.models["a"].state is State.UNLOADING


def scenario_file_gone(core: Scheduler) -> None:
    """UNLOADED → FAILED → FAILED: the file is gone, and still gone at the retry."""
    core.file_problem = lambda spec: "model file not found"
    for now in (0.0, 1.0):
        ticket, effects = core.submit("a", Kind.LOAD, now)
        assert [e.ticket for e in effects if isinstance(e, Fail)] == [ticket]
        assert core.models["a"].state is State.FAILED


SCENARIOS: list[Callable[[Scheduler], None]] = [
    scenario_load_serve_idle,
    scenario_load_fails_then_retried,
    scenario_crash_and_unload_of_the_failed_model,
    scenario_unload_while_loading,
    scenario_file_gone,
]


def test_the_scheduler_makes_every_move_in_the_table(moves: set[Move]) -> None:
    """No row of the table is dead: each move is made by some sequence of public calls."""
    for scenario in SCENARIOS:
        scenario(make({"a": 4}, default_keep_alive=5.0))
    assert moves == EVERY_MOVE, EVERY_MOVE - moves


# --- random call sequences, in any order ----------------------------------------------

SIZES = {"a": 4.0, "b": 5.0, "p": 3.0, "huge": 11.0}
SPECS: dict[str, dict[str, Any]] = {
    "a": {"parallel": 2},
    "b": {"embedding": True, "keep_alive": 0.0},
    "p": {"priority": 0},
}
MODELS = st.sampled_from(sorted(SIZES))


class AnyOrderMachine(RuleBasedStateMachine):
    """Every public call, in any order: no call may make a move the table lacks, and the
    counters stay consistent. (test_scheduler's machine plays a faithful engine instead.)"""

    def __init__(self) -> None:
        super().__init__()
        self.core = make(
            SIZES, specs=SPECS, max_concurrent=3, max_queue=4, swap_batch=2, default_keep_alive=5.0
        )
        self.now = 0.0
        self.tickets: list[int] = []  # every ticket handed out
        self.running: set[int] = set()  # admitted requests (not loads) not yet done
        self.load_tickets: set[int] = set()
        self.missing: set[str] = set()  # models whose file is gone
        self.core.file_problem = lambda spec: "gone" if spec.id in self.missing else None

    def apply(self, effects: Sequence[Effect]) -> None:
        for ticket in admitted(effects):
            if ticket not in self.load_tickets:
                self.running.add(ticket)

    def call(self, method: Callable[..., list[Effect]], *args: Any, **kwargs: Any) -> None:
        """A call about a model by id: one removed from the registry is unknown (only)."""
        with contextlib.suppress(UnknownModel):
            self.apply(method(*args, **kwargs))

    @rule(
        model_id=MODELS,
        kind=st.sampled_from(list(Kind)),
        keep_alive=st.sampled_from([None, 0.0, 3.0, -1.0]),
        dt=st.sampled_from([0.0, 1.0, 30.0]),
    )
    def submit(self, model_id: str, kind: Kind, keep_alive: float | None, dt: float) -> None:
        self.now += dt
        try:
            ticket, effects = self.core.submit(model_id, kind, self.now, keep_alive)
        except MmdError:
            return  # refused at once: that is an answer, not a move
        self.tickets.append(ticket)
        if kind is Kind.LOAD:
            self.load_tickets.add(ticket)
        self.apply(effects)

    @rule(model_id=MODELS)
    def submit_infer(self, model_id: str) -> None:  # the most common event
        self.submit(model_id, Kind.INFER, None, 0.5)

    def in_state(self, state: State) -> list[str]:
        return sorted(m for m, entry in self.core.models.items() if entry.state is state)

    @rule(model_id=MODELS, ok=st.booleans())
    def load_done(self, model_id: str, ok: bool) -> None:
        self.now += 1.0
        self.call(self.core.load_done, model_id, self.now, None if ok else RuntimeFailed("x"))

    @precondition(lambda self: self.in_state(State.LOADING))
    @rule(data=st.data(), ok=st.sampled_from([True, True, False]))
    def load_done_of_a_loading_model(self, data: st.DataObject, ok: bool) -> None:
        self.load_done(data.draw(st.sampled_from(self.in_state(State.LOADING))), ok)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def request_done(self, data: st.DataObject) -> None:
        ticket = data.draw(st.sampled_from(sorted(self.running)))
        self.running.discard(ticket)
        self.now += 0.5
        self.apply(self.core.request_done(ticket, self.now))

    @precondition(lambda self: self.tickets)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        ticket = data.draw(st.sampled_from(self.tickets))
        self.running.discard(ticket)  # an admitted one gives its slot back
        self.apply(self.core.cancel(ticket, self.now))

    @rule(model_id=MODELS)
    def crashed(self, model_id: str) -> None:
        self.now += 0.5
        self.call(self.core.crashed, model_id, self.now, "exited with status 1")

    @precondition(lambda self: self.in_state(State.READY))
    @rule(data=st.data())
    def crash_of_a_ready_model(self, data: st.DataObject) -> None:
        self.crashed(data.draw(st.sampled_from(self.in_state(State.READY))))

    @rule(model_id=MODELS)
    def stopped(self, model_id: str) -> None:
        self.call(self.core.stopped, model_id, self.now)

    @precondition(lambda self: self.in_state(State.UNLOADING))
    @rule(data=st.data())
    def stop_of_a_stopping_model(self, data: st.DataObject) -> None:
        self.stopped(data.draw(st.sampled_from(self.in_state(State.UNLOADING))))

    @rule(model_id=MODELS, dt=st.sampled_from([1.0, 10.0]))
    def idle_check(self, model_id: str, dt: float) -> None:
        self.now += dt
        self.call(self.core.idle_check, model_id, self.now)

    @rule(model_id=MODELS, force=st.booleans())
    def unload(self, model_id: str, force: bool) -> None:
        self.call(self.core.unload, model_id, self.now, force=force)

    @rule(model_id=MODELS)
    def cancel_unload(self, model_id: str) -> None:
        self.call(self.core.cancel_unload, model_id, self.now)

    @rule(dt=st.sampled_from([1.0, 61.0]))
    def pump(self, dt: float) -> None:
        self.now += dt
        self.apply(self.core.pump(self.now))

    @rule(low=st.booleans())
    def memory_pressure(self, low: bool) -> None:
        self.core.update_devices(self.core.devices, frozenset({"ram"} if low else ()))
        self.apply(self.core.pump(self.now))

    @rule(model_id=MODELS, gone=st.booleans())
    def file_gone(self, model_id: str, gone: bool) -> None:
        if gone:
            self.missing.add(model_id)
        else:
            self.missing.discard(model_id)

    @rule(model_id=MODELS)
    def remove_model(self, model_id: str) -> None:
        self.call(self.core.remove_model, model_id, self.now)

    @rule(model_id=MODELS, keep_alive=st.sampled_from([None, 0.0, 2.0]))
    def add_or_update_model(self, model_id: str, keep_alive: float | None) -> None:
        options = {**SPECS.get(model_id, {}), "keep_alive": keep_alive}
        spec = ModelSpec(id=model_id, path=Path(f"{model_id}.gguf"), **options)
        self.core.add_model(spec, footprint(SIZES[model_id]))
        self.apply(self.core.pump(self.now))

    @rule()
    def forget_removed(self) -> None:
        self.core.forget_removed()

    @rule(now=st.integers(0, 9))
    def shutdown(self, now: int) -> None:
        """Rarely (a closed scheduler refuses every new request, which ends exploring)."""
        if now == 0:
            self.apply(self.core.shutdown())

    # --- invariants ---

    @invariant()
    def counts_hold(self) -> None:
        entries = list(self.core.models.values())
        assert all(m.active >= 0 and m.queued >= 0 for m in entries)
        assert self.core.active_total == sum(m.active for m in entries) >= 0
        assert self.core.queued_total == sum(m.queued for m in entries) >= 0
        assert self.core.active_total == len(self.running)

    @invariant()
    def waiting_tickets_are_known(self) -> None:
        for model_id, entry in self.core.models.items():
            for ticket_id, ticket in entry.queue.items():
                assert self.core.tickets[ticket_id] is ticket
                assert (ticket.model_id, ticket.admitted) == (model_id, False)
            assert all(t in self.core.tickets for t in entry.load_waiters)

    @invariant()
    def each_state_has_its_bookkeeping(self) -> None:
        for entry in self.core.models.values():
            if entry.state in (State.LOADING, State.READY):
                assert entry.placement is not None
            if entry.state in (State.UNLOADED, State.FAILED):
                assert (entry.placement, entry.measured, entry.runtime) == (None, {}, {})
            if entry.state is not State.READY:
                assert entry.idle_deadline is None
            if entry.state is State.FAILED:
                assert entry.crashes >= 1
                assert entry.last_error


AnyOrderMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None
)
test_any_order_of_calls_makes_only_allowed_moves = AnyOrderMachine.TestCase


@pytest.mark.parametrize("meanwhile", ["crash", "crash and unload", "shutdown"])
def test_an_unload_waiting_for_a_request_is_dropped_when_its_process_goes(
    meanwhile: str,
) -> None:
    """An unload that waits for a running request meant that process: if it crashes or is
    stopped meanwhile, the request's end stops nothing more (it once moved a failed or
    unloaded model to unloading, and stopped it a second time)."""
    core = make({"a": 4}, default_keep_alive=5.0)
    load_ready(core, "a")
    ticket = running(core, "a", 1.0)
    core.unload("a", 2.0, force=False)
    if meanwhile == "shutdown":
        core.shutdown()
    else:
        core.crashed("a", 3.0, "exited with status 1")
    if meanwhile == "crash and unload":
        core.unload("a", 4.0, force=False)
    before = core.models["a"].state
    effects = core.request_done(ticket, 5.0)
    assert not [e for e in effects if isinstance(e, Stop)]
    assert core.models["a"].state is before
    assert not core.models["a"].unload_requested
