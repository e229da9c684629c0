"""Tables and plain text for mmctl, from JSON-shaped dicts: no protobuf, gRPC or typer.

`mmctl ps` can print its table from the dicts `mmctl ps --json` shows (the shape of
``mmd.api.protojson.model_to_dict``) without importing the protobuf runtime; rich is
imported only when a table is drawn on a terminal, so piped output starts without it too.
The pieces that read protobuf messages stay in mmctl.render and build on these.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mmd.core.units import format_size

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
#
# A model dict may lack a key (a daemon older than the field): it reads as the proto's
# default, as protobuf reads a field missing from the wire.


def print_notes(notes: Sequence[str]) -> None:
    """Notes beside JSON output: on stderr, so that stdout holds the JSON alone."""
    sys.stdout.flush()
    for note in notes:
        sys.stderr.write(f"mmctl: note: {note}\n")


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


def placement_text(placement: Mapping[str, Any] | None) -> str:
    """ "gpu 32/32", "cpu" or "split 20/32 gpu", from the layer counts of a Placement dict."""
    placement = placement or {}
    total = int(placement.get("total_layers", 0))
    gpu = int(placement.get("gpu_layers", 0))
    if total == 0 and gpu == 0:
        return "-"  # not placed (yet)
    if gpu == 0:
        return "cpu"
    if total == 0 or gpu >= total:
        return f"gpu {gpu}/{total}" if total else f"gpu {gpu}"
    return f"split {gpu}/{total} gpu"


def size_or_dash(num_bytes: int) -> str:
    return format_size(num_bytes) if num_bytes else "-"


def cpu_list_text(cpus: Sequence[int]) -> str:
    """(0, 1, 2, 5) -> "0-2,5": the kernel's own way of writing a CPU list."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def cores_text(cores: Mapping[str, Any] | None) -> str:
    """ "0-1", "1 shared", "args" (its args place its threads) or "-" (none of mmd's)."""
    # The daemon sets a model's Cores with CPUs for mmd's cores, with a reason alone when
    # the model's args place its threads, and not at all otherwise; as a dict an unset
    # Cores is its defaults (no CPUs, no reason), so the reason tells "args" from "-".
    if not cores:
        return "-"
    cpus: Sequence[int] = cores.get("cpus") or ()
    if not cpus:
        return "args" if cores.get("reason") else "-"
    text = cpu_list_text(cpus)
    return f"{text} shared" if cores.get("shared_with") else text


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


class Output:
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


# ---------------------------------------------------------------------------
# mmctl ps, from model dicts


def ps_table(models: Sequence[Mapping[str, Any]], now: float) -> TextTable:
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
        pid = model.get("pid", 0)
        ctx = model.get("ctx", 0)
        parallel = model.get("parallel", 0)
        table.rows.append(
            [
                str(model.get("id", "")),
                str(model.get("state", "")),
                str(pid) if pid else "-",
                placement_text(model.get("placement")),
                size_or_dash(model.get("estimated_bytes", 0)),
                size_or_dash(model.get("measured_bytes", 0)),
                str(ctx) if ctx else "-",
                f"{model.get('active_requests', 0)}/{parallel}" if parallel else "-",
                str(model.get("queued_requests", 0)),
                relative_time(model.get("last_used_unix", 0.0), now),
                cores_text(model.get("cores")),
            ]
        )
    return table


def print_failures(out: Output, models: Sequence[Mapping[str, Any]], *, notes: bool) -> None:
    """Each failed model's error under its table: as notes (stderr when piped) or lines."""
    for model in models:
        error = model.get("last_error")
        if model.get("state") == "failed" and error:
            say = out.note if notes else out.line
            say(f"{model.get('id', '')} failed: {error}", style="red")


def print_ps(models: Sequence[Mapping[str, Any]], now: float | None = None) -> None:
    """`mmctl ps`: models that are not unloaded, as `mmctl ps --json` gives them."""
    out = Output()
    out.table_or_note(ps_table(models, time.time() if now is None else now), "no models loaded")
    print_failures(out, models, notes=True)
