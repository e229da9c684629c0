"""The CPU budget: the cores rule (mmd.core.cores), the machine facts it starts from
(mmd.host.cpu_topology), and the scheduler re-placing loaded models when another one needs cores.
Pure: no process, no clock, no machine but a described one."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis.stateful import invariant
from test_scheduler import SchedulerMachine, admitted, loads, make, run, state_of, stops

from mmd.config.settings import parse_config
from mmd.core.cores import (
    CoreShare,
    CpuBudget,
    args_place_threads,
    decide_cores,
    parse_cpu_list,
    parse_cpus_setting,
)
from mmd.core.effects import Kind
from mmd.core.errors import ConfigError
from mmd.core.model_state import State
from mmd.core.planner import Placement
from mmd.core.scheduler import Scheduler
from mmd.host.cpu_topology import CpuFacts, cpu_budget

TWO = CpuBudget((0, 1), "test")
FOUR = CpuBudget((0, 1, 2, 3), "test")


# --- the rule -------------------------------------------------------------------------------


def test_a_model_alone_gets_every_core() -> None:
    decision = decide_cores(FOUR, {}, "coder")
    assert decision.share == CoreShare((0, 1, 2, 3), 4)
    assert decision.replace == ()
    assert decision.reason == "4 of 4 cores: the only model on the CPU"


def test_a_second_model_halves_the_first_which_is_re_placed() -> None:
    decision = decide_cores(FOUR, {"coder": (0, 1, 2, 3)}, "chat")
    assert decision.replace == ("coder",)
    assert decision.share == CoreShare((0, 1), 2)
    assert decision.reason == "2 of 4 cores: the CPU is split with coder"
    # The re-placed model comes back beside the newcomer, on the other half.
    again = decide_cores(FOUR, {"chat": (0, 1)}, "coder")
    assert again.share == CoreShare((2, 3), 2)
    assert again.replace == ()


def test_models_on_their_fair_share_stay_where_they_are() -> None:
    decision = decide_cores(FOUR, {"a": (0, 1), "b": (2,)}, "c")
    assert decision.replace == ("a",)
    assert decision.share.cpus == (0,)  # a's old cores are free once it is re-placed
    assert decision.share.threads == 1


def test_more_models_than_cores_share_the_least_used_core_with_one_thread() -> None:
    decision = decide_cores(TWO, {"a": (0,), "b": (1,)}, "c")
    assert decision.replace == ()
    assert decision.share == CoreShare((0,), 1, ("a",))
    assert decision.share.mask == "1"
    assert decision.reason == "1 of 2 cores, 1 thread: core 0 shared with a"
    fourth = decide_cores(TWO, {"a": (0,), "b": (1,), "c": (0,)}, "d")
    assert fourth.share == CoreShare((1,), 1, ("b",))


def test_a_single_core_budget_never_re_places() -> None:
    one = CpuBudget((3,), "test")
    assert decide_cores(one, {}, "a").share == CoreShare((3,), 1)
    decision = decide_cores(one, {"a": (3,)}, "b")
    assert decision.replace == ()
    assert decision.share == CoreShare((3,), 1, ("a",))


def test_cpu_mask_is_the_hex_bitmap_of_the_set() -> None:
    assert CoreShare((0, 1), 2).mask == "3"
    assert CoreShare((4, 5, 6, 7), 4).mask == "f0"
    assert CoreShare((16,), 1).mask == "10000"


def test_args_that_place_threads_are_recognised_in_both_spellings() -> None:
    assert args_place_threads(("--threads", "4"))
    assert args_place_threads(("-t", "4"))
    assert args_place_threads(("--cpu-range=0-3",))
    assert args_place_threads(("--poll", "0"))
    assert not args_place_threads(("--temp", "0.7", "--top-k", "40"))


def test_cpu_lists_and_settings_parse_or_say_why_not() -> None:
    assert parse_cpu_list("0-3,8,10-11") == (0, 1, 2, 3, 8, 10, 11)
    assert parse_cpus_setting("auto") == "auto"
    assert parse_cpus_setting(4) == 4
    assert parse_cpus_setting("6") == 6
    assert parse_cpus_setting("2-3") == (2, 3)
    for bad in ("3-1", "a-b", "1,,2", ""):
        with pytest.raises(ValueError, match="CPU list"):
            parse_cpus_setting(bad)
    with pytest.raises(ValueError, match="at least 1"):
        parse_cpus_setting(0)


def test_budget_cpus_in_the_config() -> None:
    assert parse_config('[budget]\ncpus = "0-1"\n', None).budget.cpus == "0-1"
    assert parse_config("[budget]\ncpus = 2\n", None).budget.cpus == 2
    with pytest.raises(ConfigError, match=r"budget\.cpus: not a CPU list"):
        parse_config('[budget]\ncpus = "lots"\n', None)
    with pytest.raises(ConfigError, match=r"budget\.cpus: expected"):
        parse_config("[budget]\ncpus = true\n", None)


# --- the machine ----------------------------------------------------------------------------


def facts(affinity: tuple[int, ...], smt: int = 1, quota: float | None = None) -> CpuFacts:
    """A machine whose logical CPUs come in groups of ``smt`` siblings per core."""
    siblings = {cpu: tuple(range(cpu - cpu % smt, cpu - cpu % smt + smt)) for cpu in affinity}
    return CpuFacts(affinity, siblings, quota)


def test_budget_is_one_cpu_per_physical_core_of_the_affinity() -> None:
    assert cpu_budget(facts((0, 1))) == CpuBudget((0, 1), "affinity, 2 cores")
    smt = cpu_budget(facts(tuple(range(8)), smt=2))
    assert smt.cpus == (0, 2, 4, 6)
    assert smt.source == "affinity (one per physical core), 4 cores"
    # An affinity holding one sibling of a core still uses that core.
    assert cpu_budget(facts((1, 2, 3), smt=2)).cpus == (1, 2)


def test_budget_follows_a_cgroup_quota_and_the_config() -> None:
    assert cpu_budget(facts((0, 1, 2, 3), quota=2.5)) == CpuBudget(
        (0, 1), "cgroup quota of 2.5 CPUs, 2 cores"
    )
    assert cpu_budget(facts((0, 1), quota=0.5)).cpus == (0,)  # at least one core
    assert cpu_budget(facts((0, 1), quota=8.0)).cpus == (0, 1)  # a quota above the cores
    assert cpu_budget(facts((0, 1, 2, 3)), 2) == CpuBudget((0, 1), "config, 2 cores")
    assert cpu_budget(facts((0, 1, 2, 3)), (1, 3)) == CpuBudget((1, 3), "config, 2 cores")
    # CPUs outside the daemon's affinity cannot be used: the affinity decides.
    assert cpu_budget(facts((0, 1)), (2, 3)).cpus == (0, 1)
    assert cpu_budget(facts((0, 1)), (1, 7)).cpus == (1,)


# --- the scheduler --------------------------------------------------------------------------


def on_cpus(budget: CpuBudget, sizes: dict[str, float], **specs: dict[str, object]) -> Scheduler:
    core = make(sizes, specs=dict(specs))
    core.cpu_budget = budget
    return core


def cores_of(core: Scheduler, model_id: str) -> CoreShare | None:
    return core.models[model_id].cores


def test_second_cpu_model_re_places_the_idle_first_one() -> None:
    core = on_cpus(TWO, {"a": 1, "b": 1})
    _ticket, effects = core.submit("a", Kind.LOAD, 0.0)
    core.load_done("a", 0.0)
    assert cores_of(core, "a") == CoreShare((0, 1), 2)
    _, effects = core.submit("b", Kind.LOAD, 1.0)
    assert stops(effects) == [("a", "re-placed for b")]
    [start] = loads(effects)
    assert (start.model_id, start.after, start.replaced) == ("b", (), ("a",))
    assert cores_of(core, "b") == CoreShare((0,), 1)
    # Once stopped, a starts again at once, on the other core, with nobody waiting for it.
    effects = core.stopped("a", 2.0)
    assert [s.model_id for s in loads(effects)] == ["a"]
    assert cores_of(core, "a") == CoreShare((1,), 1)
    assert core.models["a"].cores_reason == "1 of 2 cores: the CPU is split with b"
    core.load_done("a", 3.0)
    core.load_done("b", 3.0)
    assert state_of(core, "a") == state_of(core, "b") == State.READY


def test_a_pinned_model_is_re_placed_too_and_started_again_at_once() -> None:
    core = on_cpus(TWO, {"p": 1, "b": 1}, p={"priority": 0})
    core.submit("p", Kind.LOAD, 0.0)
    core.load_done("p", 0.0)
    _, effects = core.submit("b", Kind.LOAD, 1.0)
    assert stops(effects) == [("p", "re-placed for b")]
    assert [s.model_id for s in loads(core.stopped("p", 2.0))] == ["p"]
    assert cores_of(core, "p") == CoreShare((1,), 1)


def test_a_busy_model_is_re_placed_only_once_its_request_is_done() -> None:
    core = on_cpus(TWO, {"a": 1, "b": 1})
    core.submit("a", Kind.LOAD, 0.0)
    core.load_done("a", 0.0)
    running = run(core, "a", 1.0)
    ticket, effects = core.submit("b", Kind.INFER, 2.0)
    assert loads(effects) == []
    assert stops(effects) == []
    effects = core.request_done(running, 3.0)
    assert stops(effects) == [("a", "re-placed for b")]
    assert [s.model_id for s in loads(effects)] == ["b"]
    assert ticket in admitted(core.load_done("b", 4.0))


def test_gpu_models_and_models_placing_their_own_threads_hold_no_cores() -> None:
    core = on_cpus(TWO, {"a": 1, "own": 1}, own={"args": ("--threads", "2")})
    core.submit("own", Kind.LOAD, 0.0)
    core.load_done("own", 0.0)
    assert cores_of(core, "own") is None
    core.submit("a", Kind.LOAD, 1.0)
    assert cores_of(core, "a") == CoreShare((0, 1), 2)  # nothing re-placed, all cores
    gpu = Placement(gpu_layers=10, layers={"gpu0": 10}, usage={"ram": 1}, total_layers=10)
    assert core.decide_cores(core.models["own"], gpu) is None


def test_without_a_cpu_budget_no_threads_are_placed() -> None:
    core = make({"a": 1, "b": 1})
    core.submit("a", Kind.LOAD, 0.0)
    core.load_done("a", 0.0)
    _, effects = core.submit("b", Kind.LOAD, 1.0)
    assert stops(effects) == []
    assert cores_of(core, "a") is None
    assert cores_of(core, "b") is None


class CoresMachine(SchedulerMachine):
    """The scheduler's random event sequences on a 2-core budget: every ticket still ends,
    memory still holds, and no child with several threads shares a core with another."""

    def __init__(self) -> None:
        super().__init__()
        self.core.cpu_budget = TWO

    @invariant()
    def multithreaded_children_have_cores_of_their_own(self) -> None:
        live = [
            (m.spec.id, m.cores)
            for m in self.core.models.values()
            if m.cores is not None and m.state in (State.LOADING, State.READY)
        ]
        for i, (first, a) in enumerate(live):
            for second, b in live[i + 1 :]:
                if set(a.cpus) & set(b.cpus):
                    assert a.threads == b.threads == 1, (first, a, second, b)


CoresMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
test_random_event_sequences_on_two_cores = CoresMachine.TestCase
