"""Bad input against the real daemon: each is refused with its documented message and code,
and the daemon goes on serving normal requests afterwards.

One daemon serves the whole module (with real llama-server children); the start-up cases
run mmd processes of their own that exit before serving.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import Daemon, llama_children

from mmd.errors import ERROR_KIND_KEY
from mmd.runtime import read_log_tail
from mmd.synthetic import write_model
from mmd.v1 import mmd_pb2 as pb

PROMPT_LIMIT = 1024
IS_ROOT = os.geteuid() == 0


# --- the shared daemon ----------------------------------------------------------------------


def plant_stale_socket(path: Path, keep: Path) -> int:
    """What a SIGKILLed daemon leaves behind: a socket file nobody listens on, and its lock
    file. A second hard link, ``keep``, holds the stale socket's inode so that the file system
    cannot hand its number to the daemon's new socket. Returns the stale socket's inode."""
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))
    os.link(path, keep)
    path.with_name(path.name + ".lock").touch()
    return path.stat().st_ino


class Served:
    """The module's daemon, its model files and the inode of the stale socket it replaced."""

    def __init__(self, daemon: Daemon, models: dict[str, Path], stale_inode: int) -> None:
        self.daemon = daemon
        self.models = models
        self.stale_inode = stale_inode


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("bad-input")
    models = {
        name: write_model(base / "models" / f"{name}.gguf", seed=seed)
        for seed, name in enumerate(("tiny", "gone", "broken"))
    }
    # The text goes on right after conftest's [daemon] keys, so its first line is one more.
    config = f"""\
    max_prompt_bytes = "{PROMPT_LIMIT}B"

    [models.tiny]
    path = "{models["tiny"]}"
    ctx = 256

    [models.gone]
    path = "{models["gone"]}"
    ctx = 256

    [models.broken]
    path = "{models["broken"]}"
    ctx = 256
    """
    root = base / "daemon"
    root.mkdir()
    daemon = Daemon(root, textwrap.dedent(config))
    stale_inode = plant_stale_socket(daemon.socket, keep=base / "stale-socket-link")
    daemon.start()
    try:
        yield Served(daemon, models, stale_inode)
    finally:
        daemon.stop()
        leftovers = llama_children(str(base))
        for proc in leftovers:
            proc.kill()
        assert not leftovers, f"llama-server children survived their daemon: {leftovers}"


@pytest.fixture
def daemon(served: Served) -> Daemon:
    return served.daemon


def assert_still_serves(daemon: Daemon) -> None:
    assert daemon.process is not None
    assert daemon.process.poll() is None, daemon.log_path.read_text()
    request = pb.InferRequest(model_id="tiny", prompt="still there?", max_tokens=2)
    try:
        chunks = list(daemon.stub.Infer(request, timeout=60))
    except grpc.RpcError as err:
        logs = [daemon.log_path, daemon.root / "logs" / "tiny.log"]
        tails = "\n".join(line for path in logs for line in read_log_tail(path, 15))
        raise AssertionError(f"a normal request failed: {err.details()}\n{tails}") from None
    assert chunks[-1].done.completion_tokens == 2


def _complete(call: Callable[[], Any]) -> None:
    """Make the call; read a stream to its end."""
    result = call()
    if isinstance(result, Iterator):
        list(result)


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        _complete(call)
    return err.value


def kind_of(err: grpc.RpcError) -> str | None:
    metadata: Any = err.trailing_metadata()
    return next((value for key, value in metadata or () if key == ERROR_KIND_KEY), None)


def error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    """mmctl's one error line (load progress lines may come before it)."""
    lines = result.stderr.decode().splitlines()
    assert lines, "no error line on stderr"
    assert lines[-1].startswith("mmctl: "), lines
    assert not any("Traceback" in line for line in lines), lines
    return lines[-1]


def infer(stub: Any, timeout: float = 60, **fields: Any) -> Callable[[], Iterator[pb.InferChunk]]:
    return lambda: stub.Infer(pb.InferRequest(**fields), timeout=timeout)


# --- requests ---------------------------------------------------------------------------------


def test_stale_socket_from_a_crashed_daemon_is_replaced(served: Served) -> None:
    # The fixture planted a stale socket and lock file before starting the daemon, and keeps
    # a second link to the stale one: its inode number is still taken, so the daemon's socket
    # has another one only if the daemon really made a new socket.
    daemon = served.daemon
    assert daemon.socket.stat().st_ino != served.stale_inode
    assert stat.S_ISSOCK(daemon.socket.stat().st_mode)
    log = daemon.log_path.read_text()
    assert f"took over {daemon.socket}: the daemon that left it is gone" in log
    assert_still_serves(daemon)


def test_unknown_model(daemon: Daemon) -> None:
    result = daemon.mmctl("infer", "nope", "hello")
    assert result.returncode == 4
    assert error_line(result) == "mmctl: unknown model 'nope' (see 'mmctl models')"
    result = daemon.mmctl("load", "nope")
    assert result.returncode == 4
    assert "unknown model 'nope'" in error_line(result)
    err = rpc_error(infer(daemon.stub, model_id="nope", prompt="hello"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "unknown model 'nope' (see 'mmctl models')"
    err = rpc_error(lambda: daemon.stub.PlanLoad(pb.PlanLoadRequest(model_id="Tiny ")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert_still_serves(daemon)


def test_empty_model_id_over_grpc(daemon: Daemon) -> None:
    err = rpc_error(infer(daemon.stub, model_id="", prompt="hello"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "model_id is empty"
    assert_still_serves(daemon)


def test_empty_prompt(daemon: Daemon) -> None:
    result = daemon.mmctl("infer", "tiny", "")
    assert result.returncode == 2
    assert error_line(result) == "mmctl: empty prompt"
    result = daemon.mmctl("infer", "tiny", input=b" \n\t\n")
    assert result.returncode == 2
    assert error_line(result) == "mmctl: empty prompt"
    for prompt in ("", "   \n"):
        err = rpc_error(infer(daemon.stub, model_id="tiny", prompt=prompt))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details() == "empty prompt"
    assert_still_serves(daemon)


def test_prompt_over_max_prompt_bytes(daemon: Daemon) -> None:
    too_long = "x" * (PROMPT_LIMIT + 1)
    result = daemon.mmctl("infer", "tiny", input=too_long.encode())
    assert result.returncode == 2
    expected = f"prompt is {PROMPT_LIMIT + 1} bytes; the limit is {PROMPT_LIMIT} (max_prompt_bytes)"
    assert error_line(result) == f"mmctl: {expected}"
    err = rpc_error(infer(daemon.stub, model_id="tiny", prompt=too_long))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == expected
    # The limit counts bytes, not characters, and the system prompt with the messages.
    chat = pb.InferRequest(
        model_id="tiny",
        system="s" * 600,
        messages=[pb.ChatMessage(role="user", content="é" * 300)],
    )
    err = rpc_error(lambda: daemon.stub.Infer(chat, timeout=60))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt is 1200 bytes" in (err.details() or "")
    err = rpc_error(
        lambda: daemon.stub.Embed(pb.EmbedRequest(model_id="tiny", input=[too_long]), timeout=60)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_prompt_bytes" in (err.details() or "")
    assert_still_serves(daemon)


def test_stdin_that_is_not_utf8(daemon: Daemon) -> None:
    result = daemon.mmctl("infer", "tiny", input=b"caf\xe9 au lait")
    assert result.returncode == 2
    assert error_line(result) == (
        "mmctl: the prompt on stdin is not valid UTF-8 (byte 0xe9 at offset 3)"
    )
    result = daemon.mmctl("embed", "tiny", "-", input=b"\xff\xfe")
    assert result.returncode == 2
    assert "not valid UTF-8" in error_line(result)
    assert_still_serves(daemon)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0", "0 is not in the range x>=1"),
        ("-1", "-1 is not in the range x>=1"),
        ("lots", "'lots' is not a valid int"),
    ],
)
def test_mmctl_max_tokens_out_of_range(daemon: Daemon, value: str, problem: str) -> None:
    result = daemon.mmctl("infer", "tiny", "hello", "--max-tokens", value)
    assert result.returncode == 2
    line = error_line(result)
    assert line.startswith("mmctl: Invalid value for '--max-tokens': ")
    assert problem in line
    assert_still_serves(daemon)


@pytest.mark.parametrize("value", [0, -1])
def test_grpc_max_tokens_out_of_range(daemon: Daemon, value: int) -> None:
    err = rpc_error(infer(daemon.stub, model_id="tiny", prompt="hello", max_tokens=value))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == f"max_tokens must be >= 1, got {value}"
    assert_still_serves(daemon)


@pytest.mark.parametrize("value", ["7", "-0.5", "nan", "inf"])
def test_mmctl_temperature_out_of_range(daemon: Daemon, value: str) -> None:
    result = daemon.mmctl("infer", "tiny", "hello", "--temperature", value)
    assert result.returncode == 2
    assert "'--temperature'" in error_line(result)
    assert_still_serves(daemon)


@pytest.mark.parametrize("value", [7.0, -0.5, math.nan, math.inf])
def test_grpc_temperature_out_of_range(daemon: Daemon, value: float) -> None:
    err = rpc_error(infer(daemon.stub, model_id="tiny", prompt="hello", temperature=value))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature must be between 0 and 5" in (err.details() or "")
    assert_still_serves(daemon)


def test_grpc_other_invalid_arguments(daemon: Daemon) -> None:
    bad_role = pb.InferRequest(
        model_id="tiny", messages=[pb.ChatMessage(role="robot", content="beep")]
    )
    cases: list[tuple[Callable[[], Any], str]] = [
        (lambda: daemon.stub.Infer(bad_role, timeout=60), "unknown message role 'robot'"),
        (
            lambda: daemon.stub.LoadModel(pb.LoadModelRequest(model_id="tiny", gpu_layers=-1)),
            "gpu_layers must be >= 0, got -1",
        ),
        (
            lambda: daemon.stub.UnloadModel(
                pb.UnloadModelRequest(model_id="tiny", timeout_seconds=-1)
            ),
            "timeout_seconds must be a finite number >= 0",
        ),
        (lambda: daemon.stub.Embed(pb.EmbedRequest(model_id="tiny", input=[])), "empty input"),
        (
            lambda: daemon.stub.Embed(pb.EmbedRequest(model_id="tiny", input=["a", " "])),
            "empty input",
        ),
    ]
    for call, details in cases:
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, details
        assert err.details() == details
    assert_still_serves(daemon)


def test_mmctl_other_bad_arguments(daemon: Daemon) -> None:
    result = daemon.mmctl("infer", "tiny", "hello", "--keep-alive", "soon")
    assert result.returncode == 2
    assert "'--keep-alive'" in error_line(result)
    result = daemon.mmctl("unload", "tiny", "--timeout", "-1")
    assert result.returncode == 2
    assert "'--timeout'" in error_line(result)
    result = daemon.mmctl("infer")
    assert result.returncode == 2
    assert "Missing argument 'ID'" in error_line(result)
    assert_still_serves(daemon)


# --- models whose file goes bad after the daemon started --------------------------------


def model_states(daemon: Daemon, command: str) -> dict[str, dict[str, Any]]:
    result = daemon.mmctl(command, "--json")
    assert result.returncode == 0, result.stderr
    return {model["id"]: model for model in json.loads(result.stdout)}


def test_model_file_deleted_after_start(served: Served) -> None:
    daemon = served.daemon
    path = served.models["gone"]
    path.unlink()
    result = daemon.mmctl("load", "gone")
    assert result.returncode == 6
    assert error_line(result) == f"mmctl: model 'gone': {path} does not exist"
    err = rpc_error(infer(daemon.stub, model_id="gone", prompt="hello"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert kind_of(err) == "runtime_failed"
    assert str(path) in (err.details() or "")
    gone = model_states(daemon, "models")["gone"]
    assert gone["state"] == "failed"
    assert str(path) in gone["last_error"]
    assert not [p for p in daemon.children() if str(path) in " ".join(p.cmdline())]
    assert_still_serves(daemon)


def test_child_that_exits_during_load(served: Served) -> None:
    daemon = served.daemon
    path = served.models["broken"]
    # The header was read at start; now the file keeps the magic and nothing usable after it.
    path.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    result = daemon.mmctl("infer", "broken", "hello")
    assert result.returncode == 6
    line = error_line(result)
    assert "model 'broken': llama-server exited with status 1 during load: " in line
    log_tail = line.split("during load: ", 1)[1]
    assert log_tail.strip(), "the error carries the child's last log lines"
    # Its error messages, in one short line, not the log's last lines joined with '|'.
    assert log_tail.endswith(" (more in 'mmctl logs broken')")
    assert " | " not in log_tail
    assert len(line) < 500
    err = rpc_error(infer(daemon.stub, model_id="broken", prompt="hello"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert kind_of(err) == "runtime_failed"
    assert "broken" in (err.details() or "")
    broken = model_states(daemon, "ps")["broken"]
    assert broken["state"] == "failed"
    assert broken["pid"] == 0
    assert "exited with status 1" in broken["last_error"]
    assert broken["log_tail"], "ps --json shows the failed child's log"
    assert (daemon.root / "logs" / "broken.log").is_file()
    assert_still_serves(daemon)


@pytest.mark.skipif(shutil.which("script") is None, reason="needs script(1) for a terminal")
def test_failed_load_on_a_terminal_says_the_error_once(served: Served) -> None:
    """On a terminal the progress spinner showed the failure too, then the error line."""
    daemon = served.daemon
    if model_states(daemon, "models")["broken"]["state"] != "failed":
        served.models["broken"].write_bytes(b"GGUF" + bytes(range(256)) * 64)
    command = f"{sys.executable} -m mmctl load broken"
    result = subprocess.run(
        ["script", "-qec", command, "/dev/null"],
        capture_output=True,
        env=daemon.env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 6
    assert result.stdout.decode().count("exited with status 1 during load") == 1


# --- mmd start-up -----------------------------------------------------------------------------


def run_mmd(
    root: Path, config: str, *args: str, env: dict[str, str] | None = None
) -> tuple[int | None, list[str]]:
    """Run an mmd that should exit at start. Returns (exit status, stderr lines); the status
    is None when it started serving instead (it is stopped then)."""
    root.mkdir(parents=True, exist_ok=True)
    config_path = root / "mmd.toml"
    config_path.write_text(textwrap.dedent(config))
    socket_path = root / "run" / "mmd.sock"
    run_env = {k: v for k, v in os.environ.items() if k not in ("MMD_CONFIG", "MMD_SOCKET")}
    run_env.update(env or {})
    argv = [sys.executable, "-m", "mmd", "--config", str(config_path), "--log-level", "error"]
    if "--socket" not in args:
        argv += ["--socket", str(socket_path)]
    process = subprocess.Popen(
        [*argv, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=run_env
    )
    status: int | None = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = process.poll()
        if status is not None or socket_path.exists():
            break
        time.sleep(0.05)
    if status is None:  # serving (or hung): stop it
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.stderr is not None
    lines = process.stderr.read().decode().splitlines()
    process.stderr.close()
    return status, lines


def test_mmctl_with_no_daemon_running(tmp_path: Path) -> None:
    missing = tmp_path / "run" / "mmd.sock"
    env = {k: v for k, v in os.environ.items() if k != "MMD_SOCKET"}
    result = subprocess.run(
        [sys.executable, "-m", "mmctl", "--socket", str(missing), "health"],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 3
    assert error_line(result).startswith(f"mmctl: no mmd daemon at {missing} ")
    # A socket file that nobody listens on (a daemon that was SIGKILLed) is the same.
    plant_stale_socket(missing, keep=tmp_path / "stale-socket-link")
    result = subprocess.run(
        [sys.executable, "-m", "mmctl", "models"],
        capture_output=True,
        env={**env, "MMD_SOCKET": str(missing)},
        timeout=60,
        check=False,
    )
    assert result.returncode == 3
    assert error_line(result).startswith(f"mmctl: no mmd daemon at {missing} ")


def test_invalid_config_exits_2_without_serving(tmp_path: Path) -> None:
    status, lines = run_mmd(tmp_path, "[scheduler]\nmax_concurrent = 0\n")
    assert status == 2
    assert lines == [
        f"mmd: {tmp_path / 'mmd.toml'}: scheduler.max_concurrent: must be between 1 and 4096, got 0"
    ]


def test_socket_directory_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    sock = tmp_path / "a-file" / "run" / "mmd.sock"
    status, lines = run_mmd(tmp_path / "d", "", "--socket", str(sock))
    assert status == 2
    assert lines == [f"mmd: cannot create socket directory {sock.parent}: Not a directory"]


def test_log_dir_that_cannot_be_made_exits_2_before_the_socket_directory(
    tmp_path: Path,
) -> None:
    (tmp_path / "a-file").write_text("")
    logs = tmp_path / "a-file" / "logs"
    status, lines = run_mmd(tmp_path / "d", f'[daemon]\nlog_dir = "{logs}"\n')
    assert status == 2
    assert lines == [f"mmd: cannot create log directory {logs} (daemon.log_dir): Not a directory"]
    assert not (tmp_path / "d" / "run").exists()
    status, lines = run_mmd(tmp_path / "e", f'[daemon]\nlog_dir = "{tmp_path / "a-file"}"\n')
    assert status == 2
    assert lines == [
        f"mmd: log directory {tmp_path / 'a-file'} (daemon.log_dir) is not a directory"
    ]
    assert not (tmp_path / "e" / "run").exists()


@pytest.mark.skipif(IS_ROOT, reason="root writes into any directory whatever its mode")
def test_unwritable_log_dir_exits_2_before_the_socket_directory(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o555)
    try:
        status, lines = run_mmd(tmp_path / "d", f'[daemon]\nlog_dir = "{logs}"\n')
    finally:
        logs.chmod(0o755)
    assert status == 2
    assert lines == [f"mmd: log directory {logs} (daemon.log_dir) is not writable"]
    assert not (tmp_path / "d" / "run").exists()


@pytest.mark.skipif(IS_ROOT, reason="root writes into any directory whatever its mode")
def test_unwritable_socket_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        status, lines = run_mmd(tmp_path / "d", "", "--socket", str(locked / "mmd.sock"))
    finally:
        locked.chmod(0o700)
    assert status == 2
    assert lines == [f"mmd: socket directory {locked} is not writable"]


def test_socket_path_too_long(tmp_path: Path) -> None:
    sock = tmp_path / ("s" * 110) / "mmd.sock"
    status, lines = run_mmd(tmp_path / "d", "", "--socket", str(sock))
    assert status == 2
    assert len(lines) == 1
    assert lines[0].startswith(f"mmd: --socket: socket path {sock} is ")
    assert lines[0].endswith("a Unix socket path holds at most 107")


def test_socket_directory_too_long_for_the_models_sockets(tmp_path: Path) -> None:
    # The daemon's own socket fits (< 107 bytes); children/<16 hex>.sock beside it would not.
    directory = tmp_path / ("s" * max(1, 90 - len(str(tmp_path))))
    sock = directory / "m.sock"
    status, lines = run_mmd(tmp_path / "d", "", "--socket", str(sock))
    assert status == 2
    assert len(lines) == 1
    assert lines[0].startswith(f"mmd: --socket: socket directory {directory} is too long")
    assert lines[0].endswith("a Unix socket path holds at most 107")


def test_second_daemon_on_the_same_socket(served: Served, tmp_path: Path) -> None:
    daemon = served.daemon
    status, lines = run_mmd(tmp_path, "", "--socket", str(daemon.socket))
    assert status == 3
    lock = daemon.socket.with_name("mmd.sock.lock")
    assert lines == [f"mmd: another mmd is already serving {daemon.socket} (lock {lock} is held)"]
    assert daemon.socket.exists()
    assert_still_serves(daemon)


@pytest.mark.parametrize("problem", ["missing", "not-executable", "directory"])
def test_configured_llama_server_that_is_not_there(tmp_path: Path, problem: str) -> None:
    binary = tmp_path / "bin" / "llama-server"
    if problem == "not-executable":
        binary.parent.mkdir()
        binary.write_text("#!/bin/sh\nexit 0\n")
        binary.chmod(0o644)
    elif problem == "directory":
        binary.mkdir(parents=True)
    status, lines = run_mmd(tmp_path / "d", f'[daemon]\nllama_server = "{binary}"\n')
    assert status == 4
    assert len(lines) == 1
    assert lines[0].startswith("mmd: llama-server not found; tried ")
    assert f"config daemon.llama_server={binary}" in lines[0]


def test_mmd_llama_server_env_naming_a_missing_binary(tmp_path: Path) -> None:
    binary = tmp_path / "nowhere" / "llama-server"
    status, lines = run_mmd(tmp_path / "d", "", env={"MMD_LLAMA_SERVER": str(binary)})
    assert status == 4
    assert len(lines) == 1
    assert f"$MMD_LLAMA_SERVER={binary}" in lines[0]
