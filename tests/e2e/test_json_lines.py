"""The JSON Lines socket (<socket>.json) and mmctl's quick commands over it, against a real
daemon with real llama-server children: the same answers, errors and exit codes as the
full CLI over gRPC, cancellation by hanging up, and the fallback to gRPC without it."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, wait_until

from mmd.host import paths

GREEDY = ("--max-tokens", "4", "--temperature", "0")  # the same answer every time
# Keys whose values differ from one call to the next: timings, memory samples, and the
# times the daemon keeps on its monotonic clock and converts to the wall clock at each call.
MEASURED_ANEW = (
    "timings",
    "measured_bytes",
    "runtime_bytes",
    "last_used_unix",
    "unloads_at_unix",
    "ready_since_unix",
    "uptime_seconds",
    "budget_bytes",
    "mmd_bytes",
    "other_bytes",
    "free_bytes",
)


# A generation that runs ~20 s on 2 cores: long enough to hang up on, or to cut off.
LONG_TOKENS = 4000


def registry(model_files: dict[str, Path]) -> str:
    return f"""
    [models.tiny]
    path = "{model_files["tiny"]}"
    ctx = 512
    parallel = 2

    [models.long]
    path = "{model_files["m50"]}"
    ctx = 4096
    """


@pytest.fixture
def daemon(make_daemon: Any, model_files: dict[str, Path]) -> Daemon:
    d: Daemon = make_daemon(registry(model_files))
    return d


def full_cli(daemon: Daemon, *args: str, input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """The same command line through the full CLI (Typer, gRPC), never the quick path."""
    code = "from mmctl.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        input=input,
        capture_output=True,
        env=daemon.env(),
        timeout=60,
        check=False,
    )


def without_measured(value: Any) -> Any:
    """``value`` without the keys of MEASURED_ANEW, at every depth."""
    if isinstance(value, dict):
        return {k: without_measured(v) for k, v in value.items() if k not in MEASURED_ANEW}
    if isinstance(value, list):
        return [without_measured(item) for item in value]
    return value


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two JSON values differ, as paths (for a failure's message)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            d for k in a.keys() | b.keys() for d in differences(a.get(k), b.get(k), f"{where}.{k}")
        ]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in differences(x, y, f"{where}[{i}]")
        ]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def lines_socket(daemon: Daemon) -> Path:
    return paths.json_socket(daemon.socket)


def call(daemon: Daemon, request: object) -> list[dict[str, Any]]:
    """One request over the JSON Lines socket; every line of the answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(60)
        conn.connect(str(lines_socket(daemon)))
        conn.sendall(json.dumps(request).encode() + b"\n")
        with conn.makefile("rb") as answer:
            return [json.loads(line) for line in answer]


def hang_up(conn: socket.socket) -> None:
    """Close the connection now (close() alone waits for its file objects to close)."""
    conn.shutdown(socket.SHUT_RDWR)
    conn.close()


@pytest.fixture
def open_call() -> Iterator[Any]:
    """open_call(daemon, request) -> (connection, its answer's lines as they come); all
    closed after the test."""
    opened: list[socket.socket] = []

    def start(daemon: Daemon, request: object) -> tuple[socket.socket, Iterator[bytes]]:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        opened.append(conn)
        conn.settimeout(60)
        conn.connect(str(lines_socket(daemon)))
        conn.sendall(json.dumps(request).encode() + b"\n")
        return conn, iter(conn.makefile("rb"))

    yield start
    for conn in opened:
        conn.close()


def test_the_socket_is_beside_the_grpc_one_for_owner_and_group_and_goes_at_stop(
    daemon: Daemon,
) -> None:
    info = os.lstat(lines_socket(daemon))
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == stat.S_IMODE(os.lstat(daemon.socket).st_mode) == 0o660
    daemon.stop()
    assert not lines_socket(daemon).exists()
    assert not daemon.socket.exists()


def test_models_and_an_inference_in_lines(daemon: Daemon) -> None:
    (models,) = call(daemon, {"call": "models"})
    assert [m["id"] for m in models["models"]] == ["tiny", "long"]
    assert {m["state"] for m in models["models"]} == {"unloaded"}
    assert models["notes"] == []
    (health,) = call(daemon, {"call": "health"})
    assert health["health"]["active_inferences"] == 0
    assert health["health"]["models"] == []
    answer = call(daemon, {"call": "infer", "model": "tiny", "prompt": "hi", "max_tokens": 6})
    assert "warning" in answer[0]  # no chat template: the prompt goes as it is
    texts = [line["text"] for line in answer[1:-1]]
    assert texts
    assert all(isinstance(text, str) for text in texts)
    done = answer[-1]["done"]
    assert done["completion_tokens"] == 6
    assert done["mode"] == "raw"
    assert set(done["timings"]) >= {"queue_ms", "load_ms", "first_token_ms", "total_ms"}


@pytest.mark.parametrize(
    ("request_line", "status", "words"),
    [
        (b"{not json\n", "INVALID_ARGUMENT", "not valid JSON"),
        (b"[1, 2]\n", "INVALID_ARGUMENT", "must be a JSON object"),
        (b'{"call": "unload"}\n', "INVALID_ARGUMENT", "unknown call 'unload'"),
        (b'{"call": "infer", "model": "tiny", "prompt": " "}\n', "INVALID_ARGUMENT", "empty"),
        (b'{"call": "infer", "model": "tiny", "prompt": "x", "max_tokens": "9"}\n', "", "max_"),
        (b'{"call": "infer", "model": "nope", "prompt": "x"}\n', "NOT_FOUND", "unknown model"),
    ],
)
def test_a_bad_request_gets_one_error_line_and_the_daemon_serves_on(
    daemon: Daemon, request_line: bytes, status: str, words: str
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(str(lines_socket(daemon)))
        conn.sendall(request_line)
        with conn.makefile("rb") as answer:
            (line,) = [json.loads(raw) for raw in answer]
    error = line["error"]
    assert error["status"] == (status or "INVALID_ARGUMENT")
    assert words in error["message"]
    assert error["kind"] in ("invalid_request", "unknown_model")
    (models,) = call(daemon, {"call": "models"})
    assert len(models["models"]) == 2


def test_mmctl_says_the_same_over_either_socket(daemon: Daemon) -> None:
    """Output, error line and exit code of each quick command line, against the full CLI's."""
    for args, stdin in [
        (("ps", "--json"), b""),
        (("ps",), b""),
        (("infer", "tiny", "hello", *GREEDY), b""),
        (("infer", "tiny", *GREEDY), b"from stdin"),
        (("infer", "tiny", "-", "--json", *GREEDY), b"as json"),
        (("infer", "tiny", "hi", "--system", "Be brief.", *GREEDY, "--keep-alive", "5m"), b""),
        (("infer", "tiny", "hi", "--raw", *GREEDY), b""),
        (("infer", "nope", "hi"), b""),
        (("infer", "tiny"), b"  \n"),
        (("infer", "tiny"), b"\xff\xfe"),
        (("infer", "tiny"), b"x" * (3 * 1024 * 1024)),  # over max_prompt_bytes (1 MiB)
        (("ps",), b""),
        (("ps", "--json"), b""),
        (("models", "--json"), b""),
        (("health", "--json"), b""),
    ]:
        quick = daemon.mmctl(*args, input=stdin)
        full = full_cli(daemon, *args, input=stdin)
        assert (quick.returncode, quick.stderr) == (full.returncode, full.stderr), args
        if "--json" in args and quick.returncode == 0:
            quick_out, full_out = json.loads(quick.stdout), json.loads(full.stdout)
            quick_kept, full_kept = without_measured(quick_out), without_measured(full_out)
            assert quick_kept == full_kept, (args, differences(quick_kept, full_kept))
        elif args[0] == "ps":
            # MEM MEASURED is sampled each second, LAST USED ("Ns ago") ticks.
            def columns(out: bytes) -> list[list[str]]:
                rows = [line.split("\t") for line in out.decode().splitlines()]
                return [row[:5] + row[6:9] + row[10:] for row in rows]

            assert columns(quick.stdout) == columns(full.stdout), args
        else:
            assert quick.stdout == full.stdout, args
    assert b"tiny\tready" in daemon.mmctl("ps").stdout  # the inferences loaded it


def test_the_quick_commands_load_neither_grpc_nor_protobuf_nor_typer(daemon: Daemon) -> None:
    probe = (
        "import json, sys\n"
        "from mmctl import quick\n"
        "code = quick.run(sys.argv[1:])\n"
        "heavy = ('grpc', 'google.protobuf', 'typer', 'rich', 'aiohttp', 'mmd.v1')\n"
        "sys.stderr.write(json.dumps([code, [m for m in heavy if m in sys.modules]]))\n"
    )
    quick_lines = (
        ("ps",),
        ("ps", "--json"),
        ("models", "--json"),
        ("health", "--json"),
        ("infer", "tiny", "hi", "--max-tokens", "2"),
    )
    for args in quick_lines:
        result = subprocess.run(
            [sys.executable, "-c", probe, "--socket", str(daemon.socket), *args],
            capture_output=True,
            timeout=60,
            check=False,
        )
        # The last line: a warning about the prompt may come before it.
        assert json.loads(result.stderr.splitlines()[-1]) == [0, []], (args, result.stderr)
        assert result.stdout


def test_a_client_that_hangs_up_cancels_its_request_running_or_queued(
    daemon: Daemon, open_call: Any
) -> None:
    request = {"call": "infer", "model": "long", "prompt": "go", "max_tokens": LONG_TOKENS}
    running, running_lines = open_call(daemon, request)
    first = [json.loads(next(running_lines)) for _ in range(3)]
    assert any("text" in line for line in first)
    queued, _ = open_call(daemon, request)  # one slot: this one waits
    assert wait_until(lambda: daemon.health().queued_requests == 1, timeout=10)
    hang_up(queued)
    assert wait_until(lambda: daemon.health().queued_requests == 0, timeout=5)
    assert daemon.health().active_inferences == 1  # the first one goes on
    hang_up(running)
    assert wait_until(lambda: daemon.health().active_inferences == 0, timeout=5)
    answer = call(daemon, {"call": "infer", "model": "long", "prompt": "go", "max_tokens": 3})
    assert answer[-1]["done"]["completion_tokens"] == 3


def test_a_client_that_only_stops_sending_still_gets_its_answer(
    daemon: Daemon, open_call: Any
) -> None:
    """As socat and nc -N do at the end of their input: shut the sending side, read on."""
    short = {"call": "infer", "model": "tiny", "prompt": "hi", "max_tokens": 5}
    conn, lines = open_call(daemon, short)
    conn.shutdown(socket.SHUT_WR)
    answer = [json.loads(line) for line in lines]
    assert answer[-1]["done"]["completion_tokens"] == 5
    request = {"call": "infer", "model": "long", "prompt": "go", "max_tokens": LONG_TOKENS}
    conn, lines = open_call(daemon, request)
    conn.shutdown(socket.SHUT_WR)
    pieces = [json.loads(next(lines)) for _ in range(3)]
    assert any("text" in piece for piece in pieces)
    time.sleep(0.5)  # five of the daemon's looks for a hang-up
    assert daemon.health().active_inferences == 1
    hang_up(conn)  # and now it goes: the generation stops
    assert wait_until(lambda: daemon.health().active_inferences == 0, timeout=5)


def test_a_request_cut_off_by_a_shutdown_is_told_so(
    make_daemon: Any, model_files: dict[str, Path], open_call: Any
) -> None:
    daemon: Daemon = make_daemon(registry(model_files), drain_timeout="0.5s")
    request = {"call": "infer", "model": "long", "prompt": "go", "max_tokens": LONG_TOKENS}
    _, answer = open_call(daemon, request)
    assert "text" in json.loads(next(answer)) or "text" in json.loads(next(answer))
    assert daemon.process is not None
    daemon.process.terminate()  # the drain (0.5 s) ends long before the answer would
    last = [json.loads(line) for line in answer][-1]
    assert last["error"]["status"] == "ABORTED"
    assert last["error"]["message"] == "mmd is shutting down"


def test_without_the_socket_mmctl_uses_grpc(daemon: Daemon) -> None:
    lines_socket(daemon).unlink()
    result = daemon.mmctl("infer", "tiny", "hi", "--max-tokens", "3", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["completion_tokens"] == 3
    listed = daemon.mmctl("ps", "--json")
    assert [m["id"] for m in json.loads(listed.stdout)] == ["tiny"]


def test_a_path_in_the_way_leaves_the_daemon_serving_over_grpc(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(f'[models.tiny]\npath = "{model_files["tiny"]}"\n', start=False)
    daemon.socket.parent.mkdir(mode=0o750, parents=True)
    blocker = lines_socket(daemon)
    blocker.write_text("not mmd's\n")
    daemon.start()
    assert blocker.read_text() == "not mmd's\n"  # left alone
    assert "no JSON Lines socket" in daemon.log_path.read_text()
    result = daemon.mmctl("infer", "tiny", "hi", "--max-tokens", "2", "--json")
    assert result.returncode == 0, result.stderr
    daemon.stop()
    assert blocker.read_text() == "not mmd's\n"


def test_an_unreachable_daemon_is_the_full_clis_exit_3(tmp_path: Path) -> None:
    missing = tmp_path / "mmd.sock"
    for args in (("ps",), ("infer", "m", "hi")):
        result = subprocess.run(
            [sys.executable, "-m", "mmctl", "--socket", str(missing), *args],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 3
        assert result.stderr.decode().startswith(f"mmctl: no mmd daemon at {missing}")


def test_ctrl_c_on_a_quick_infer_is_exit_130_and_stops_the_generation(daemon: Daemon) -> None:
    argv = [sys.executable, "-m", "mmctl", "infer", "long", "go", "--max-tokens", str(LONG_TOKENS)]
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=daemon.env()
    ) as mmctl:
        assert mmctl.stdout is not None
        assert mmctl.stdout.read(1)  # the answer has begun
        mmctl.send_signal(signal.SIGINT)
        assert mmctl.wait(timeout=10) == 130
        assert mmctl.stderr is not None
        assert b"Traceback" not in mmctl.stderr.read()
    assert wait_until(lambda: daemon.health().active_inferences == 0, timeout=5)


def test_a_dead_socket_left_at_the_path_is_replaced(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(f'[models.tiny]\npath = "{model_files["tiny"]}"\n', start=False)
    daemon.socket.parent.mkdir(mode=0o750, parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(lines_socket(daemon)))  # bound, never listening, left behind
    daemon.start()
    (models,) = call(daemon, {"call": "models"})
    assert [m["id"] for m in models["models"]] == ["tiny"]
