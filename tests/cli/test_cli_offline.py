"""mmctl without a daemon: usage errors, exit codes, rendering and streaming.

The daemon's side is played by the in-process server in cli_fakeserver, over a
real Unix socket, so the CLI sees real gRPC statuses and streams.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cli_fakeserver import Failure, FakeModelManager, serve
from typer.testing import CliRunner, Result

from mmctl import tables
from mmctl.cli import app, run_guarded
from mmctl.client import exit_code_for
from mmd.api import protojson
from mmd.v1 import mmd_pb2, mmd_pb2_grpc

runner = CliRunner()


def _model(
    model_id: str, state: mmd_pb2.ModelState.ValueType, pid: int = 0, **fields: Any
) -> mmd_pb2.Model:
    return mmd_pb2.Model(
        id=model_id,
        role="chat",
        path=f"/models/{model_id}.gguf",
        state=state,
        pid=pid,
        **fields,
    )


@pytest.fixture
def fake() -> FakeModelManager:
    manager = FakeModelManager()
    manager.models = [
        _model("idle", mmd_pb2.MODEL_STATE_UNLOADED, estimated_bytes=3 * 2**30),
        _model(
            "chat",
            mmd_pb2.MODEL_STATE_READY,
            pid=4242,
            ctx=4096,
            parallel=2,
            active_requests=1,
            queued_requests=3,
            estimated_bytes=5 * 2**30,
            measured_bytes=4 * 2**30,
            placement=mmd_pb2.Placement(gpu_layers=32, total_layers=32),
        ),
        _model("broken", mmd_pb2.MODEL_STATE_FAILED, last_error="exit code 1"),
    ]
    return manager


@pytest.fixture
def socket_path(fake: FakeModelManager) -> Iterator[Path]:
    with serve(fake) as path:
        yield path


def invoke(socket_path: Path, *args: str, stdin: bytes | None = None) -> Result:
    return runner.invoke(app, ["--socket", str(socket_path), *args], input=stdin)


def one_error_line(result: Result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mmctl: ")
    assert "Traceback" not in result.output
    return lines[0]


# --- help and usage -------------------------------------------------------------


def test_help_documents_exit_codes() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "Exit codes" in text
    for code, words in [
        ("0", "success"),
        ("2", "invalid usage"),
        ("3", "the daemon is unreachable"),
        ("4", "unknown model"),
        ("5", "not enough memory"),
        ("6", "the model's runtime"),
        ("130", "interrupted"),
        ("141", "the output was closed early"),
    ]:
        assert f"{code}: {words}" in text


@pytest.mark.parametrize(
    ("args", "stdin", "expected"),
    [
        (["infer", "chat", ""], None, "empty prompt"),
        (["infer", "chat"], b"", "empty prompt"),
        (["infer", "chat", "-"], b" \n\t", "empty prompt"),
        (["infer", "chat"], b"\xff\xfe", "not valid UTF-8"),
        (["infer", "chat", "hi", "--max-tokens", "0"], None, "--max-tokens"),
        (["infer", "chat", "hi", "--max-tokens", "-1"], None, "--max-tokens"),
        (["infer", "chat", "hi", "--temperature", "6"], None, "--temperature"),
        (["infer", "chat", "hi", "--keep-alive", "soon"], None, "--keep-alive"),
        (["infer", "chat", "hi", "--keep-alive", "-5s"], None, "0 or more, or -1 to never"),
        (["embed", "chat", "hi", "--keep-alive", "-2"], None, "0 or more, or -1 to never"),
        (["embed", "chat"], b"\xff", "not valid UTF-8"),
        (["unload", "chat", "--timeout", "-3"], None, "--timeout"),
        (["nosuchcommand"], None, "nosuchcommand"),
    ],
)
def test_usage_errors_exit_2_before_connecting(
    tmp_path: Path, args: list[str], stdin: bytes | None, expected: str
) -> None:
    # No daemon at this socket: a usage error must be reported first, with exit 2.
    result = invoke(tmp_path / "absent.sock", *args, stdin=stdin)
    assert result.exit_code == 2, result.output
    assert expected in one_error_line(result)
    assert result.stdout == ""


# --- unreachable daemon -----------------------------------------------------


def test_missing_socket_exits_3_and_says_where_it_looked(tmp_path: Path) -> None:
    missing = tmp_path / "mmd.sock"
    result = invoke(missing, "ps")
    assert result.exit_code == 3
    line = one_error_line(result)
    assert f"no mmd daemon at {missing}" in line
    assert "systemctl start mmd" in line
    assert "--socket" in line


def test_socket_comes_from_environment(tmp_path: Path) -> None:
    missing = tmp_path / "from-env.sock"
    result = runner.invoke(app, ["models"], env={"MMD_SOCKET": str(missing)})
    assert result.exit_code == 3
    assert str(missing) in one_error_line(result)


def test_stale_socket_without_listener_exits_3(tmp_path: Path) -> None:
    # A socket file left behind by a dead daemon: the connection is refused.
    stale = Path(os.path.relpath(tmp_path / "stale.sock"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(tmp_path / "stale.sock"))
        result = invoke(stale, "health")
    finally:
        sock.close()
    assert result.exit_code == 3
    # The message names the absolute path even when --socket was relative.
    assert f"no mmd daemon at {tmp_path / 'stale.sock'}" in one_error_line(result)


# --- status codes -> exit codes ---------------------------------------------------

STATUS_CASES = [
    (grpc.StatusCode.INVALID_ARGUMENT, "invalid_request", 2),
    (grpc.StatusCode.NOT_FOUND, "unknown_model", 4),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "insufficient_memory", 5),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue_full", 5),
    (grpc.StatusCode.UNAVAILABLE, "runtime_failed", 6),
    (grpc.StatusCode.UNAVAILABLE, None, 3),
    (grpc.StatusCode.ABORTED, "aborted", 1),
    (grpc.StatusCode.FAILED_PRECONDITION, "failed_precondition", 1),
    (grpc.StatusCode.DEADLINE_EXCEEDED, None, 1),
    (grpc.StatusCode.INTERNAL, "internal", 1),
]


@pytest.mark.parametrize(("code", "kind", "expected"), STATUS_CASES)
def test_exit_code_for_real_rpc_errors(
    fake: FakeModelManager,
    socket_path: Path,
    code: grpc.StatusCode,
    kind: str | None,
    expected: int,
) -> None:
    fake.failure = Failure(code, "the daemon's words", kind)
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        stub = mmd_pb2_grpc.ModelManagerStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListModels(mmd_pb2.ListModelsRequest(), timeout=30)
    assert caught.value.code() == code
    assert exit_code_for(caught.value) == expected


@pytest.mark.parametrize(("code", "kind", "expected"), STATUS_CASES)
def test_cli_exit_code_and_message_per_status(
    fake: FakeModelManager,
    socket_path: Path,
    code: grpc.StatusCode,
    kind: str | None,
    expected: int,
) -> None:
    fake.failure = Failure(code, "the daemon's\nwords", kind)
    result = invoke(socket_path, "models")
    assert result.exit_code == expected
    line = one_error_line(result)
    if expected == 3:
        assert f"no mmd daemon at {socket_path}" in line
    else:
        assert "the daemon's words" in line


def test_socket_after_the_command(fake: FakeModelManager, socket_path: Path) -> None:
    for args in (
        ["ps", "--socket", str(socket_path)],
        ["ps", f"--socket={socket_path}", "--json"],
        ["infer", "chat", "hi", "--socket", str(socket_path), "--max-tokens", "3"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
    request = fake.requests[-1]
    assert isinstance(request, mmd_pb2.InferRequest)
    assert (request.prompt, request.max_tokens) == ("hi", 3)
    # After `--` it is the prompt.
    result = runner.invoke(app, ["--socket", str(socket_path), "infer", "chat", "--", "--socket"])
    assert result.exit_code == 0, result.output
    assert fake.requests[-1].prompt == "--socket"  # type: ignore[attr-defined]


def test_unknown_model_exits_4(socket_path: Path) -> None:
    result = invoke(socket_path, "plan", "nope")
    assert result.exit_code == 4
    assert "unknown model 'nope'" in one_error_line(result)


def test_interrupt_exits_130_quietly(capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    assert run_guarded(interrupted) == 130
    assert capsys.readouterr().err == ""


# --- JSON and tables ------------------------------------------------------------


def test_model_json_has_id_state_pid_and_short_states() -> None:
    model = _model("chat", mmd_pb2.MODEL_STATE_READY, pid=77, estimated_bytes=2**40)
    data = protojson.model_to_dict(model)
    assert data["id"] == "chat"
    assert data["state"] == "ready"
    assert data["pid"] == 77
    assert data["estimated_bytes"] == 2**40  # an int, not protobuf's string for uint64
    assert data["placement"] == {"gpu_layers": 0, "total_layers": 0, "shares": []}
    names = {
        protojson.model_to_dict(_model("m", state))["state"]
        for state in (
            mmd_pb2.MODEL_STATE_UNLOADED,
            mmd_pb2.MODEL_STATE_LOADING,
            mmd_pb2.MODEL_STATE_READY,
            mmd_pb2.MODEL_STATE_UNLOADING,
            mmd_pb2.MODEL_STATE_FAILED,
        )
    }
    assert names == {"unloaded", "loading", "ready", "unloading", "failed"}


def test_models_json_lists_the_registry(socket_path: Path) -> None:
    result = invoke(socket_path, "models", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [(m["id"], m["state"]) for m in data] == [
        ("idle", "unloaded"),
        ("chat", "ready"),
        ("broken", "failed"),
    ]
    assert data[1]["pid"] == 4242


def test_ps_shows_models_that_are_not_unloaded(socket_path: Path) -> None:
    as_json = json.loads(invoke(socket_path, "ps", "--json").stdout)
    assert [m["id"] for m in as_json] == ["chat", "broken"]
    result = invoke(socket_path, "ps")
    assert result.exit_code == 0
    chat_row = next(line for line in result.stdout.splitlines() if line.startswith("chat"))
    for cell in ("ready", "4242", "gpu 32/32", "5.0 GiB", "4.0 GiB", "4096", "1/2", "never"):
        assert cell in chat_row
    # Piped, stdout is the table alone: the failure is said on stderr.
    assert "broken failed: exit code 1" in result.stderr
    assert "broken failed" not in result.stdout


def test_piped_tables_are_tab_separated() -> None:
    table = tables.TextTable(["ID", "STATE", "PATH"], state_column=1)
    table.rows.append(["chat[1]", "ready", "/models/a b.gguf"])
    table.rows.append(["e", "failed", "a\tb\nc"])
    text = tables.plain_table(table)
    assert text == "ID\tSTATE\tPATH\nchat[1]\tready\t/models/a b.gguf\ne\tfailed\ta b c\n"


def test_piped_empty_table_is_its_header_alone(fake: FakeModelManager, socket_path: Path) -> None:
    fake.models = []
    for command, header in (("ps", "ID\tSTATE\tPID\t"), ("models", "ID\tROLE\tSTATE\t")):
        result = invoke(socket_path, command)
        assert result.exit_code == 0
        [line] = result.stdout.splitlines()
        assert line.startswith(header)
        assert result.stderr == ""


def test_piped_models_split_into_columns_like_awk(
    fake: FakeModelManager, socket_path: Path
) -> None:
    """Roles are free text and get flags: a space-separated view would shift every column
    after ROLE."""
    fake.models = [
        mmd_pb2.Model(
            id="coder", role="coding assistant", pinned=True, state=mmd_pb2.MODEL_STATE_READY
        ),
        mmd_pb2.Model(id="vectors", embedding=True, state=mmd_pb2.MODEL_STATE_UNLOADED),
        mmd_pb2.Model(
            id="plain", role="chat", state=mmd_pb2.MODEL_STATE_FAILED, source="ollama:plain:7b"
        ),
    ]
    result = invoke(socket_path, "models")
    assert result.exit_code == 0
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert rows[0] == ["ID", "ROLE", "STATE", "MEMORY EST", "PATH", "SOURCE"]
    assert [(row[0], row[1], row[2], row[5]) for row in rows[1:]] == [
        ("coder", "coding assistant (pinned)", "ready", "config"),
        ("vectors", "- (embedding)", "unloaded", "config"),
        ("plain", "chat", "failed", "ollama:plain:7b"),
    ]
    assert all(len(row) == 6 for row in rows)
    awk = shutil.which("awk")
    if awk is not None:  # the documented way: awk -F'\t'
        printed = subprocess.run(
            [awk, "-F\t", "NR > 1 {print $1, $3}"],
            input=result.stdout,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert printed.splitlines() == ["coder ready", "vectors unloaded", "plain failed"]


def test_models_discovery_notes_go_to_stderr_and_json_keeps_stdout_clean(
    fake: FakeModelManager, socket_path: Path
) -> None:
    """Files model discovery skipped are listed beside the models, never mixed into a
    table or JSON that a script reads from stdout."""
    fake.models = [
        mmd_pb2.Model(id="llama3.2-3b", source="ollama:llama3.2:3b"),
    ]
    fake.registry_notes = ["/m/broken.gguf: skipped: not a GGUF file"]
    result = invoke(socket_path, "models")
    assert result.exit_code == 0
    assert "broken" not in result.stdout
    assert "note: /m/broken.gguf: skipped: not a GGUF file" in result.stderr
    result = invoke(socket_path, "models", "--json")
    assert result.exit_code == 0
    listed = json.loads(result.stdout)
    assert [(m["id"], m["source"]) for m in listed] == [("llama3.2-3b", "ollama:llama3.2:3b")]
    assert result.stderr == "mmctl: note: /m/broken.gguf: skipped: not a GGUF file\n"


def test_piped_ps_has_no_escape_codes_and_is_not_cut_to_80_columns(socket_path: Path) -> None:
    result = invoke(socket_path, "ps")
    assert "\x1b[" not in result.stdout
    header = result.stdout.splitlines()[0]
    assert header.split("\t") == [
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
        "CORES",
    ]


def test_relative_time() -> None:
    assert tables.relative_time(0, now=1000.0) == "never"
    assert tables.relative_time(997.0, now=1000.0) == "3s ago"
    assert tables.relative_time(1000.0 - 300, now=1000.0) == "5m ago"
    assert tables.relative_time(1e6 - 3 * 3600 - 120, now=1e6) == "3h 2m ago"
    assert tables.relative_time(1e6 - 2 * 86400, now=1e6) == "2d ago"


def test_health_json_and_text(fake: FakeModelManager, socket_path: Path) -> None:
    fake.health = mmd_pb2.Health(
        version="0.1.0",
        devices=[
            mmd_pb2.Device(
                id="ram", kind="ram", total_bytes=2**35, budget_bytes=2**34, free_bytes=2**33
            )
        ],
        models=[fake.models[1]],
        active_inferences=1,
        queued_requests=3,
        notes=["NVML unavailable: budgeting RAM only"],
    )
    data = json.loads(invoke(socket_path, "health", "--json").stdout)
    assert data["active_inferences"] == 1
    assert data["queued_requests"] == 3
    assert data["devices"][0]["budget_bytes"] == 2**34
    assert data["models"][0]["state"] == "ready"
    text = invoke(socket_path, "health").stdout
    assert "32.0 GiB" in text
    assert "1 active" in text
    assert "3 queued" in text
    assert "NVML unavailable" in text
    assert "HTTP: off" in text
    assert data["http_listen"] == []


def test_health_shows_the_http_listeners(fake: FakeModelManager, socket_path: Path) -> None:
    listen = ["http://127.0.0.1:8080", "unix:/run/mmd/http.sock"]
    fake.health = mmd_pb2.Health(version="0.1.0", http_listen=listen)
    text = invoke(socket_path, "health").stdout
    assert "HTTP: http://127.0.0.1:8080, unix:/run/mmd/http.sock" in text.splitlines()
    data = json.loads(invoke(socket_path, "health", "--json").stdout)
    assert data["http_listen"] == listen


def test_plan_refused_exits_5_with_reason(fake: FakeModelManager, socket_path: Path) -> None:
    fake.plan = mmd_pb2.LoadPlan(
        model_id="chat", feasible=False, reason="needs 5.0 GiB, 2.0 GiB free"
    )
    result = invoke(socket_path, "plan", "chat")
    assert result.exit_code == 5
    assert "needs 5.0 GiB, 2.0 GiB free" in result.stdout


def test_plan_feasible_lists_evictions(fake: FakeModelManager, socket_path: Path) -> None:
    fake.plan = mmd_pb2.LoadPlan(
        model_id="chat",
        feasible=True,
        evict=["idle"],
        placement=mmd_pb2.Placement(gpu_layers=20, total_layers=32),
        footprint=mmd_pb2.Footprint(total_bytes=2**30, weights_bytes=2**29),
    )
    result = invoke(socket_path, "plan", "chat", "--gpu-layers", "20")
    assert result.exit_code == 0, result.output
    assert "split 20/32 gpu" in result.stdout
    assert "would evict: idle" in result.stdout
    request = fake.requests[-1]
    assert isinstance(request, mmd_pb2.PlanLoadRequest)
    assert request.gpu_layers == 20
    data = json.loads(invoke(socket_path, "plan", "chat", "--json").stdout)
    assert data["evict"] == ["idle"]
    assert data["footprint"]["total_bytes"] == 2**30


# --- load, unload, embed ---------------------------------------------------------


def test_load_reports_progress_on_stderr_and_the_model(socket_path: Path) -> None:
    result = invoke(socket_path, "load", "chat", "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == ["planning: fits", "loading", "ready"]
    data = json.loads(result.stdout)
    assert (data["id"], data["state"], data["pid"]) == ("chat", "ready", 4242)


def test_unload_json(fake: FakeModelManager, socket_path: Path) -> None:
    fake.aborted_requests = 2
    result = invoke(socket_path, "unload", "chat", "--force", "--timeout", "5", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["id"], data["state"], data["aborted_requests"]) == ("chat", "unloaded", 2)
    request = fake.requests[-1]
    assert isinstance(request, mmd_pb2.UnloadModelRequest)
    assert (request.force, request.timeout_seconds) == (True, 5.0)


def test_embed_prints_vectors(fake: FakeModelManager, socket_path: Path) -> None:
    fake.embeddings = [[0.5, -1.0]]
    one = invoke(socket_path, "embed", "chat", stdin="héllo".encode())
    assert one.exit_code == 0, one.output
    assert json.loads(one.stdout) == [0.5, -1.0]
    request = fake.requests[-1]
    assert isinstance(request, mmd_pb2.EmbedRequest)
    assert list(request.input) == ["héllo"]
    fake.embeddings = [[0.5], [0.25]]
    two = invoke(socket_path, "embed", "chat", "a", "b")
    assert json.loads(two.stdout) == [[0.5], [0.25]]


# --- infer ------------------------------------------------------------------------


def test_infer_writes_pieces_in_order(fake: FakeModelManager, socket_path: Path) -> None:
    fake.infer_pieces = ["Hel", "lo", ", wor", "ld"]
    result = invoke(socket_path, "infer", "chat", "--max-tokens", "8", stdin=b"say hi\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Hello, world\n"
    request = fake.requests[-1]
    assert isinstance(request, mmd_pb2.InferRequest)
    assert (request.prompt, request.max_tokens) == ("say hi\n", 8)
    assert not request.HasField("temperature")


def test_infer_with_system_sends_a_chat(fake: FakeModelManager, socket_path: Path) -> None:
    fake.infer_pieces = ["ok\n"]
    result = invoke(socket_path, "infer", "chat", "hi", "--system", "be brief")
    assert result.stdout == "ok\n"
    request = fake.requests[-1]
    assert isinstance(request, mmd_pb2.InferRequest)
    assert request.prompt == ""
    assert request.system == "be brief"
    assert [(m.role, m.content) for m in request.messages] == [("user", "hi")]


def test_keep_alive_minus_one_still_means_forever(
    fake: FakeModelManager, socket_path: Path
) -> None:
    fake.infer_pieces = ["a"]
    for forever in ("-1", "-1s"):
        assert invoke(socket_path, "infer", "chat", "x", "--keep-alive", forever).exit_code == 0
        request = fake.requests[-1]
        assert isinstance(request, mmd_pb2.InferRequest)
        assert request.keep_alive_seconds == -1.0


def test_infer_json(fake: FakeModelManager, socket_path: Path) -> None:
    fake.infer_pieces = ["a", "b"]
    fake.infer_done = mmd_pb2.InferDone(
        finish_reason="length",
        prompt_tokens=3,
        completion_tokens=2,
        timings=mmd_pb2.Timings(total_ms=12.5),
    )
    result = invoke(socket_path, "infer", "chat", "x", "--json", "--keep-alive", "5m")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == "chat"
    assert data["text"] == "ab"
    assert data["finish_reason"] == "length"
    assert (data["prompt_tokens"], data["completion_tokens"]) == (3, 2)
    assert data["timings"]["total_ms"] == 12.5
    request = fake.requests[-1]
    assert isinstance(request, mmd_pb2.InferRequest)
    assert request.keep_alive_seconds == 300.0


def test_infer_each_line_answers_every_line_in_order(
    fake: FakeModelManager, socket_path: Path
) -> None:
    fake.infer_pieces = ["o", "k"]
    stdin = b"first prompt\n\n   \nsecond prompt\r\nthird"
    result = invoke(socket_path, "infer", "chat", "--each-line", "--max-tokens", "3", stdin=stdin)
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["line"] for a in answers] == [1, 4, 5]  # blank lines are skipped, not renumbered
    assert all(a["text"] == "ok" and a["model"] == "chat" for a in answers)
    assert all(a["finish_reason"] == "stop" for a in answers)
    sent = [r for r in fake.requests if isinstance(r, mmd_pb2.InferRequest)]
    assert [(r.prompt, r.max_tokens) for r in sent] == [
        ("first prompt", 3),
        ("second prompt", 3),
        ("third", 3),
    ]


def test_infer_each_line_goes_on_after_a_failed_line(
    fake: FakeModelManager, socket_path: Path
) -> None:
    """A line that fails gets an error object, the next one is still answered, and the exit
    code is the first failure's."""
    fake.infer_pieces = ["x"]
    result = invoke(
        socket_path, "infer", "chat", "--each-line", stdin=b"good\n\xff bad\nalso good\n"
    )
    assert result.exit_code == 2, result.output
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["line"] for a in answers] == [1, 2, 3]
    assert answers[1] == {
        "line": 2,
        "error": "line 2 is not valid UTF-8 (byte 0xff at offset 0)",
        "exit_code": 2,
    }
    assert answers[0]["text"] == answers[2]["text"] == "x"


def test_infer_each_line_reports_runtime_failures_per_line(
    fake: FakeModelManager, socket_path: Path
) -> None:
    fake.infer_failure_after_pieces = Failure(
        grpc.StatusCode.UNAVAILABLE, "llama-server for 'chat' exited", "runtime_failed"
    )
    result = invoke(socket_path, "infer", "chat", "--each-line", stdin=b"a\nb\n")
    assert result.exit_code == 6
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(a["line"], a["exit_code"]) for a in answers] == [(1, 6), (2, 6)]
    assert "llama-server for 'chat' exited" in answers[0]["error"]


def test_infer_each_line_takes_no_prompt_argument(socket_path: Path) -> None:
    result = invoke(socket_path, "infer", "chat", "hello", "--each-line")
    assert result.exit_code == 2
    assert "--each-line reads its prompts from stdin" in one_error_line(result)


def test_infer_runtime_failure_mid_stream(fake: FakeModelManager, socket_path: Path) -> None:
    fake.infer_pieces = ["partial"]
    fake.infer_failure_after_pieces = Failure(
        grpc.StatusCode.UNAVAILABLE, "llama-server for 'chat' exited", "runtime_failed"
    )
    result = invoke(socket_path, "infer", "chat", "go")
    assert result.exit_code == 6
    assert result.stdout == "partial\n"
    assert "llama-server for 'chat' exited" in one_error_line(result)


def test_infer_connection_lost_mid_stream_is_not_no_daemon(
    fake: FakeModelManager, socket_path: Path
) -> None:
    """A stream the transport ended (no mmd error kind) after the daemon had answered: the
    daemon went away, it was not absent."""
    fake.infer_pieces = ["partial"]
    fake.infer_failure_after_pieces = Failure(grpc.StatusCode.UNAVAILABLE, "Socket closed")
    result = invoke(socket_path, "infer", "chat", "go")
    assert result.exit_code == 3
    assert result.stdout == "partial\n"
    assert one_error_line(result) == (
        f"mmctl: lost the connection to mmd at {socket_path} (Socket closed)"
    )


def mmctl_infer_process(socket_path: Path) -> subprocess.Popen[bytes]:
    """`mmctl infer chat go` in a process of its own, its output on pipes."""
    command = "from mmctl.cli import main; main()"
    return subprocess.Popen(
        [sys.executable, "-c", command, "--socket", str(socket_path), "infer", "chat", "go"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_infer_streams_before_the_answer_is_complete(
    fake: FakeModelManager, socket_path: Path
) -> None:
    """The first piece reaches a pipe while the daemon still holds the rest back."""
    fake.infer_pieces = ["first ", "second"]
    fake.infer_gate = threading.Event()
    with mmctl_infer_process(socket_path) as proc:
        assert proc.stdout is not None
        first = proc.stdout.read(len("first "))
        fake.infer_gate.set()
        rest, err = proc.communicate(timeout=60)
    assert first == b"first "
    assert not fake.infer_gate_timed_out, "mmctl held the first piece back"
    assert rest == b"second\n"
    assert proc.returncode == 0, err


def test_interrupted_infer_exits_130_and_the_daemon_sees_the_cancel(
    fake: FakeModelManager, socket_path: Path
) -> None:
    fake.infer_pieces = ["first ", "never sent"]
    fake.infer_gate = threading.Event()
    with mmctl_infer_process(socket_path) as proc:
        assert proc.stdout is not None
        assert proc.stdout.read(len("first ")) == b"first "
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err == b""
    assert rest == b"\n"  # the shell prompt starts on its own line
    # The call ended while the server was still holding the second piece back.
    assert fake.infer_ended.wait(timeout=20)
