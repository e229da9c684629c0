"""`mmctl top`: a live full-screen view of devices, models and requests, driven by Watch."""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import select
import signal
import sys
import termios
import threading
import time
import tty
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import typer

from mmctl import render, tables
from mmctl.client import MmdClient, Stream
from mmctl.errors import EXIT_UNREACHABLE, CliError
from mmctl.observe import Interval, event_line, model_event_text, request_text
from mmctl.options import client_for
from mmd.api import protojson
from mmd.core.units import format_size
from mmd.v1 import mmd_pb2 as pb

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.text import Text

LOG_LINES = 200
GAUGE_MIN_WIDTH = 10
# Model changes written to the activity log, with their style.
_CHANGE_STYLES = {
    pb.MODEL_STATE_READY: "green",
    pb.MODEL_STATE_UNLOADED: "yellow",
    pb.MODEL_STATE_FAILED: "bold red",
}
_KEYS_HELP = "q quit · ↑/↓ or k/j select · u unload selected"


@dataclass
class LogEntry:
    time_unix: float
    text: str
    style: str = ""


@dataclass
class TopState:
    """What the screen shows, updated from Watch events."""

    version: str = ""
    devices: dict[str, pb.Device] = field(default_factory=dict)
    models: dict[str, pb.Model] = field(default_factory=dict)
    alerts: set[str] = field(default_factory=set)
    active: int = 0
    queued: int = 0
    max_concurrent: int = 0
    max_queue: int = 0
    log: deque[LogEntry] = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    selected: str = ""
    status: str = ""
    # Per-model request counts change with no event of their own: a finished request or
    # totals that disagree with the models' mark the view stale until a fresh Health.
    stale: bool = False

    def apply_health(self, health: pb.Health) -> None:
        self.version = health.version
        self.devices = {d.id: d for d in health.devices}
        self.models = {m.id: m for m in health.models}
        self.active, self.queued = health.active_inferences, health.queued_requests
        self.max_concurrent, self.max_queue = health.max_concurrent, health.max_queue
        self.stale = False
        self._keep_selection()

    def apply(self, event: pb.Event) -> None:
        kind = event.WhichOneof("kind")
        stamp = event.time_unix
        if kind == "snapshot":
            self.alerts.clear()  # the snapshot's alerts follow it
            self.apply_health(event.snapshot)
        elif kind == "model":
            change = event.model
            if change.HasField("model"):
                if change.state == pb.MODEL_STATE_UNLOADED:
                    self.models.pop(change.model_id, None)
                else:
                    self.models[change.model_id] = change.model
            style = _CHANGE_STYLES.get(change.state)
            if style is not None:  # loading and unloading are shown by the table
                self.log.append(LogEntry(stamp, model_event_text(change), style))
            self._keep_selection()
        elif kind == "request":
            request = event.request
            style = "" if request.status == "ok" else "red"
            self.log.append(LogEntry(stamp, request_text(request), style))
            self.stale = True
        elif kind == "memory":
            self.devices = {d.id: d for d in event.memory.devices}
            self.active = event.memory.active_inferences
            self.queued = event.memory.queued_requests
            if self.active != sum(m.active_requests for m in self.models.values()):
                self.stale = True
            if self.queued != sum(m.queued_requests for m in self.models.values()):
                self.stale = True
        elif kind == "alert":
            alert = event.alert
            if alert.above:
                self.alerts.add(alert.device)
            else:
                self.alerts.discard(alert.device)
            where = "above" if alert.above else "back below"
            self.log.append(
                LogEntry(
                    stamp,
                    f"{alert.device} memory {where} {alert.threshold_percent:.0f}%",
                    "bold red" if alert.above else "green",
                )
            )
        elif kind == "lagged":
            self.log.append(
                LogEntry(stamp, f"fell behind: {event.lagged.dropped} events dropped", "yellow")
            )

    def _keep_selection(self) -> None:
        if self.selected not in self.models:
            self.selected = next(iter(sorted(self.models)), "")

    def move(self, step: int) -> None:
        ids = sorted(self.models)
        if not ids:
            self.selected = ""
            return
        index = ids.index(self.selected) if self.selected in ids else 0
        self.selected = ids[max(0, min(len(ids) - 1, index + step))]


# ---------------------------------------------------------------------------
# Drawing


def gauge(device: pb.Device, width: int, alert: bool) -> Text:
    """One bar: mmd's memory from the left, other processes' from the right, free between;
    a marker where mmd's budget ends."""
    from rich.text import Text

    total = device.total_bytes or 1
    # Any use shows as at least one cell: a small model on a large machine is still there.
    mmd = max(int(device.mmd_bytes > 0), round(device.mmd_bytes / total * width))
    other = min(
        width - mmd, max(int(device.other_bytes > 0), round(device.other_bytes / total * width))
    )
    free = width - mmd - other
    budget_at = min(width - 1, round(device.budget_bytes / total * width))
    cells = ["█"] * mmd + ["░"] * free + ["▓"] * other
    styles = ["red" if alert else "cyan"] * mmd + ["dim"] * free
    styles += ["red" if alert else "magenta"] * other
    if device.budget_bytes:
        cells[budget_at], styles[budget_at] = "┃", "bold yellow"
    bar = Text()
    for cell, style in zip(cells, styles, strict=True):
        bar.append(cell, style)
    return bar


def _device_lines(device: pb.Device, width: int, alert: bool) -> list[Text]:
    """The bar with the share in use, then the numbers."""
    from rich.text import Text

    used = 100.0 * (device.total_bytes - device.free_bytes) / (device.total_bytes or 1)
    label = f"{device.id:<6} "
    percent = Text(f" {used:3.0f}% used", "bold red" if alert else "")
    bar_width = max(GAUGE_MIN_WIDTH, width - len(label) - len(percent))
    bar = Text.assemble((label, "bold"), gauge(device, bar_width, alert), percent)
    details = Text(
        f"{'':<7}mmd {format_size(device.mmd_bytes)} · other {format_size(device.other_bytes)}"
        f" · free {format_size(device.free_bytes)} · budget {format_size(device.budget_bytes)}"
        f" of {format_size(device.total_bytes)}" + ("  ALERT" if alert else ""),
        "bold red" if alert else "dim",
        no_wrap=True,
        overflow="ellipsis",
    )
    return [bar, details]


def _idle_text(model: pb.Model, now: float) -> str:
    if model.active_requests:
        return "busy"
    if model.state != pb.MODEL_STATE_READY:
        return "-"
    if model.pinned or model.keep_alive_seconds < 0:
        since = tables.relative_time(model.last_used_unix, now) if model.last_used_unix else "-"
        return f"idle {since}, kept"
    text = f"idle {tables.relative_time(model.last_used_unix, now)}"
    if model.unloads_at_unix:
        text += f", unloads in {tables.format_duration(max(0.0, model.unloads_at_unix - now))}"
    return text


def models_table(state: TopState, now: float) -> RenderableType:
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, header_style="bold", expand=True)
    for header in ("ID", "STATE", "PLACEMENT", "MEM EST", "MEASURED", "SLOTS", "QUEUED", "IDLE"):
        table.add_column(header, no_wrap=True)
    for model_id in sorted(state.models):
        model = state.models[model_id]
        name = protojson.state_name(model.state)
        cells = [
            Text(model.id),
            Text(name, tables.STATE_STYLES.get(name, "")),
            Text(tables.placement_text(protojson.message_to_dict(model.placement))),
            Text(tables.size_or_dash(model.estimated_bytes)),
            Text(tables.size_or_dash(model.measured_bytes)),
            Text(f"{model.active_requests}/{model.parallel}"),
            Text(str(model.queued_requests)),
            Text(_idle_text(model, now)),
        ]
        table.add_row(*cells, style="reverse" if model_id == state.selected else "")
    if not state.models:
        table.add_row(Text("no models loaded", "dim"))
    return table


def screen(state: TopState, width: int, height: int, now: float) -> RenderableType:
    """The whole screen for a terminal of ``width`` x ``height``."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.text import Text

    limits = f"/{state.max_concurrent}" if state.max_concurrent else ""
    header = Text.assemble(
        (f"mmd {state.version}", "bold"),
        f"  {time.strftime('%H:%M:%S', time.localtime(now))}",
        f"  requests: {state.active}{limits} active, {state.queued} queued",
    )
    inner = max(GAUGE_MIN_WIDTH + 20, width - 4)
    gauges = [
        line
        for d in state.devices.values()
        for line in _device_lines(d, inner, d.id in state.alerts)
    ]
    memory = Panel(
        Group(*gauges) if gauges else Text("no devices yet", "dim"),
        title="memory  █ mmd  ░ free  ▓ other  ┃ budget",
        title_align="left",
    )
    models = Panel(models_table(state, now), title="models", title_align="left")
    used = 1 + (max(1, len(gauges)) + 2) + (max(1, len(state.models)) + 3) + 2 + 1
    room = max(1, height - used)
    entries = list(state.log)[-room:]
    lines = [
        Text.assemble(
            time.strftime("%H:%M:%S ", time.localtime(e.time_unix)),
            (e.text, e.style),
            no_wrap=True,
            overflow="ellipsis",
        )
        for e in entries
    ]
    activity = Panel(
        Group(*lines) if lines else Text("no requests yet", "dim"),
        title="requests and events",
        title_align="left",
        height=room + 2,
    )
    footer = Text(_KEYS_HELP + (f"   {state.status}" if state.status else ""), "dim")
    return Group(header, memory, models, activity, footer)


# ---------------------------------------------------------------------------
# Terminal input


def parse_keys(data: bytes) -> Iterator[str]:
    """Key names from raw terminal input: "up", "down", or the character."""
    arrows = {b"\x1b[A": "up", b"\x1bOA": "up", b"\x1b[B": "down", b"\x1bOB": "down"}
    i = 0
    while i < len(data):
        for sequence, name in arrows.items():
            if data.startswith(sequence, i):
                yield name
                i += len(sequence)
                break
        else:
            if data[i] == 0x1B:  # another escape sequence: skip it whole
                i = len(data)
                continue
            yield chr(data[i])
            i += 1


@contextlib.contextmanager
def cbreak(fd: int) -> Iterator[None]:
    """Keys arrive one by one, unechoed; Ctrl-C still interrupts. Restored on any exit."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _read_keys(fd: int, inbox: queue.Queue[tuple[str, Any]], stop: threading.Event) -> None:
    while not stop.is_set():
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            continue
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        if not data:
            return
        for key in parse_keys(data):
            inbox.put(("key", key))


def _pump_events(call: Iterable[pb.Event], inbox: queue.Queue[tuple[str, Any]]) -> None:
    try:
        for event in call:
            inbox.put(("event", event))
        inbox.put(("end", None))
    except CliError as err:
        inbox.put(("end", err))


def _in_thread(inbox: queue.Queue[tuple[str, Any]], kind: str, call: Any) -> None:
    def run() -> None:
        try:
            inbox.put((kind, call()))
        except CliError as err:
            inbox.put((kind, err))

    threading.Thread(target=run, daemon=True).start()


# ---------------------------------------------------------------------------
# The command


def top(ctx: typer.Context, interval: Interval = 1.0) -> None:
    """A live view: memory per device, models, recent requests, evictions and crashes.

    Keys: q quits; up/down (or k/j) select a model; u unloads it. When stdout is not a
    terminal it prints one line per event, like `mmctl events`.
    """
    with client_for(ctx) as client:
        stream = client.watch(interval)
        if not sys.stdout.isatty():
            for event in stream:
                sys.stdout.write(event_line(event) + "\n")
                sys.stdout.flush()
            return
        _run_screen(client, stream)


def _terminal_size(console: Console) -> tuple[int, int]:
    """The terminal's size now: COLUMNS and LINES in the environment may be stale."""
    with contextlib.suppress(OSError):
        size = os.get_terminal_size(sys.stdout.fileno())
        console.size = (size.columns, size.lines)
    return console.size


def _run_screen(client: MmdClient, stream: Stream[pb.Event]) -> None:
    from rich.console import Console
    from rich.live import Live

    inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
    stop = threading.Event()
    threading.Thread(target=_pump_events, args=(stream, inbox), daemon=True).start()
    keys_fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    old_winch = signal.signal(signal.SIGWINCH, lambda *_: inbox.put(("resize", None)))
    console = Console()
    state = TopState()
    resyncing = False
    try:
        with contextlib.ExitStack() as stack:
            if keys_fd is not None:
                stack.enter_context(cbreak(keys_fd))
                reader = threading.Thread(target=_read_keys, args=(keys_fd, inbox, stop))
                reader.daemon = True
                reader.start()
            live = stack.enter_context(Live(console=console, screen=True, auto_refresh=False))
            while True:
                try:
                    kind, value = inbox.get(timeout=1.0)
                except queue.Empty:
                    kind, value = "tick", None
                if kind == "end":
                    raise value or CliError("mmd ended the event stream", EXIT_UNREACHABLE)
                if kind == "event":
                    state.apply(value)
                    if state.stale and not resyncing and value.WhichOneof("kind") == "memory":
                        resyncing = True
                        _in_thread(inbox, "health", client.get_health)
                elif kind == "health":
                    resyncing = False
                    if isinstance(value, pb.Health):
                        state.apply_health(value)
                elif kind == "unloaded":
                    state.status = (
                        value.message
                        if isinstance(value, CliError)
                        else render.model_summary(value.model)
                    )
                elif kind == "key":
                    if value in ("q", "Q"):
                        return
                    if value in ("up", "k"):
                        state.move(-1)
                    elif value in ("down", "j"):
                        state.move(1)
                    elif value == "u" and state.selected:
                        model_id = state.selected
                        state.status = f"unloading {model_id}…"
                        unload = functools.partial(
                            client.unload_model, model_id, force=False, timeout_seconds=0
                        )
                        _in_thread(inbox, "unloaded", unload)
                if kind == "event" and not inbox.empty():
                    continue  # draw once a burst of events is applied
                width, height = _terminal_size(console)
                live.update(screen(state, width, height, time.time()), refresh=True)
    finally:
        stop.set()
        stream.cancel()
        signal.signal(signal.SIGWINCH, old_winch)
