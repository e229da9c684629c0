"""Output of protos: the registry, health, load plans and one-line model summaries.

The text rules and tables themselves live in mmctl.tables, which reads JSON-shaped dicts;
the views here read protobuf messages and hand their parts over as dicts where a rule is
shared, so each rule has one implementation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from mmctl.tables import (
    Output,
    TextTable,
    cpu_list_text,
    format_duration,
    placement_text,
    print_failures,
    ps_table,
    size_or_dash,
)
from mmd.api import protojson
from mmd.api.protojson import state_name
from mmd.core.units import format_size
from mmd.v1 import mmd_pb2


def shares_text(placement: mmd_pb2.Placement) -> str:
    return ", ".join(
        f"{share.device} {format_size(share.bytes)} ({share.layers} layers)"
        for share in placement.shares
    )


def model_summary(model: mmd_pb2.Model) -> str:
    """One line about a model, as printed after load and unload."""
    state = state_name(model.state)
    parts = [f"{model.id}: {state}"]
    if model.pid:
        parts.append(f"pid {model.pid}")
    if state in ("ready", "loading"):
        if model.placement.total_layers or model.placement.gpu_layers:
            parts.append(placement_text(protojson.message_to_dict(model.placement)))
        if model.estimated_bytes:
            parts.append(f"est {format_size(model.estimated_bytes)}")
        if model.measured_bytes:
            parts.append(f"measured {format_size(model.measured_bytes)}")
    if model.last_error:
        parts.append(f"error: {model.last_error}")
    return ", ".join(parts)


def print_models(models: Sequence[mmd_pb2.Model], notes: Sequence[str] = ()) -> None:
    """`mmctl models`: the registry, then the notes on files model discovery skipped."""
    out = Output()
    # SOURCE comes last so that scripts cutting the earlier columns keep working.
    table = TextTable(
        ["ID", "ROLE", "STATE", "MEMORY EST", "PATH", "SOURCE"],
        state_column=2,
        drop_first=("ROLE", "SOURCE", "MEMORY EST", "PATH"),
    )
    for model in models:
        flags = [name for name in ("pinned", "embedding") if getattr(model, name)]
        role = (model.role or "-") + (f" ({', '.join(flags)})" if flags else "")
        table.rows.append(
            [
                model.id,
                role,
                state_name(model.state),
                size_or_dash(model.estimated_bytes),
                model.path,
                model.source or "config",  # a daemon older than the field: config alone
            ]
        )
    out.table_or_note(table, "no models in the registry")
    for note in notes:
        out.note(f"note: {note}", "yellow")


def print_health(health: mmd_pb2.Health, now: float | None = None) -> None:
    """`mmctl health`: devices, loaded models, requests, notes."""
    out = Output()
    header = f"mmd {health.version or '?'}, up {format_duration(health.uptime_seconds)}"
    if health.llama_server:
        header += f", llama-server {health.llama_server}"
    out.line(header, style="bold")
    out.line(http_line(health))
    if health.HasField("cpu"):
        out.line(f"CPU: {cpu_list_text(health.cpu.cpus)} ({health.cpu.source})")
    out.line()

    devices = TextTable(
        ["DEVICE", "KIND", "NAME", "TOTAL", "BUDGET", "MMD", "OTHER", "FREE"],
        drop_first=("KIND", "NAME", "OTHER", "TOTAL", "MMD", "BUDGET"),
    )
    for device in health.devices:
        devices.rows.append(
            [
                device.id,
                device.kind,
                device.name or "-",
                format_size(device.total_bytes),
                format_size(device.budget_bytes),
                format_size(device.mmd_bytes),
                format_size(device.other_bytes),
                format_size(device.free_bytes),
            ]
        )
    out.table(devices)
    out.line()

    if health.models:
        models = [protojson.model_to_dict(model) for model in health.models]
        out.table(ps_table(models, time.time() if now is None else now))
        print_failures(out, models, notes=False)
    else:
        out.line("no models loaded")
    out.line()
    limit = f" (max {health.max_concurrent})" if health.max_concurrent else ""
    queue_limit = f" (max {health.max_queue})" if health.max_queue else ""
    out.line(
        f"inferences: {health.active_inferences} active{limit}, "
        f"{health.queued_requests} queued{queue_limit}"
    )
    for note in health.notes:
        out.line(f"note: {note}", style="yellow")


def http_line(health: mmd_pb2.Health) -> str:
    """Where the HTTP front door listens ([http] listen), or that it is off."""
    return f"HTTP: {', '.join(health.http_listen) or 'off'}"


def cores_line(cores: mmd_pb2.Cores) -> str:
    """ "0-1, 2 threads (2 of 4 cores: the CPU is split with coder)"."""
    if not cores.cpus:
        return cores.reason
    threads = f"{cores.threads} {'thread' if cores.threads == 1 else 'threads'}"
    reason = f" ({cores.reason})" if cores.reason else ""
    return f"{cpu_list_text(cores.cpus)}, {threads}{reason}"


def plan_lines(plan: mmd_pb2.LoadPlan) -> list[str]:
    """`mmctl plan` as plain lines."""
    if plan.already_loaded:
        verdict = "already loaded"
    elif plan.feasible:
        verdict = "can load"
    else:
        verdict = "refused"
    lines = [f"{plan.model_id}: {verdict}"]
    if not plan.feasible and plan.reason:
        lines.append(f"  reason:     {plan.reason}")
    if plan.HasField("placement"):
        placement = placement_text(protojson.message_to_dict(plan.placement))
        lines.append(f"  placement:  {placement}")
        if plan.HasField("cores"):
            lines.append(f"  cores:      {cores_line(plan.cores)}")
        if plan.replace:
            lines.append(f"  re-places:  {', '.join(plan.replace)} (restarted on fewer cores)")
        if plan.placement.shares:
            lines.append(f"  devices:    {shares_text(plan.placement)}")
            if any(share.source == "learned" for share in plan.placement.shares):
                lines.append("              (measured on an earlier load with these settings)")
    if plan.HasField("footprint"):
        fp = plan.footprint
        lines.append(
            f"  footprint:  {format_size(fp.total_bytes)} total"
            f" = weights {format_size(fp.weights_bytes)}"
            f" + kv cache {format_size(fp.kv_cache_bytes)}"
            f" + compute {format_size(fp.compute_bytes)}"
            f" + overhead {format_size(fp.overhead_bytes)}"
        )
        if fp.overridden:
            lines.append("              (the registry's `memory` setting replaces the estimate)")
    if plan.evict:
        lines.append(f"  would evict: {', '.join(plan.evict)}")
    elif plan.feasible and not plan.already_loaded:
        lines.append("  would evict: nothing")
    return lines
