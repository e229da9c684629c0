"""Tables on a narrow terminal: columns are left out, least useful first; the id, the state
and the pid are never dropped or shortened."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from mmctl import tables
from mmd.api import protojson
from mmd.v1 import mmd_pb2

LONG_ID = "a-rather-long-model-identifier-x"  # 32 characters
BIG_PID = 4194304  # the largest pid Linux hands out


def terminal(width: int) -> Console:
    return Console(
        width=width, file=io.StringIO(), force_terminal=True, color_system=None, highlight=False
    )


def drawn(table: tables.TextTable, width: int) -> list[str]:
    console = terminal(width)
    tables.draw_table(console, table)
    output = console.file.getvalue()  # type: ignore[attr-defined]
    assert "…" not in output, output
    return [line.rstrip() for line in output.splitlines()]


def ps_models() -> list[dict[str, Any]]:
    models = [
        mmd_pb2.Model(
            id=LONG_ID,
            state=mmd_pb2.MODEL_STATE_READY,
            pid=BIG_PID,
            ctx=8192,
            parallel=2,
            estimated_bytes=5 * 2**30,
            measured_bytes=4 * 2**30,
            placement=mmd_pb2.Placement(gpu_layers=20, total_layers=32),
        ),
        mmd_pb2.Model(id="b", state=mmd_pb2.MODEL_STATE_LOADING, pid=17),
    ]
    return [protojson.model_to_dict(model) for model in models]


@pytest.mark.parametrize("width", [60, 80, 100])
def test_ps_keeps_id_state_and_pid_whole_and_fits(width: int) -> None:
    lines = drawn(tables.ps_table(ps_models(), now=0.0), width)
    header, first, second = lines
    assert header.split()[:3] == ["ID", "STATE", "PID"]
    assert first.split()[:3] == [LONG_ID, "ready", str(BIG_PID)]
    assert second.split()[:3] == ["b", "loading", "17"]
    assert max(len(line) for line in lines) <= width


def test_ps_drops_the_least_useful_columns_first() -> None:
    table = tables.ps_table(ps_models(), now=0.0)
    full = tables.table_width(table)
    assert full == 129
    assert list(tables.fit_table(table, 100).headers) == [
        "ID",
        "STATE",
        "PID",
        "PLACEMENT",
        "MEM EST",
        "MEM MEASURED",
        "SLOTS",
    ]
    assert list(tables.fit_table(table, 80).headers) == ["ID", "STATE", "PID", "MEM MEASURED"]
    assert list(tables.fit_table(table, 60).headers) == ["ID", "STATE", "PID"]
    assert tables.fit_table(table, full).headers == table.headers
    assert tables.fit_table(table, 60).state_column == 1


def test_too_narrow_even_for_the_kept_columns_draws_them_whole() -> None:
    lines = drawn(tables.ps_table(ps_models(), now=0.0), 30)
    assert lines[0].split() == ["ID", "STATE", "PID"]
    assert lines[1].split() == [LONG_ID, "ready", str(BIG_PID)]


def test_models_keep_id_and_state_at_60_columns() -> None:
    table = tables.TextTable(
        ["ID", "ROLE", "STATE", "MEMORY EST", "PATH"],
        [[LONG_ID, "coding assistant (pinned)", "ready", "4.6 GiB", "/var/lib/mmd/models/x.gguf"]],
        state_column=2,
        drop_first=("ROLE", "MEMORY EST", "PATH"),
    )
    lines = drawn(table, 60)
    assert lines[0].split()[:2] == ["ID", "STATE"]
    assert lines[1].split()[:2] == [LONG_ID, "ready"]
    assert max(len(line) for line in lines) <= 60
