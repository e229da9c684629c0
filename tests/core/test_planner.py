"""The placement and eviction policy, by example and by property."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmd.core.footprint import Footprint, LearnedBytes
from mmd.core.planner import DeviceBudget, Placement, Plan, Refusal, Resident, plan_load
from mmd.core.units import GIB, MIB, format_size


def footprint(
    *layers: int, fixed: int = 0, overhead: int = 0, compute: int = 0, host_fixed: int = 0
) -> Footprint:
    return Footprint(
        layer_bytes=tuple(layers),
        fixed_bytes=fixed,
        overhead_bytes=overhead,
        weights_bytes=sum(layers) + fixed,
        kv_cache_bytes=0,
        compute_bytes=compute,
        host_fixed_bytes=host_fixed,
    )


def ram(budget: int) -> DeviceBudget:
    return DeviceBudget("ram", "ram", budget)


def gpu(index: int, budget: int) -> DeviceBudget:
    return DeviceBudget(f"gpu{index}", "gpu", budget)


def resident(
    model_id: str,
    last_used: float = 0.0,
    priority: int = 1,
    busy: bool = False,
    **usage: int,
) -> Resident:
    return Resident(model_id, usage, last_used, priority, busy)


def plan(*args: object, **kwargs: object) -> Plan:
    result = plan_load(*args, **kwargs)  # type: ignore[arg-type]
    assert isinstance(result, Plan), result
    return result


def refusal(*args: object, **kwargs: object) -> Refusal:
    result = plan_load(*args, **kwargs)  # type: ignore[arg-type]
    assert isinstance(result, Refusal), result
    return result


EIGHT_1G = footprint(*[GIB] * 8, fixed=GIB, overhead=256 * MIB)  # 9 GiB on GPU when whole


# --- placements ------------------------------------------------------------------------


def test_whole_model_goes_to_the_gpu_with_most_free_room() -> None:
    devices = [ram(32 * GIB), gpu(0, 24 * GIB), gpu(1, 24 * GIB)]
    busy = resident("other", busy=True, gpu0=10 * GIB)
    result = plan("m", EIGHT_1G, devices, [busy])
    assert result.evict == ()
    assert result.placement == Placement(8, {"gpu1": 8}, {"gpu1": 9 * GIB, "ram": 256 * MIB}, 8)
    assert result.placement.kind == "gpu"


def test_model_too_big_for_one_gpu_spreads_over_several() -> None:
    devices = [ram(32 * GIB), gpu(0, 6 * GIB), gpu(1, 6 * GIB)]
    result = plan("m", EIGHT_1G, devices, [])
    placement = result.placement
    assert placement.kind == "gpu"
    assert placement.gpu_layers == 8
    assert list(placement.layers) == ["gpu0", "gpu1"]
    assert sum(placement.layers.values()) == 8
    # the fixed part sits with the final layers, on the last GPU
    assert placement.usage["gpu0"] == placement.layers["gpu0"] * GIB
    assert placement.usage["gpu1"] == placement.layers["gpu1"] * GIB + GIB
    assert placement.usage["ram"] == 256 * MIB


def test_spread_follows_the_room_of_each_gpu() -> None:
    devices = [ram(32 * GIB), gpu(0, 8 * GIB), gpu(1, 8 * GIB)]
    others = [resident("a", busy=True, gpu1=4 * GIB)]
    placement = plan("m", EIGHT_1G, devices, others).placement
    assert placement.layers == {"gpu0": 6, "gpu1": 2}
    assert placement.usage == {"gpu0": 6 * GIB, "gpu1": 3 * GIB, "ram": 256 * MIB}


def test_split_puts_as_many_layers_on_the_gpu_as_fit() -> None:
    devices = [ram(32 * GIB), gpu(0, 5 * GIB + 100)]
    placement = plan("m", EIGHT_1G, devices, []).placement
    assert placement.kind == "split"
    assert placement.gpu_layers == 5
    assert placement.layers == {"gpu0": 5}
    assert placement.usage == {"gpu0": 5 * GIB, "ram": 3 * GIB + GIB + 256 * MIB}


def test_split_offloads_the_last_layers() -> None:
    small_first = footprint(1, 1, 1, 5, 5, fixed=100, overhead=1)
    placement = plan("m", small_first, [ram(1000), gpu(0, 10)], []).placement
    assert placement.gpu_layers == 2
    assert placement.usage == {"gpu0": 10, "ram": 104}


def test_split_across_two_gpus() -> None:
    devices = [ram(32 * GIB), gpu(0, 3 * GIB), gpu(1, 2 * GIB)]
    placement = plan("m", EIGHT_1G, devices, []).placement
    assert placement.kind == "split"
    assert placement.layers == {"gpu0": 3, "gpu1": 2}
    assert placement.usage == {"gpu0": 3 * GIB, "gpu1": 2 * GIB, "ram": 4 * GIB + 256 * MIB}


def test_cpu_only_when_not_one_layer_fits_on_the_gpu() -> None:
    placement = plan("m", EIGHT_1G, [ram(32 * GIB), gpu(0, GIB - 1)], []).placement
    assert placement == Placement(0, {}, {"ram": EIGHT_1G.total}, 8)
    assert placement.kind == "cpu"


def test_machine_without_gpu_only_has_cpu_placement() -> None:
    placement = plan("m", EIGHT_1G, [ram(32 * GIB)], []).placement
    assert placement.kind == "cpu"
    assert placement.usage == {"ram": EIGHT_1G.total}


def test_placement_kind_without_a_layer_count() -> None:
    assert Placement(4, {"gpu0": 4}, {"gpu0": 1, "ram": 1}).kind == "gpu"
    assert Placement(0, {}, {"ram": 1}).kind == "cpu"


def test_a_ram_device_is_required() -> None:
    with pytest.raises(ValueError, match="RAM device"):
        plan_load("m", EIGHT_1G, [gpu(0, 99 * GIB)], [])


# --- eviction --------------------------------------------------------------------------


def test_least_recently_used_is_evicted_first() -> None:
    devices = [ram(32 * GIB), gpu(0, 12 * GIB)]
    loaded = [
        resident("new", last_used=30, gpu0=4 * GIB),
        resident("old", last_used=10, gpu0=4 * GIB),
        resident("mid", last_used=20, gpu0=4 * GIB),
    ]
    assert plan("m", footprint(4 * GIB), devices, loaded).evict == ("old",)
    assert plan("m", footprint(8 * GIB), devices, loaded).evict == ("old", "mid")


def test_no_victim_is_evicted_that_is_not_needed() -> None:
    devices = [ram(32 * GIB), gpu(0, 10 * GIB)]
    loaded = [
        resident("oldest-small", last_used=1, gpu0=GIB),
        resident("old-big", last_used=2, gpu0=8 * GIB),
        resident("recent", last_used=3, gpu0=GIB),
    ]
    # the LRU prefix oldest-small + old-big makes room; old-big alone already does
    assert plan("m", footprint(8 * GIB), devices, loaded).evict == ("old-big",)


def test_ties_evict_higher_priority_number_then_id_first() -> None:
    devices = [ram(32 * GIB), gpu(0, 8 * GIB)]
    loaded = [
        resident("b", last_used=5, priority=1, gpu0=4 * GIB),
        resident("c", last_used=5, priority=3, gpu0=4 * GIB),
    ]
    assert plan("m", footprint(4 * GIB), devices, loaded).evict == ("c",)
    same = [resident("b", last_used=5, gpu0=4 * GIB), resident("a", last_used=5, gpu0=4 * GIB)]
    assert plan("m", footprint(4 * GIB), devices, same).evict == ("a",)


def test_pinned_and_busy_models_are_never_evicted() -> None:
    devices = [ram(32 * GIB), gpu(0, 12 * GIB)]
    loaded = [
        resident("pinned", last_used=1, priority=0, gpu0=4 * GIB),
        resident("busy", last_used=2, busy=True, gpu0=4 * GIB),
        resident("idle", last_used=3, gpu0=4 * GIB),
    ]
    assert plan("m", footprint(4 * GIB), devices, loaded).evict == ("idle",)


def test_idle_model_is_swapped_out_of_vram_rather_than_running_on_cpu() -> None:
    devices = [ram(64 * GIB), gpu(0, 10 * GIB)]
    loaded = [resident("idle", last_used=1, gpu0=6 * GIB, ram=GIB)]
    result = plan("m", EIGHT_1G, devices, loaded)
    assert result.evict == ("idle",)
    assert result.placement.kind == "gpu"


def test_no_eviction_just_to_put_more_layers_of_a_split_on_the_gpu() -> None:
    devices = [ram(64 * GIB), gpu(0, 6 * GIB)]
    loaded = [resident("idle", last_used=1, gpu0=3 * GIB)]
    result = plan("m", EIGHT_1G, devices, loaded)
    assert result.evict == ()
    assert result.placement.gpu_layers == 3


def test_ram_pressure_evicts_on_a_cpu_only_machine() -> None:
    devices = [ram(10 * GIB)]
    loaded = [
        resident("a", last_used=2, ram=4 * GIB),
        resident("b", last_used=1, ram=4 * GIB),
    ]
    result = plan("m", footprint(3 * GIB, overhead=GIB), devices, loaded)
    assert result.evict == ("b",)
    assert result.placement.kind == "cpu"


def test_split_evicts_for_ram_when_nothing_else_fits() -> None:
    devices = [ram(6 * GIB), gpu(0, 4 * GIB)]
    loaded = [
        resident("gpu-user", last_used=1, gpu0=GIB),
        resident("ram-user", last_used=2, ram=3 * GIB),
    ]
    result = plan("m", EIGHT_1G, devices, loaded)
    # 3 layers fit the GPU now; the other 5 + fixed + overhead need RAM that ram-user holds.
    # Evicting gpu-user (older) alone lets 4 layers on, still too little RAM: both must go.
    assert result.placement.kind == "split"
    assert set(result.evict) == {"gpu-user", "ram-user"}


# --- explicit gpu_layers ---------------------------------------------------------------


def test_explicit_gpu_layers_are_honoured_even_when_more_would_fit() -> None:
    devices = [ram(32 * GIB), gpu(0, 24 * GIB)]
    placement = plan("m", EIGHT_1G, devices, [], gpu_layers=3).placement
    assert placement.gpu_layers == 3
    assert placement.kind == "split"
    assert placement.usage == {"gpu0": 3 * GIB, "ram": 6 * GIB + 256 * MIB}


def test_explicit_zero_gpu_layers_is_cpu_only() -> None:
    devices = [ram(32 * GIB), gpu(0, 24 * GIB)]
    assert plan("m", EIGHT_1G, devices, [], gpu_layers=0).placement.kind == "cpu"


def test_explicit_gpu_layers_evict_rather_than_change() -> None:
    devices = [ram(32 * GIB), gpu(0, 8 * GIB)]
    loaded = [resident("idle", gpu0=4 * GIB)]
    result = plan("m", EIGHT_1G, devices, loaded, gpu_layers=6)
    assert result.evict == ("idle",)
    assert result.placement.gpu_layers == 6


def test_more_gpu_layers_than_the_model_has_is_refused() -> None:
    result = refusal("m", EIGHT_1G, [ram(32 * GIB), gpu(0, 99 * GIB)], [], gpu_layers=9)
    assert result.impossible
    assert "gpu_layers=9" in result.reason
    assert "only 8 layers" in result.reason


def test_gpu_layers_without_a_gpu_are_refused() -> None:
    result = refusal("m", EIGHT_1G, [ram(32 * GIB)], [], gpu_layers=2)
    assert result.impossible
    assert "no GPU" in result.reason


def test_explicit_gpu_layers_that_cannot_fit_are_refused_not_reduced() -> None:
    devices = [ram(32 * GIB), gpu(0, 8 * GIB)]
    loaded = [resident("pinned", priority=0, gpu0=4 * GIB)]
    result = refusal("m", EIGHT_1G, devices, loaded, gpu_layers=6)
    assert not result.impossible
    assert result.needed == {"gpu0": 6 * GIB, "ram": 3 * GIB + 256 * MIB}
    assert "6 of 8 layers on GPU" in result.reason


# --- refusals --------------------------------------------------------------------------


def test_refusal_names_the_numbers_and_the_models_in_the_way() -> None:
    devices = [ram(8 * GIB)]
    loaded = [
        resident("keeper", priority=0, ram=3 * GIB),
        resident("worker", busy=True, ram=2 * GIB),
        resident("idle", ram=GIB),
    ]
    result = refusal("big", footprint(5 * GIB, overhead=GIB), devices, loaded)
    assert not result.impossible
    assert result.needed == {"ram": 6 * GIB}
    assert result.budget == {"ram": 8 * GIB}
    assert result.used == {"ram": 5 * GIB}
    assert result.pinned == ("keeper",)
    assert result.busy == ("worker",)
    for text in ("big", format_size(6 * GIB), format_size(8 * GIB), format_size(5 * GIB)):
        assert text in result.reason
    assert "pinned: keeper" in result.reason
    assert "busy: worker" in result.reason
    assert "\n" not in result.reason


def test_too_big_for_the_empty_machine_is_impossible_and_evicts_nothing() -> None:
    devices = [ram(4 * GIB), gpu(0, 4 * GIB)]
    loaded = [resident("idle", ram=GIB)]
    result = refusal("huge", EIGHT_1G, devices, loaded)
    assert result.impossible
    assert "even with nothing else loaded" in result.reason
    # closest attempt: 4 layers on the GPU, the rest still too much for RAM
    assert result.needed == {"gpu0": 4 * GIB, "ram": 5 * GIB + 256 * MIB}


# --- footprints without per-layer sizes ------------------------------------------------


def test_footprint_without_layer_sizes_is_placed_whole() -> None:
    whole = footprint(fixed=6 * GIB, overhead=GIB)
    devices = [ram(32 * GIB), gpu(0, 8 * GIB)]
    on_gpu = plan("m", whole, devices, [], total_layers=12).placement
    assert on_gpu == Placement(12, {"gpu0": 12}, {"gpu0": 6 * GIB, "ram": GIB}, 12)
    too_small = [ram(32 * GIB), gpu(0, 5 * GIB)]
    assert plan("m", whole, too_small, [], total_layers=12).placement.kind == "cpu"
    split = refusal("m", whole, devices, [], gpu_layers=4, total_layers=12)
    assert split.impossible
    assert "per-layer sizes" in split.reason


def test_total_layers_must_agree_with_the_footprint() -> None:
    with pytest.raises(ValueError, match="total_layers"):
        plan_load("m", EIGHT_1G, [ram(GIB)], [], total_layers=7)


# --- learned footprints ----------------------------------------------------------------


def learned(fp: Footprint, *entries: tuple[int, int, int]) -> Footprint:
    """``fp`` with measurements of earlier loads: (gpu_layers, gpu bytes, ram bytes)."""
    return dataclasses.replace(fp, learned=tuple(LearnedBytes(*e) for e in entries))


def test_a_learned_footprint_replaces_the_estimate_for_its_layer_count() -> None:
    # Estimated 9 GiB on the GPU, which an 8 GiB GPU cannot hold; measured 7.5 GiB.
    fp = learned(EIGHT_1G, (8, 7 * GIB + 512 * MIB, 400 * MIB))
    placement = plan("m", fp, [ram(32 * GIB), gpu(0, 8 * GIB)], []).placement
    assert placement.kind == "gpu"
    assert placement.usage == {"gpu0": 7 * GIB + 512 * MIB, "ram": 400 * MIB}
    assert placement.source == "learned"
    # Without the measurement the same GPU only takes a split.
    estimated = plan("m", EIGHT_1G, [ram(32 * GIB), gpu(0, 8 * GIB)], []).placement
    assert (estimated.kind, estimated.source) == ("split", "estimated")


def test_a_learned_footprint_larger_than_the_estimate_moves_the_model_off_the_gpu() -> None:
    fp = learned(EIGHT_1G, (8, 11 * GIB, 300 * MIB))
    placement = plan("m", fp, [ram(32 * GIB), gpu(0, 10 * GIB)], []).placement
    # The whole model no longer fits: the best split (7 layers, 7 GiB), whose figures
    # are still estimated.
    assert placement.kind == "split"
    assert placement.gpu_layers == 7
    assert placement.source == "estimated"


def test_a_learned_cpu_load_counts_no_gpu_bytes() -> None:
    # A CPU-only child that made a GPU context anyway (a binary without --device):
    # the placement has no GPU to put it on, the running child's measurement counts it.
    fp = learned(EIGHT_1G, (0, 82 * MIB, 8 * GIB))
    placement = plan("m", fp, [ram(32 * GIB)], []).placement
    assert placement.usage == {"ram": 8 * GIB}
    assert placement.source == "learned"


def test_a_learned_figure_spreads_over_several_gpus_as_the_estimate_does() -> None:
    fp = learned(EIGHT_1G, (8, 9 * GIB - 900 * MIB, 300 * MIB))
    devices = [ram(32 * GIB), gpu(0, 5 * GIB), gpu(1, 5 * GIB)]
    placement = plan("m", fp, devices, []).placement
    assert placement.kind == "gpu"
    assert len(placement.layers) == 2
    assert sum(v for d, v in placement.usage.items() if d != "ram") == 9 * GIB - 900 * MIB
    assert placement.usage["ram"] == 300 * MIB
    estimated = plan("m", EIGHT_1G, devices, []).placement
    assert placement.layers == estimated.layers
    for device in placement.layers:  # each GPU's share shrinks by the same factor
        ratio = placement.usage[device] / estimated.usage[device]
        assert ratio == pytest.approx((9 * GIB - 900 * MIB) / (9 * GIB), rel=1e-6)


def test_learned_figures_for_other_layer_counts_do_not_apply() -> None:
    fp = learned(EIGHT_1G, (4, GIB, GIB))
    placement = plan("m", fp, [ram(32 * GIB), gpu(0, 24 * GIB)], []).placement
    assert placement.gpu_layers == 8
    assert placement.source == "estimated"
    assert plan("m", fp, [ram(32 * GIB), gpu(0, 24 * GIB)], [], gpu_layers=4).placement.usage == {
        "gpu0": GIB,
        "ram": GIB,
    }


def test_a_memory_override_is_configured() -> None:
    placement = plan("m", EIGHT_1G.scaled_to(4 * GIB), [ram(32 * GIB)], []).placement
    assert placement.source == "configured"


# --- properties ------------------------------------------------------------------------
# Small integer sizes keep the brute-force oracle below exhaustive.


def layouts(n: int, k: int, gpus: Sequence[str]) -> Iterator[dict[str, int]]:
    """Every way to put the last k layers on the GPUs as contiguous chunks in device order."""
    if k == 0:
        yield {}
        return
    for cuts in itertools.combinations_with_replacement(range(k + 1), len(gpus) - 1):
        bounds = (0, *cuts, k)
        yield {g: bounds[i + 1] - bounds[i] for i, g in enumerate(gpus)}


def usage_of(fp: Footprint, k: int, chunks: Mapping[str, int]) -> dict[str, int]:
    n = len(fp.layer_bytes)
    offloaded = fp.layer_bytes[n - k :]
    usage, start = {}, 0
    for g, count in chunks.items():
        if count:
            usage[g] = sum(offloaded[start : start + count])
            last = g
        start += count
    gpu_bytes, ram_bytes = fp.split(k) if k else (0, fp.total)
    if k:
        usage[last] += gpu_bytes - sum(offloaded)
    usage["ram"] = ram_bytes
    return usage


def fits(usage: Mapping[str, int], room: Mapping[str, int]) -> bool:
    return all(size <= room.get(d, 0) for d, size in usage.items())


def any_fit(fp: Footprint, room: Mapping[str, int], gpus: Sequence[str], ks: Sequence[int]) -> bool:
    n = len(fp.layer_bytes)
    return any(
        fits(usage_of(fp, k, chunks), room)
        for k in ks
        if k == 0 or gpus
        for chunks in layouts(n, k, gpus)
    )


def room_after(
    devices: Sequence[DeviceBudget], residents: Sequence[Resident], gone: set[str]
) -> dict[str, int]:
    room = {d.id: d.budget for d in devices}
    for r in residents:
        if r.id not in gone:
            for d, size in r.usage.items():
                room[d] = room.get(d, 0) - size
    return room


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Footprint, list[DeviceBudget], list[Resident], int | None]:
    layers = draw(st.lists(st.integers(0, 8), min_size=1, max_size=5))
    fixed = draw(st.integers(0, 8))
    fp = footprint(
        *layers,
        fixed=fixed,
        overhead=draw(st.integers(0, 4)),
        compute=draw(st.integers(0, fixed)),
        host_fixed=draw(st.integers(0, fixed)),
    )
    gpu_count = draw(st.sampled_from([0, 1, 1, 2, 2]))
    devices = [ram(draw(st.integers(4, 100)))]
    devices += [gpu(i, draw(st.integers(0, 30))) for i in range(gpu_count)]
    residents = []
    for index in range(draw(st.integers(0, 6))):
        usage = {d.id: draw(st.integers(1, 12)) for d in devices if draw(st.booleans())}
        residents.append(
            Resident(
                f"r{index}",
                usage,
                last_used=draw(st.integers(0, 3)),
                priority=draw(st.sampled_from([0, 1, 1, 2, 3])),
                busy=draw(st.sampled_from([False, False, False, True])),
            )
        )
    explicit = draw(st.booleans()) and draw(st.booleans())
    gpu_layers = draw(st.integers(0, len(layers) + 1)) if explicit else None
    return fp, devices, residents, gpu_layers


@settings(max_examples=1000, deadline=None)
@given(scenarios())
def test_plans_respect_budgets_protection_and_minimal_eviction(
    scenario: tuple[Footprint, list[DeviceBudget], list[Resident], int | None],
) -> None:
    fp, devices, residents, gpu_layers = scenario
    n = len(fp.layer_bytes)
    gpus = [d.id for d in devices if d.kind == "gpu"]
    evictable = {r.id for r in residents if not r.busy and r.priority != 0}
    result = plan_load("m", fp, devices, residents, gpu_layers=gpu_layers)
    allowed = list(range(n + 1)) if gpu_layers is None else [gpu_layers]
    allowed = [k for k in allowed if k <= n and (k == 0 or gpus)]

    if isinstance(result, Refusal):
        if result.impossible:
            assert not any_fit(fp, room_after(devices, [], set()), gpus, allowed)
        else:
            assert any_fit(fp, room_after(devices, [], set()), gpus, allowed)
            assert not any_fit(fp, room_after(devices, residents, evictable), gpus, allowed)
        return

    placement = result.placement
    evict = set(result.evict)
    assert len(evict) == len(result.evict)
    assert evict <= evictable  # never pinned, never busy
    room = room_after(devices, residents, evict)
    assert fits(placement.usage, room)
    assert sum(placement.usage.values()) == sum(fp.split(placement.gpu_layers))
    assert placement.source == "estimated"
    assert sum(placement.layers.values()) == placement.gpu_layers
    assert all(count > 0 for count in placement.layers.values())
    if gpu_layers is not None:
        assert placement.gpu_layers == gpu_layers

    # the group of placements the evictions were made for
    if gpu_layers is not None:
        group = [gpu_layers]
    elif placement.kind == "gpu":
        group = [n]
    else:
        group = [k for k in allowed if k < n]
        # a whole-GPU placement was out of reach even after evicting every idle model
        assert not any_fit(fp, room_after(devices, residents, evictable), gpus, [n])
    for victim in evict:  # minimal: every victim is needed
        assert not any_fit(fp, room_after(devices, residents, evict - {victim}), gpus, group)
    if evict and placement.kind != "gpu" and gpu_layers is None:
        assert not any_fit(fp, room_after(devices, residents, set()), gpus, allowed)

    # best in its group for the room it has
    if gpu_layers is None and placement.kind == "split":
        more = range(placement.gpu_layers + 1, n)
        assert not any_fit(fp, room, gpus, list(more))
    if gpu_layers is None and placement.kind == "cpu" and n > 0 and gpus:
        assert not any_fit(fp, room, gpus, list(range(1, n + 1)))
    if placement.gpu_layers and len(gpus) > 1:
        singles = [
            g
            for g in gpus
            if fits(usage_of(fp, placement.gpu_layers, {g: placement.gpu_layers}), room)
        ]
        if singles:
            assert len(placement.layers) == 1
            (chosen,) = placement.layers
            assert room[chosen] == max(room[g] for g in singles)


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.data())
def test_learned_plans_fit_and_use_the_learned_figures(
    scenario: tuple[Footprint, list[DeviceBudget], list[Resident], int | None],
    data: st.DataObject,
) -> None:
    fp, devices, residents, gpu_layers = scenario
    n = len(fp.layer_bytes)
    entries = data.draw(
        st.lists(
            st.tuples(st.integers(0, n), st.integers(0, 40), st.integers(0, 40)),
            unique_by=lambda e: e[0],
        )
    )
    fp = learned(fp, *entries)
    result = plan_load("m", fp, devices, residents, gpu_layers=gpu_layers)
    if isinstance(result, Refusal):
        return
    placement = result.placement
    assert fits(placement.usage, room_after(devices, residents, set(result.evict)))
    assert all(size >= 0 for size in placement.usage.values())
    measured = fp.learned_for(placement.gpu_layers)
    gpu_total = sum(size for device, size in placement.usage.items() if device != "ram")
    if measured is None:
        assert placement.source == "estimated"
        assert (gpu_total, placement.usage["ram"]) == fp.split(placement.gpu_layers)
    else:
        assert placement.source == "learned"
        assert placement.usage["ram"] == measured.ram_bytes
        assert gpu_total == (measured.gpu_bytes if placement.gpu_layers else 0)
