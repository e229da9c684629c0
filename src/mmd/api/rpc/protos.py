"""Domain state as proto messages: models, placements, footprints, devices, health."""

from __future__ import annotations

import time

from mmd import __version__
from mmd.core.budget import DeviceBudgetView
from mmd.core.cores import CoreShare, args_place_threads
from mmd.core.footprint import Footprint
from mmd.core.model_state import ModelEntry, State
from mmd.core.planner import Placement
from mmd.core.spec import ModelSpec
from mmd.engine.engine import Engine
from mmd.host.memory import RAM_ID
from mmd.v1 import mmd_pb2 as pb

STATES = {
    State.UNLOADED: pb.MODEL_STATE_UNLOADED,
    State.LOADING: pb.MODEL_STATE_LOADING,
    State.READY: pb.MODEL_STATE_READY,
    State.UNLOADING: pb.MODEL_STATE_UNLOADING,
    State.FAILED: pb.MODEL_STATE_FAILED,
}


def placement_proto(placement: Placement | None, total_layers: int) -> pb.Placement:
    if placement is None:
        return pb.Placement(total_layers=total_layers)
    return pb.Placement(
        gpu_layers=placement.gpu_layers,
        total_layers=total_layers,
        shares=[
            pb.DeviceShare(
                device=device,
                bytes=size,
                layers=placement.layers.get(device, 0),
                source=placement.source,
            )
            for device, size in sorted(placement.usage.items())
        ],
    )


def memory_protos(entry: ModelEntry) -> list[pb.DeviceMemory]:
    """Per device: the plan's figure, llama-server's own buffer sizes and the measurement.

    Devices with any figure, "ram" first; none for a model that holds no process.
    """
    if not entry.holds_memory:
        return []
    planned = dict(entry.placement.usage) if entry.placement else {}
    source = entry.placement.source if entry.placement else "estimated"
    devices = {RAM_ID} | {
        d for figures in (planned, entry.runtime, entry.measured) for d, b in figures.items() if b
    }
    return [
        pb.DeviceMemory(
            device=device,
            estimated_bytes=planned.get(device, 0),
            estimate_source=source,
            runtime_bytes=entry.runtime.get(device, 0),
            measured_bytes=entry.measured.get(device, 0),
        )
        for device in sorted(devices, key=lambda d: (d != RAM_ID, len(d), d))
    ]


def footprint_proto(fp: Footprint) -> pb.Footprint:
    return pb.Footprint(
        weights_bytes=fp.weights_bytes,
        kv_cache_bytes=fp.kv_cache_bytes,
        compute_bytes=fp.compute_bytes,
        overhead_bytes=fp.overhead_bytes,
        total_bytes=fp.total,
        overridden=fp.overridden,
    )


def _wall(engine: Engine, loop_time: float) -> float:
    """A loop-clock instant as Unix time (0 stays 0)."""
    return time.time() - (engine.now() - loop_time) if loop_time else 0.0


def model_proto(engine: Engine, entry: ModelEntry) -> pb.Model:
    spec = entry.spec
    keep_alive = engine.keep_alive_of(entry)
    model = pb.Model(
        id=spec.id,
        role=spec.role,
        path=str(spec.path),
        state=STATES[entry.state],
        pid=engine.pid_of(spec.id),
        ctx=spec.ctx,
        parallel=spec.parallel,
        priority=spec.priority,
        pinned=spec.pinned,
        embedding=spec.embedding,
        estimated_bytes=entry.footprint.total,
        measured_bytes=sum(entry.measured.values()),
        placement=placement_proto(entry.placement, len(entry.footprint.layer_bytes)),
        active_requests=entry.active,
        queued_requests=entry.queued,
        last_used_unix=_wall(engine, entry.last_used),
        ready_since_unix=_wall(engine, entry.ready_since) if entry.state == State.READY else 0,
        keep_alive_seconds=-1.0 if spec.pinned else keep_alive,
        unloads_at_unix=_wall(engine, entry.idle_deadline or 0.0),
        last_error=entry.last_error,
        footprint=footprint_proto(entry.footprint),
        memory=memory_protos(entry),
        source=spec.source,
    )
    cores = cores_proto(entry.spec, entry.cores, entry.cores_reason)
    if cores is not None and entry.holds_memory:
        model.cores.CopyFrom(cores)
    if entry.state == State.FAILED:
        model.log_tail.extend(engine.log_tail(spec.id))
    return model


def cores_proto(spec: ModelSpec, cores: CoreShare | None, reason: str) -> pb.Cores | None:
    """A child's cores; a model whose args place its threads says so with no cores."""
    if cores is not None:
        return pb.Cores(
            cpus=cores.cpus, threads=cores.threads, shared_with=cores.shared_with, reason=reason
        )
    if args_place_threads(spec.args):
        return pb.Cores(reason="threads and cores set by its args")
    return None


def registry_proto(engine: Engine) -> pb.ListModelsResponse:
    """Every registered model, and what model discovery skipped: ListModels, and the same
    for the HTTP admin API and the JSON Lines socket."""
    models = [model_proto(engine, entry) for entry in engine.model_entries()]
    return pb.ListModelsResponse(models=models, notes=engine.config.notes)


def health_proto(engine: Engine) -> pb.Health:
    """Devices, models that are not unloaded, request counts: GetHealth and Watch's snapshot."""
    notes = list(engine.snapshot.notes) if engine.snapshot else []
    notes += engine.config.notes  # what model discovery skipped
    cpu = engine.cpu_budget
    return pb.Health(
        version=__version__,
        uptime_seconds=time.time() - engine.started,
        devices=[device_proto(v) for v in engine.budgets],
        models=[
            model_proto(engine, e) for e in engine.model_entries() if e.state != State.UNLOADED
        ],
        active_inferences=engine.active_total,
        queued_requests=engine.queued_total,
        notes=notes,
        llama_server=engine.runtime.describe(),
        max_concurrent=engine.config.scheduler.max_concurrent,
        max_queue=engine.config.scheduler.max_queue,
        http_listen=engine.http_listen,
        cpu=pb.CpuBudget(cpus=cpu.cpus, source=cpu.source) if cpu else None,
    )


def device_proto(view: DeviceBudgetView) -> pb.Device:
    return pb.Device(
        id=view.id,
        kind=view.kind,
        name=view.name,
        total_bytes=view.total,
        budget_bytes=view.budget,
        mmd_bytes=view.mmd_bytes,
        other_bytes=view.other_bytes,
        free_bytes=view.free,
    )
