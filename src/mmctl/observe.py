"""`mmctl events` and `mmctl logs`: the daemon's event stream and a model's llama-server log."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated

import typer

from mmctl import tables
from mmctl.options import ModelId, client_for, finite
from mmd.api import protojson
from mmd.api.protojson import event_to_dict, event_type
from mmd.core.units import format_size
from mmd.v1 import mmd_pb2 as pb

Interval = Annotated[
    float,
    typer.Option(
        "--interval",
        metavar="SECONDS",
        min=0.0,
        callback=finite,
        help="Seconds between memory samples (the daemon samples once a second).",
    ),
]


# ---------------------------------------------------------------------------
# One event as JSON or as a line


def _clock(unix: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(unix))


def _ms(value: float) -> str:
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"


def device_text(device: pb.Device) -> str:
    return (
        f"{device.id} mmd {format_size(device.mmd_bytes)}, other {format_size(device.other_bytes)}"
        f", free {format_size(device.free_bytes)}, budget {format_size(device.budget_bytes)}"
    )


def model_event_text(change: pb.ModelEvent) -> str:
    text = f"{change.model_id} {protojson.state_name(change.state)} ({change.reason}"
    if change.for_model:
        text += f" for {change.for_model}"
    text += ")"
    if change.detail:
        text += f": {change.detail}"
    if change.model.pid and change.state == pb.MODEL_STATE_READY:
        placement = tables.placement_text(protojson.message_to_dict(change.model.placement))
        text += f", pid {change.model.pid}, {placement}"
    return text


def request_text(request: pb.RequestEvent) -> str:
    text = (
        f"{request.model_id} {request.kind} {request.status}, queue {_ms(request.queue_ms)}, "
        f"total {_ms(request.total_ms)}"
    )
    if request.kind == "infer" and request.status == "ok":
        text += (
            f", first token {_ms(request.first_token_ms)}, {request.completion_tokens} tokens"
            f", {request.tokens_per_second:.1f} tok/s"
        )
    if request.error:
        text += f": {request.error}"
    return text


def event_text(event: pb.Event) -> str:
    """The event without its time."""
    kind = event_type(event)
    if kind == "snapshot":
        health = event.snapshot
        models = ", ".join(f"{m.id} {protojson.state_name(m.state)}" for m in health.models)
        devices = "; ".join(device_text(d) for d in health.devices)
        return (
            f"mmd {health.version}, {devices}; models: {models or 'none loaded'}; "
            f"{health.active_inferences} active, {health.queued_requests} queued"
        )
    if kind == "model":
        return model_event_text(event.model)
    if kind == "request":
        return request_text(event.request)
    if kind == "memory":
        memory = event.memory
        devices = "; ".join(device_text(d) for d in memory.devices)
        return f"{devices}; {memory.active_inferences} active, {memory.queued_requests} queued"
    if kind == "alert":
        alert = event.alert
        where = "above" if alert.above else "back below"
        return (
            f"{alert.device} memory {where} {alert.threshold_percent:.0f}% "
            f"(used {alert.used_percent:.0f}%)"
        )
    if kind == "lagged":
        return f"fell behind: {event.lagged.dropped} events dropped, a snapshot follows"
    return kind


def event_line(event: pb.Event) -> str:
    return f"{_clock(event.time_unix)} {event_type(event):<8} {event_text(event)}"


# ---------------------------------------------------------------------------
# Commands


def events(
    ctx: typer.Context,
    json_out: Annotated[
        bool,
        typer.Option(
            "--json",
            help='JSON lines: "type" (snapshot, model, request, memory, alert, lagged), '
            '"time", then the event\'s fields.',
        ),
    ] = False,
    no_memory: Annotated[
        bool, typer.Option("--no-memory", help="Leave out the periodic memory samples.")
    ] = False,
    interval: Interval = 1.0,
) -> None:
    """Print the daemon's events as they happen: a snapshot first, then model state changes,
    finished requests, memory samples and alerts. Runs until interrupted."""
    with client_for(ctx) as client:
        for event in client.watch(interval):
            if no_memory and event_type(event) == "memory":
                continue
            line = json.dumps(event_to_dict(event)) if json_out else event_line(event)
            sys.stdout.write(line + "\n")
            sys.stdout.flush()


def logs(
    ctx: typer.Context,
    model_id: ModelId,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines as they are written.")
    ] = False,
    lines: Annotated[
        int, typer.Option("--lines", "-n", metavar="N", min=1, help="Print the last N lines.")
    ] = 20,
) -> None:
    """Print the last lines of a model's llama-server log."""
    with client_for(ctx) as client:
        for batch in client.logs(model_id, lines=lines, follow=follow):
            for line in batch.lines:
                sys.stdout.write(line + "\n")
            sys.stdout.flush()
