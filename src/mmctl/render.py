"""Output: protos as JSON-ready dicts with stable snake_case keys, and human-readable views.

rich is imported only when a table is drawn on a terminal, so commands that print
JSON, plain lines or piped tables start without it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mmd.api.protojson import state_name
from mmd.core.units import format_size
from mmd.v1 import mmd_pb2

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

# The colour of each model state, in every table that shows one.
STATE_STYLES = {
    "ready": "green",
    "loading": "yellow",
    "unloading": "yellow",
    "failed": "bold red",
    "unloaded": "dim",
}


# ---------------------------------------------------------------------------
# JSON


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def print_json_line(obj: Any) -> None:
    """One object on one line (JSON Lines), flushed: a reader gets each as it is made."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------
# Plain text pieces


def relative_time(unix_seconds: float, now: float | None = None) -> str:
    """0 -> "never"; otherwise "3s ago", "5m ago", "2h ago", "4d ago"."""
    if unix_seconds <= 0:
        return "never"
    elapsed = max(0.0, (time.time() if now is None else now) - unix_seconds)
    return f"{format_duration(elapsed)} ago"


def format_duration(seconds: float) -> str:
    """The largest unit that fits, and the next one where it matters: "45s", "5m", "3h 12m"."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        hours, rest = divmod(seconds, 3600)
        return f"{hours}h {rest // 60}m" if rest >= 60 else f"{hours}h"
    days, rest = divmod(seconds, 86400)
    return f"{days}d {rest // 3600}h" if rest >= 3600 else f"{days}d"


def placement_text(placement: mmd_pb2.Placement) -> str:
    """ "gpu 32/32", "cpu" or "split 20/32 gpu", from the layer counts."""
    total = placement.total_layers
    gpu = placement.gpu_layers
    if total == 0 and gpu == 0:
        return "-"  # not placed (yet)
    if gpu == 0:
        return "cpu"
    if total == 0 or gpu >= total:
        return f"gpu {gpu}/{total}" if total else f"gpu {gpu}"
    return f"split {gpu}/{total} gpu"


def shares_text(placement: mmd_pb2.Placement) -> str:
    return ", ".join(
        f"{share.device} {format_size(share.bytes)} ({share.layers} layers)"
        for share in placement.shares
    )


def size_or_dash(num_bytes: int) -> str:
    return format_size(num_bytes) if num_bytes else "-"


def model_summary(model: mmd_pb2.Model) -> str:
    """One line about a model, as printed after load and unload."""
    state = state_name(model.state)
    parts = [f"{model.id}: {state}"]
    if model.pid:
        parts.append(f"pid {model.pid}")
    if state in ("ready", "loading"):
        if model.placement.total_layers or model.placement.gpu_layers:
            parts.append(placement_text(model.placement))
        if model.estimated_bytes:
            parts.append(f"est {format_size(model.estimated_bytes)}")
        if model.measured_bytes:
            parts.append(f"measured {format_size(model.measured_bytes)}")
    if model.last_error:
        parts.append(f"error: {model.last_error}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------
# Tables
#
# On a terminal tables are drawn with rich, in colour; columns that do not fit are
# left out, least useful first, so that the id and the pid are never shortened.
# Piped output goes to scripts (`mmctl ps | awk -F'\t' ...`): every column as
# tab-separated values, never wrapped or cut to a terminal width, with no escape
# codes, and without the cost of importing rich on every call of a script's loop.

# Columns a wrapped cell (a path) may be narrowed to before the table is too wide.
_WRAPPED_MIN_WIDTH = 16


@dataclasses.dataclass
class TextTable:
    """Rows of plain cells; `state_column` is the column coloured by model state.

    `drop_first` names the columns a terminal too narrow for all of them loses, in that
    order; the others (the id, the state, the pid) are never dropped or shortened.
    """

    headers: Sequence[str]
    rows: list[Sequence[str]] = dataclasses.field(default_factory=list)
    state_column: int | None = None
    drop_first: Sequence[str] = ()


class _Output:
    """Where tables and lines go: rich on a terminal, plain text otherwise."""

    def __init__(self) -> None:
        self.console: Console | None = None
        if sys.stdout.isatty():
            from rich.console import Console

            self.console = Console(highlight=False)

    def line(self, text: str = "", style: str = "") -> None:
        if self.console is None:
            sys.stdout.write(text + "\n")
            return
        from rich.text import Text

        self.console.print(Text(text, style=style))

    def note(self, text: str, style: str = "") -> None:
        """A line about a table (a failed model's error): on stdout on a terminal; piped,
        on stderr, so that stdout holds nothing but the table's lines."""
        if self.console is None:
            sys.stdout.flush()
            sys.stderr.write(text + "\n")
            return
        self.line(text, style)

    def table_or_note(self, table: TextTable, note: str) -> None:
        """``table``; when it has no rows, ``note`` on a terminal, and piped the header line
        alone (zero rows, as a script expects)."""
        if table.rows or self.console is None:
            self.table(table)
        else:
            self.line(note)

    def table(self, table: TextTable) -> None:
        if self.console is None:
            sys.stdout.write(plain_table(table))
            return
        draw_table(self.console, table)


def _clean_cell(cell: str) -> str:
    return cell.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def plain_table(table: TextTable) -> str:
    """Tab-separated values: the header line, then a line per row, one field per column
    (`awk -F'\\t'`, `cut -f`); a tab or line break inside a cell becomes a space."""
    return "".join(
        "\t".join(_clean_cell(cell) for cell in cells) + "\n"
        for cells in [table.headers, *table.rows]
    )


def _wrapped(header: str) -> bool:
    return header == "PATH"


def table_width(table: TextTable) -> int:
    """The width rich draws ``table`` in (see _rich_table), wrapped columns at their
    narrowest."""
    from rich.cells import cell_len

    total = 0
    for index, header in enumerate(table.headers):
        width = max([cell_len(header)] + [cell_len(row[index]) for row in table.rows])
        total += min(width, _WRAPPED_MIN_WIDTH) if _wrapped(header) else width
    return total + 2 * (len(table.headers) - 1)  # one space of padding either side


def fit_table(table: TextTable, width: int) -> TextTable:
    """``table`` without the columns of ``drop_first`` that must go, in that order, for it
    to fit in ``width``; the other columns stay whatever the width."""
    fitted = table
    for header in table.drop_first:
        if table_width(fitted) <= width:
            break
        keep = [i for i, name in enumerate(fitted.headers) if name != header]
        state = fitted.state_column
        fitted = TextTable(
            [fitted.headers[i] for i in keep],
            [[row[i] for i in keep] for row in fitted.rows],
            None if state is None or state not in keep else keep.index(state),
            table.drop_first,
        )
    return fitted


def draw_table(console: Console, table: TextTable) -> None:
    """Draw ``table`` on a terminal: columns left out as fit_table says; when the id and
    the other kept columns are still wider than the terminal, they are drawn whole and
    the terminal wraps the lines."""
    fitted = fit_table(table, console.width)
    needed = table_width(fitted)
    if needed <= console.width:
        console.print(_rich_table(fitted))
        return
    terminal = console.width
    console.width = needed
    try:
        console.print(_rich_table(fitted))
    finally:
        console.width = terminal


def _rich_table(table: TextTable) -> Table:
    from rich.table import Table
    from rich.text import Text

    drawn = Table(box=None, pad_edge=False, header_style="bold")
    for header in table.headers:
        drawn.add_column(
            header,
            no_wrap=not _wrapped(header),
            overflow="fold" if _wrapped(header) else "ellipsis",
        )
    for cells in table.rows:
        # Text cells: a model id or path containing "[...]" must not be read as rich markup.
        row = [Text(cell) for cell in cells]
        if table.state_column is not None:
            state = row[table.state_column]
            state.stylize(STATE_STYLES.get(state.plain, ""))
        drawn.add_row(*row)
    return drawn


def print_models(models: Sequence[mmd_pb2.Model], notes: Sequence[str] = ()) -> None:
    """`mmctl models`: the registry, then the notes on files model discovery skipped."""
    out = _Output()
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


def print_notes(notes: Sequence[str]) -> None:
    """Notes beside JSON output: on stderr, so that stdout holds the JSON alone."""
    sys.stdout.flush()
    for note in notes:
        sys.stderr.write(f"mmctl: note: {note}\n")


def cpu_list_text(cpus: Sequence[int]) -> str:
    """(0, 1, 2, 5) -> "0-2,5": the kernel's own way of writing a CPU list."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def cores_text(model: mmd_pb2.Model) -> str:
    """ "0-1", "1 shared", "args" (its args place its threads) or "-" (none of mmd's)."""
    if not model.HasField("cores"):
        return "-"
    if not model.cores.cpus:
        return "args"
    text = cpu_list_text(model.cores.cpus)
    return f"{text} shared" if model.cores.shared_with else text


def ps_table(models: Sequence[mmd_pb2.Model], now: float) -> TextTable:
    table = TextTable(
        [
            "ID",
            "STATE",
            "PID",
            "PLACEMENT",
            "MEM EST",
            "MEM MEASURED",
            "CTX",
            "SLOTS",
            "QUEUED",
            "LAST USED",
            "CORES",  # last: scripts reading piped columns by position keep working
        ],
        state_column=1,
        drop_first=(
            "CTX",
            "CORES",
            "LAST USED",
            "QUEUED",
            "MEM EST",
            "SLOTS",
            "PLACEMENT",
            "MEM MEASURED",
        ),
    )
    for model in models:
        table.rows.append(
            [
                model.id,
                state_name(model.state),
                str(model.pid) if model.pid else "-",
                placement_text(model.placement),
                size_or_dash(model.estimated_bytes),
                size_or_dash(model.measured_bytes),
                str(model.ctx) if model.ctx else "-",
                f"{model.active_requests}/{model.parallel}" if model.parallel else "-",
                str(model.queued_requests),
                relative_time(model.last_used_unix, now),
                cores_text(model),
            ]
        )
    return table


def _print_failures(out: _Output, models: Sequence[mmd_pb2.Model], *, notes: bool) -> None:
    for model in models:
        if state_name(model.state) == "failed" and model.last_error:
            say = out.note if notes else out.line
            say(f"{model.id} failed: {model.last_error}", style="red")


def print_ps(models: Sequence[mmd_pb2.Model], now: float | None = None) -> None:
    """`mmctl ps`: models that are not unloaded."""
    out = _Output()
    out.table_or_note(ps_table(models, time.time() if now is None else now), "no models loaded")
    _print_failures(out, models, notes=True)


def print_health(health: mmd_pb2.Health, now: float | None = None) -> None:
    """`mmctl health`: devices, loaded models, requests, notes."""
    out = _Output()
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
        out.table(ps_table(health.models, time.time() if now is None else now))
        _print_failures(out, health.models, notes=False)
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
        lines.append(f"  placement:  {placement_text(plan.placement)}")
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
