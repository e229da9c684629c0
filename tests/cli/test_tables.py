"""mmctl.tables: the ps table from model dicts (the `mmctl ps --json` shape), and that the
module loads without protobuf, gRPC, typer or rich, so a fast `mmctl ps` can use it."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from mmctl import tables
from mmd.api import protojson
from mmd.v1 import mmd_pb2

HEAVY = ("google.protobuf", "grpc", "typer", "rich", "aiohttp")


def test_tables_imports_no_protobuf_grpc_typer_rich_or_aiohttp() -> None:
    probe = (
        "import json, sys, mmctl.tables; "
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} "
        f"or any(m.startswith(h + '.') or m == h for h in {HEAVY!r}))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(result.stdout) == []


def as_dict(**fields: Any) -> dict[str, Any]:
    return protojson.model_to_dict(mmd_pb2.Model(**fields))


MODELS = [
    as_dict(
        id="chat",
        state=mmd_pb2.MODEL_STATE_READY,
        pid=4242,
        ctx=4096,
        parallel=2,
        active_requests=1,
        estimated_bytes=5 * 2**30,
        measured_bytes=4 * 2**30,
        last_used_unix=940.0,
        placement=mmd_pb2.Placement(gpu_layers=32, total_layers=32),
        cores=mmd_pb2.Cores(cpus=[0, 1, 2, 5], threads=4, reason="2 of 4 cores"),
    ),
    as_dict(
        id="small",
        state=mmd_pb2.MODEL_STATE_READY,
        pid=7,
        queued_requests=3,
        placement=mmd_pb2.Placement(total_layers=24),
        cores=mmd_pb2.Cores(cpus=[3], threads=1, shared_with=["chat"]),
    ),
    as_dict(
        id="argsy",
        state=mmd_pb2.MODEL_STATE_LOADING,
        pid=8,
        placement=mmd_pb2.Placement(
            gpu_layers=20,
            total_layers=32,
            shares=[mmd_pb2.DeviceShare(device="cuda:0", bytes=2**30, layers=20)],
        ),
        cores=mmd_pb2.Cores(reason="threads and cores set by its args"),
    ),
    as_dict(
        id="gpu", state=mmd_pb2.MODEL_STATE_UNLOADING, placement=mmd_pb2.Placement(gpu_layers=9)
    ),
    as_dict(id="broken", state=mmd_pb2.MODEL_STATE_FAILED, last_error="exit code 1"),
]


def test_ps_rows_from_model_dicts() -> None:
    """The rows the protobuf-based table gave for the same models (cells joined by "|")."""
    expected = [
        "chat|ready|4242|gpu 32/32|5.0 GiB|4.0 GiB|4096|1/2|0|1m ago|0-2,5",
        "small|ready|7|cpu|-|-|-|-|3|never|3 shared",
        "argsy|loading|8|split 20/32 gpu|-|-|-|-|0|never|args",
        "gpu|unloading|-|gpu 9|-|-|-|-|0|never|-",
        "broken|failed|-|-|-|-|-|-|0|never|-",
    ]
    assert tables.ps_table(MODELS, now=1000.0).rows == [row.split("|") for row in expected]


def test_unset_cores_in_a_dict_is_a_dash_and_args_cores_say_args() -> None:
    unset = as_dict(id="m")["cores"]
    assert unset == {"cpus": [], "threads": 0, "shared_with": [], "reason": ""}
    assert tables.cores_text(unset) == "-"
    assert tables.cores_text(None) == "-"
    assert tables.cores_text({}) == "-"
    assert tables.cores_text({"cpus": [], "reason": "threads and cores set by its args"}) == "args"
    assert tables.cores_text({"cpus": [1, 2], "shared_with": ["a"]}) == "1-2 shared"


def test_a_model_dict_without_cores_or_placement_reads_as_unset() -> None:
    """A daemon older than a field sends no key for it."""
    [row] = tables.ps_table([{"id": "old", "state": "ready", "pid": 3}], now=0.0).rows
    assert row == ["old", "ready", "3", "-", "-", "-", "-", "-", "0", "never", "-"]


def test_piped_ps_is_the_table_on_stdout_and_the_failure_on_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    tables.print_ps(MODELS, now=1000.0)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split("\t")[:3] == ["ID", "STATE", "PID"]
    assert lines[3].split("\t") == [
        "argsy", "loading", "8", "split 20/32 gpu", "-", "-", "-", "-", "0", "never", "args"
    ]  # fmt: skip
    assert len(lines) == 1 + len(MODELS)
    assert err == "broken failed: exit code 1\n"


def test_piped_ps_with_no_models_is_its_header_alone(capsys: pytest.CaptureFixture[str]) -> None:
    tables.print_ps([], now=0.0)
    out, err = capsys.readouterr()
    assert out.startswith("ID\tSTATE\tPID\t")
    assert out.count("\n") == 1
    assert err == ""
