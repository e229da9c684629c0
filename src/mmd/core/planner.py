"""Where a model's layers go and which loaded models make room for it.

Pure policy: dataclasses in, a :class:`Plan` or a :class:`Refusal` out; no I/O, no clock.

Placements, best first:

1. every layer on one GPU (the GPU with the most free room that fits);
2. every layer across several GPUs (in device order, proportional to their free room);
3. a GPU/RAM split: as many of the last layers on the GPU(s) as fit, the rest in RAM;
   :meth:`Footprint.split` says which fixed bytes go along (on the GPU with the final layer);
4. CPU only: everything in RAM.

With an explicit ``gpu_layers`` only placements with exactly that many offloaded layers exist.

Figures. A placement's bytes come from the footprint's estimate, or, where an earlier load
of the same model with the same number of offloaded layers was measured
(``Footprint.learned``), from that measurement: the GPU bytes (all GPUs together; spread
over several GPUs as the estimate spreads them) and the RAM bytes. ``Placement.source``
says which: "estimated", "learned", or "configured" (the registry's ``memory`` setting).

Eviction. Unloading another model costs its next request a reload, so it is only worth it
where it buys a lot:

1. a full-GPU placement (1 or 2) that fits now;
2. else a full-GPU placement after evicting idle models;
3. else a split or CPU-only placement (3 or 4) that fits now;
4. else any placement after evicting idle models.

So an idle model is swapped out of VRAM for a new one that fits there whole (LRU hot swap),
but never just to move a few more layers of a split onto the GPU. With an explicit
``gpu_layers`` the steps are: fits now, else fits after eviction.

Victims are residents that are neither busy nor pinned (priority 0), least recently used
first (ties: higher priority number first, then id). The planner takes the shortest such
prefix that makes room, then keeps a victim only if the placement stops fitting without it,
trying the most recently used first. Since more room never hurts a fit, no single victim of
the result can be spared.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from mmd.core.footprint import Footprint
from mmd.core.units import format_size

Chunks = tuple[tuple[str, int], ...]  # (gpu id, layer count) in device order
_MOST = -1  # stands for "a GPU/RAM split with as many layers on the GPU(s) as fit"


@dataclass(frozen=True)
class DeviceBudget:
    id: str  # "ram", "gpu0", "gpu1" ...
    kind: Literal["ram", "gpu"]
    budget: int  # bytes mmd may hold on this device now (reserve already taken off)


@dataclass(frozen=True)
class Resident:
    """A model that holds memory now (loaded, loading or unloading)."""

    id: str
    usage: Mapping[str, int]  # device id -> bytes accounted to it
    last_used: float  # monotonic seconds; larger = more recent
    priority: int  # 0 = pinned (never evicted); lower number = stays longer
    busy: bool  # requests in flight, loading or unloading: never evicted


Source = Literal["estimated", "learned", "configured"]


@dataclass(frozen=True)
class Placement:
    gpu_layers: int  # total layers offloaded (the -ngl mmd passes)
    layers: Mapping[str, int]  # gpu device id -> layers on it, device order; empty for CPU
    usage: Mapping[str, int]  # device id -> bytes (always includes the RAM device)
    total_layers: int | None = None  # the model's layer count; None: gpu_layers is all
    source: Source = "estimated"  # where the bytes in usage come from

    @property
    def kind(self) -> Literal["gpu", "split", "cpu"]:
        if self.gpu_layers == 0:
            return "cpu"
        if self.total_layers is None or self.gpu_layers >= self.total_layers:
            return "gpu"
        return "split"


@dataclass(frozen=True)
class Plan:
    placement: Placement
    evict: tuple[str, ...]  # resident ids to unload first, in order


@dataclass(frozen=True)
class Refusal:
    reason: str  # one line with the numbers and the pinned/busy models
    needed: Mapping[str, int]  # the closest placement's usage (empty for a bad request)
    budget: Mapping[str, int]
    used: Mapping[str, int]  # held by residents that cannot be evicted
    pinned: tuple[str, ...]
    busy: tuple[str, ...]
    impossible: bool  # does not fit even with nothing else loaded


@dataclass(frozen=True)
class _Job:
    """One load request with the device layout resolved."""

    footprint: Footprint
    layer_count: int
    per_layer: bool  # the footprint knows each layer's size, so it can be split
    ram_id: str
    gpu_ids: tuple[str, ...]

    def split(self, k: int) -> tuple[int, int]:
        """(GPU bytes, RAM bytes) with the last ``k`` layers offloaded: learned or estimated."""
        learned = self.footprint.learned_for(k)
        if learned is not None:
            # GPU memory a CPU-only load held (a GPU context it should not have made) has no
            # GPU to be placed on; measuring the running child accounts for it.
            return (learned.gpu_bytes if k else 0), learned.ram_bytes
        return self.estimated_split(k)

    def estimated_split(self, k: int) -> tuple[int, int]:
        if self.per_layer:
            return self.footprint.split(k)
        total = self.footprint.total
        if k == 0:
            return 0, total
        return total - self.footprint.overhead_bytes, self.footprint.overhead_bytes

    def gpu_extra(self, k: int) -> int:
        """GPU bytes beyond the offloaded layers' own (they sit with the final layer)."""
        return max(self.split(k)[0] - sum(self.offloaded(k)), 0)

    def source(self, k: int) -> Source:
        if self.footprint.learned_for(k) is not None:
            return "learned"
        return "configured" if self.footprint.overridden else "estimated"

    def offloaded(self, k: int) -> Sequence[int]:
        """Sizes of the last ``k`` layers (zeros when the footprint has no per-layer sizes)."""
        if not self.per_layer:
            return (0,) * k
        sizes = self.footprint.layer_bytes
        return sizes[len(sizes) - k :]


def plan_load(
    model_id: str,
    footprint: Footprint,
    devices: Sequence[DeviceBudget],
    residents: Sequence[Resident],
    gpu_layers: int | None = None,
    total_layers: int | None = None,
) -> Plan | Refusal:
    """Plan loading ``model_id``; ``gpu_layers`` is honoured exactly or refused.

    ``total_layers`` gives the layer count when the footprint has no per-layer sizes (an
    overridden footprint); such a model is placed whole on one GPU or on the CPU.
    """
    job = _job(footprint, devices, total_layers)
    budget = {d.id: d.budget for d in devices}
    pinned = tuple(r.id for r in residents if r.priority == 0)
    busy = tuple(r.id for r in residents if r.busy)
    stuck = [r for r in residents if r.priority == 0 or r.busy]
    used = _room({}, stuck, sign=1)

    def refuse(reason: str, needed: Mapping[str, int], impossible: bool) -> Refusal:
        return Refusal(reason, needed, budget, used, pinned, busy, impossible)

    bad = _bad_request(job, gpu_layers)
    if bad:
        return refuse(f"cannot load {model_id}: {bad}", {}, impossible=True)
    if _best(job, budget, gpu_layers) is None:
        needed, how = _closest(job, budget, gpu_layers)
        return refuse(
            f"{model_id} does not fit even with nothing else loaded: needs "
            f"{_sizes(needed, devices)} ({how}); budget {_sizes(budget, devices)}",
            needed,
            impossible=True,
        )

    victims = sorted(
        (r for r in residents if not r.busy and r.priority != 0),
        key=lambda r: (r.last_used, -r.priority, r.id),
    )
    base = _room(budget, residents, sign=-1)
    for allowed in _steps(job, gpu_layers):
        plan = _plan_with_fewest_victims(job, base, victims, allowed)
        if plan is not None:
            return plan

    after_all = _room(base, victims, sign=1)
    needed, how = _closest(job, after_all, gpu_layers)
    free = {d: max(b - used.get(d, 0), 0) for d, b in budget.items()}
    return refuse(
        f"not enough memory for {model_id}: needs {_sizes(needed, devices)} ({how}); "
        f"budget {_sizes(budget, devices)}; held by models that cannot be evicted "
        f"{_sizes(used, devices)} (free after evicting all idle models "
        f"{_sizes(free, devices)}); pinned: {', '.join(pinned) or 'none'}; "
        f"busy: {', '.join(busy) or 'none'}",
        needed,
        impossible=False,
    )


def _job(footprint: Footprint, devices: Sequence[DeviceBudget], total_layers: int | None) -> _Job:
    rams = [d.id for d in devices if d.kind == "ram"]
    if len(rams) != 1:
        raise ValueError(f"expected exactly one RAM device, got {len(rams)}")
    per_layer = bool(footprint.layer_bytes)
    count = len(footprint.layer_bytes) if per_layer else (total_layers or 0)
    if per_layer and total_layers is not None and total_layers != count:
        raise ValueError(f"total_layers={total_layers} but the footprint has {count} layers")
    gpus = tuple(d.id for d in devices if d.kind == "gpu")
    return _Job(footprint, count, per_layer, rams[0], gpus)


def _bad_request(job: _Job, gpu_layers: int | None) -> str | None:
    if gpu_layers is None or gpu_layers == 0:
        return None
    if gpu_layers < 0:
        return f"gpu_layers must be 0 or more, not {gpu_layers}"
    if gpu_layers > job.layer_count:
        return f"gpu_layers={gpu_layers} but the model has only {job.layer_count} layers"
    if not job.gpu_ids:
        return f"gpu_layers={gpu_layers} asked for, but there is no GPU device"
    if gpu_layers < job.layer_count and not job.per_layer:
        return (
            f"gpu_layers={gpu_layers} splits the model, but its footprint has no "
            "per-layer sizes: use 0 or all layers"
        )
    return None


def _steps(job: _Job, gpu_layers: int | None) -> list[list[int]]:
    """Offloaded layer counts to try, in turn, each first without and then with eviction."""
    if gpu_layers is not None:
        return [[gpu_layers]]
    if job.layer_count == 0 or not job.gpu_ids:
        return [[0]]
    return [[job.layer_count], [_MOST, 0]]


def _room(start: Mapping[str, int], residents: Sequence[Resident], sign: int) -> dict[str, int]:
    """``start`` plus (sign=1) or minus (sign=-1) the residents' usage."""
    room = dict(start)
    for resident in residents:
        for device, size in resident.usage.items():
            room[device] = room.get(device, 0) + sign * size
    return room


def _plan_with_fewest_victims(
    job: _Job, base: Mapping[str, int], victims: Sequence[Resident], allowed: Sequence[int]
) -> Plan | None:
    """The best placement with ``allowed`` offloaded layer counts after minimal eviction."""

    def fits(chosen: Sequence[Resident]) -> Placement | None:
        room = _room(base, chosen, sign=1)
        return next((p for k in allowed if (p := _placed(job, room, k)) is not None), None)

    placement = fits(())
    if placement is not None:
        return Plan(placement, ())
    for end in range(1, len(victims) + 1):
        if fits(victims[:end]) is not None:
            break
    else:
        return None
    chosen = list(victims[:end])
    for victim in reversed(victims[:end]):  # spare the most recently used first
        rest = [r for r in chosen if r is not victim]
        if fits(rest) is not None:
            chosen = rest
    placement = fits(chosen)
    assert placement is not None
    return Plan(placement, tuple(r.id for r in chosen))


def _best(job: _Job, room: Mapping[str, int], gpu_layers: int | None) -> Placement | None:
    """The best placement that fits ``room`` (no eviction involved)."""
    for allowed in _steps(job, gpu_layers):
        for k in allowed:
            if (placement := _placed(job, room, k)) is not None:
                return placement
    return None


def _placed(job: _Job, room: Mapping[str, int], k: int, check_ram: bool = True) -> Placement | None:
    """First layout offloading ``k`` layers (or ``_MOST``) that fits, best first."""
    n = job.layer_count
    if k == _MOST:
        k = _most_split_layers(job, room) if job.per_layer and job.gpu_ids else 0
        if k == 0:
            return None
    if k > n or (k > 0 and not job.gpu_ids) or (0 < k < n and not job.per_layer):
        return None
    for chunks in _layouts(job, room, k):
        placement = _placement(job, chunks, k)
        if _fits(placement.usage, room, skip=None if check_ram else job.ram_id):
            return placement
    return None


def _most_split_layers(job: _Job, room: Mapping[str, int]) -> int:
    """Largest k < layer_count whose last k layers (and GPU extras) pack onto the GPUs."""
    gpus = _gpus_with_room(job, room)
    total_room = sum(room[g] for g in gpus)
    for k in range(job.layer_count - 1, 0, -1):
        gpu_bytes = job.split(k)[0]
        if gpu_bytes > total_room:
            continue
        if job.footprint.learned_for(k) and any(room[g] >= gpu_bytes for g in gpus):
            return k  # measured as a whole: one GPU with room for it will do
        if _pack(job.offloaded(k), job.gpu_extra(k), gpus, room) is not None:
            return k
    return 0


def _layouts(job: _Job, room: Mapping[str, int], k: int) -> Iterator[Chunks]:
    """Layer layouts for ``k`` offloaded layers, best first (not checked against room)."""
    if k == 0:
        yield ()
        return
    for gpu in sorted(job.gpu_ids, key=lambda g: -room.get(g, 0)):  # stable: device order
        yield ((gpu, k),)
    gpus = _gpus_with_room(job, room)
    if len(gpus) > 1:
        sizes = job.offloaded(k)
        fixed = job.gpu_extra(k)
        for chunks in (_proportional(sizes, fixed, gpus, room), _pack(sizes, fixed, gpus, room)):
            if chunks:
                yield chunks


def _gpus_with_room(job: _Job, room: Mapping[str, int]) -> list[str]:
    """GPUs not already over budget (zero-byte layers fit even where the room is 0)."""
    return [g for g in job.gpu_ids if room.get(g, 0) >= 0]


def _proportional(
    sizes: Sequence[int], fixed: int, gpus: Sequence[str], room: Mapping[str, int]
) -> Chunks | None:
    """Contiguous chunks sized in proportion to each GPU's room (the last one holds ``fixed``)."""
    weights = [room[g] for g in gpus]
    weights[-1] = max(weights[-1] - fixed, 0)
    total_weight, total_size = sum(weights), sum(sizes)
    if total_weight == 0:
        return None
    bounds: list[float] = []
    acc = 0
    for weight in weights:
        acc += weight
        bounds.append(acc / total_weight)
    counts = [0] * len(gpus)
    before = 0
    for index, size in enumerate(sizes):
        middle = (before + size / 2) / total_size if total_size else (index + 0.5) / len(sizes)
        before += size
        counts[next((j for j, b in enumerate(bounds) if middle < b), len(gpus) - 1)] += 1
    return tuple((g, c) for g, c in zip(gpus, counts, strict=True) if c > 0)


def _pack(
    sizes: Sequence[int], fixed: int, gpus: Sequence[str], room: Mapping[str, int]
) -> Chunks | None:
    """Greedy contiguous packing; the GPU with the final layer also holds ``fixed``.

    Each GPU in turn takes everything left if that fits, else as many layers as fit while
    leaving at least one for later; this finds a packing whenever one exists.
    """
    chunks: list[tuple[str, int]] = []
    start = 0
    for gpu in gpus:
        left = sizes[start:]
        if sum(left) + fixed <= room[gpu]:
            chunks.append((gpu, len(left)))
            return tuple(c for c in chunks if c[1] > 0)
        taken, acc = 0, 0
        while taken < len(left) - 1 and acc + left[taken] <= room[gpu]:
            acc += left[taken]
            taken += 1
        chunks.append((gpu, taken))
        start += taken
    return None


def _placement(job: _Job, chunks: Chunks, k: int) -> Placement:
    estimated_gpu = job.estimated_split(k)[0]
    gpu_bytes, ram_bytes = job.split(k)
    sizes = job.offloaded(k)
    usage: dict[str, int] = {}
    start = 0
    for gpu, count in chunks:
        usage[gpu] = sum(sizes[start : start + count])
        start += count
    if chunks:  # the fixed part (if offloaded) sits with the final layer
        last = chunks[-1][0]
        usage[last] += estimated_gpu - sum(sizes)
        if gpu_bytes != estimated_gpu:  # learned: spread as the estimate spreads
            usage = _rescaled(usage, gpu_bytes, last)
    usage[job.ram_id] = ram_bytes
    return Placement(k, dict(chunks), usage, job.layer_count, job.source(k))


def _rescaled(usage: Mapping[str, int], total: int, last: str) -> dict[str, int]:
    """``usage`` scaled to add up to ``total``; rounding leftovers go to ``last``."""
    before = sum(usage.values())
    if before <= 0:
        return {gpu: (total if gpu == last else 0) for gpu in usage}
    scaled = {gpu: size * total // before for gpu, size in usage.items()}
    scaled[last] += total - sum(scaled.values())
    return scaled


def _fits(usage: Mapping[str, int], room: Mapping[str, int], skip: str | None = None) -> bool:
    return all(size <= room.get(d, 0) for d, size in usage.items() if d != skip)


def _closest(
    job: _Job, room: Mapping[str, int], gpu_layers: int | None
) -> tuple[dict[str, int], str]:
    """The usage to report in a refusal: the best placement whose GPU part fits, if any."""
    for allowed in _steps(job, gpu_layers):
        for k in allowed:
            if (placement := _placed(job, room, k, check_ram=False)) is not None:
                return dict(placement.usage), _describe(placement)
    k = gpu_layers or 0  # only an explicit gpu_layers can miss the GPUs entirely
    chunks = next(_layouts(job, room, k))
    placement = _placement(job, chunks, k)
    return dict(placement.usage), _describe(placement)


def _describe(placement: Placement) -> str:
    if placement.kind == "cpu":
        return "CPU only"
    if placement.kind == "gpu":
        return f"all {placement.gpu_layers} layers on GPU"
    return f"{placement.gpu_layers} of {placement.total_layers} layers on GPU"


def _sizes(sizes: Mapping[str, int], devices: Sequence[DeviceBudget]) -> str:
    """``gpu0 6.0 GiB, ram 1.0 GiB`` in device order."""
    order = {d.id: i for i, d in enumerate(devices)}
    keys = sorted(sizes, key=lambda d: (order.get(d, len(order)), d))
    return ", ".join(f"{d} {format_size(sizes[d])}" for d in keys) or "nothing"
