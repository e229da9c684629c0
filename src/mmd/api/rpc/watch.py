"""Watch and Logs: the daemon's event stream and the models' llama-server logs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from mmd.api.rpc.errors import Context, streaming
from mmd.api.rpc.protos import STATES, device_proto, health_proto, model_proto
from mmd.core.budget import over_alert
from mmd.core.errors import FailedPrecondition, InvalidRequest
from mmd.core.model_state import State
from mmd.engine.engine import Engine
from mmd.engine.events import AlertCrossed, Event, MemorySampled, ModelChanged, RequestFinished
from mmd.host import paths
from mmd.v1 import mmd_pb2 as pb

DEFAULT_MEMORY_INTERVAL_S = 1.0
# Engine samples arrive about once a second; jitter must not make a 2 s watcher skip one.
_INTERVAL_SLACK_S = 0.1
# How often a watcher checks whether the daemon is shutting down, when no event comes.
_SHUTDOWN_CHECK_S = 0.5

DEFAULT_LOG_LINES = 20
MAX_LOG_LINES = 100_000
LOG_POLL_S = 0.2
# The most read back from the end of a log for its last lines, and the most sent at once.
_MAX_TAIL_BYTES = 8 * 1024 * 1024
_MAX_LINES_PER_MESSAGE = 1000


def event_proto(engine: Engine, stamp: float, event: Event) -> pb.Event:
    """One published engine event as the Watch message."""

    out = pb.Event(time_unix=stamp)
    match event:
        case ModelChanged():
            out.model.CopyFrom(
                pb.ModelEvent(
                    model_id=event.model_id,
                    state=STATES.get(State(event.state), pb.MODEL_STATE_UNSPECIFIED),
                    reason=event.reason,
                    for_model=event.for_model,
                    detail=event.detail,
                )
            )
            entry = engine.find_entry(event.model_id)
            if entry is not None:  # a model removed by a reload has no current view
                out.model.model.CopyFrom(model_proto(engine, entry))
        case RequestFinished():
            out.request.CopyFrom(
                pb.RequestEvent(
                    model_id=event.model_id,
                    kind=event.kind,
                    status=event.status,
                    queue_ms=event.queue_ms,
                    first_token_ms=event.first_token_ms,
                    total_ms=event.total_ms,
                    prompt_tokens=event.prompt_tokens,
                    completion_tokens=event.completion_tokens,
                    tokens_per_second=event.tokens_per_second,
                    error=event.error,
                )
            )
        case MemorySampled():
            out.memory.CopyFrom(
                pb.MemorySample(
                    devices=[device_proto(v) for v in event.devices],
                    active_inferences=event.active,
                    queued_requests=event.queued,
                )
            )
        case AlertCrossed():
            out.alert.CopyFrom(
                pb.MemoryAlert(
                    device=event.device,
                    used_percent=event.used_percent,
                    threshold_percent=event.threshold_percent,
                    above=event.above,
                )
            )
    return out


def snapshot_events(engine: Engine) -> list[pb.Event]:
    """The current state: Health, then an alert for each device already above the threshold
    (its crossing was published before this watcher came)."""

    now = time.time()
    events = [pb.Event(time_unix=now, snapshot=health_proto(engine))]
    threshold = engine.config.budget.alert_percent
    for view in engine.budgets:
        if view.total and over_alert(view, threshold):
            alert = pb.MemoryAlert(
                device=view.id,
                used_percent=view.used_percent,
                threshold_percent=threshold,
                above=True,
            )
            events.append(pb.Event(time_unix=now, alert=alert))
    return events


def read_tail(path: Path, lines: int) -> tuple[list[str], int]:
    """The last ``lines`` complete lines of a file and the offset where following starts."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            start = size
            data = b""
            while start > 0 and data.count(b"\n") <= lines and size - start < _MAX_TAIL_BYTES:
                step = min(64 * 1024, start)
                start -= step
                handle.seek(start)
                data = handle.read(step) + data
    except OSError:
        return [], 0
    end = data.rfind(b"\n") + 1  # a partial last line is sent once it is complete
    text = data[:end].decode("utf-8", errors="replace")
    found = text.splitlines()
    if start > 0 and found:
        found = found[1:]  # the first may be cut
    return found[-lines:] if lines else [], start + end


class LogFollower:
    """New complete lines of a log, read from an offset; survives truncation and rotation."""

    def __init__(self, path: Path, offset: int) -> None:
        self.path = path
        self.offset = offset
        self.partial = b""
        self.inode = self._inode()

    def _inode(self) -> int | None:
        try:
            return self.path.stat().st_ino
        except OSError:
            return None

    def read(self) -> list[str]:
        inode = self._inode()
        if inode is None:
            return []
        try:
            with self.path.open("rb") as handle:
                size = handle.seek(0, os.SEEK_END)
                if inode != self.inode or size < self.offset:
                    # A new file or a truncated one: it starts over.
                    self.inode, self.offset, self.partial = inode, 0, b""
                handle.seek(self.offset)
                data = handle.read(_MAX_TAIL_BYTES)
        except OSError:
            return []
        self.offset += len(data)
        data = self.partial + data
        end = data.rfind(b"\n") + 1
        self.partial = data[end:]
        return data[:end].decode("utf-8", errors="replace").splitlines()


def _batches(lines: list[str]) -> list[pb.LogLines]:
    step = _MAX_LINES_PER_MESSAGE
    return [pb.LogLines(lines=lines[i : i + step]) for i in range(0, len(lines), step)]


async def follow_events(
    engine: Engine, memory_interval: float, idle_after: float | None = None
) -> AsyncGenerator[pb.Event | None, None]:
    """What a watcher sees (gRPC Watch, the dashboard's /api/events): a snapshot, then
    events as they happen, memory samples at most every ``memory_interval`` seconds,
    until the daemon shuts down. A watcher that fell behind is told how many events it
    lost, then gets a fresh snapshot. With ``idle_after``, None after that many seconds
    without an event (for a keep-alive)."""
    subscription = engine.events.subscribe()
    try:
        for event in snapshot_events(engine):
            yield event
        last_memory = 0.0
        last_sent = time.monotonic()
        while not engine.closed:
            if subscription.dropped:
                # Fell behind: what is still queued is stale too. Say how much was lost,
                # then a fresh snapshot replaces it.
                dropped = subscription.take_dropped()
                while not subscription.queue.empty():
                    subscription.queue.get_nowait()
                    dropped += 1
                yield pb.Event(time_unix=time.time(), lagged=pb.Lagged(dropped=dropped))
                for event in snapshot_events(engine):
                    yield event
                last_sent = time.monotonic()
                continue
            try:
                stamp, item = await asyncio.wait_for(subscription.queue.get(), _SHUTDOWN_CHECK_S)
            except TimeoutError:
                item = None
            if item is not None and isinstance(item, MemorySampled):
                if stamp - last_memory < memory_interval - _INTERVAL_SLACK_S:
                    item = None
                else:
                    last_memory = stamp
            if item is not None:
                last_sent = time.monotonic()
                yield event_proto(engine, stamp, item)
            elif idle_after is not None and time.monotonic() - last_sent >= idle_after:
                last_sent = time.monotonic()
                yield None
    finally:
        engine.events.unsubscribe(subscription)


class WatchService:
    engine: Engine

    @streaming
    async def Watch(self, request: pb.WatchRequest, context: Context) -> Any:
        interval = request.memory_interval_seconds
        if interval < 0:
            raise InvalidRequest(f"memory_interval_seconds must not be negative, got {interval:g}")
        interval = interval or DEFAULT_MEMORY_INTERVAL_S
        async with contextlib.aclosing(follow_events(self.engine, interval)) as events:
            async for event in events:
                if event is not None:
                    yield event

    @streaming
    async def Logs(self, request: pb.LogsRequest, context: Context) -> Any:
        if not request.model_id:
            raise InvalidRequest("model_id is empty")
        self.engine.entry(request.model_id)  # UnknownModel -> NOT_FOUND
        count = min(request.lines or DEFAULT_LOG_LINES, MAX_LOG_LINES)
        # The file the engine gives each model's llama-server (see Engine.log_tail).
        path = paths.model_log(self.engine.config.daemon.log_dir, request.model_id)
        if not request.follow and not await asyncio.to_thread(path.exists):
            # Not an empty log: there is none to show (with --follow, its first lines are).
            raise FailedPrecondition(
                f"model {request.model_id!r} has no log yet: it has not been loaded "
                f"(its llama-server log will be {path})"
            )
        lines, offset = await asyncio.to_thread(read_tail, path, count)
        for batch in _batches(lines) or [pb.LogLines()]:
            yield batch
        if not request.follow:
            return
        follower = LogFollower(path, offset)
        while not self.engine.closed:
            await asyncio.sleep(LOG_POLL_S)
            for batch in _batches(await asyncio.to_thread(follower.read)):
                yield batch
