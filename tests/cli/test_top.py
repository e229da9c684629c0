"""mmctl top: its state and screen from Watch events, and the real thing in a terminal."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, wait_until
from rich.console import Console
from terminal import Tmux, tmux_server

from mmctl.top import TopState, parse_keys, screen
from mmd.core.units import GIB, MIB
from mmd.v1 import mmd_pb2 as pb


def device(free: int) -> pb.Device:
    return pb.Device(
        id="ram",
        kind="ram",
        total_bytes=16 * GIB,
        budget_bytes=4 * GIB,
        mmd_bytes=2 * GIB,
        other_bytes=16 * GIB - 2 * GIB - free,
        free_bytes=free,
    )


def model(model_id: str, active: int = 0) -> pb.Model:
    return pb.Model(
        id=model_id,
        state=pb.MODEL_STATE_READY,
        pid=42,
        parallel=2,
        estimated_bytes=700 * MIB,
        measured_bytes=650 * MIB,
        active_requests=active,
        placement=pb.Placement(total_layers=8),
        last_used_unix=time.time() - 30,
        unloads_at_unix=time.time() + 270,
    )


def snapshot(*models: pb.Model) -> pb.Event:
    health = pb.Health(version="9.9", devices=[device(8 * GIB)], models=list(models))
    return pb.Event(time_unix=time.time(), snapshot=health)


def draw(state: TopState) -> tuple[str, Console]:
    console = Console(
        record=True, width=120, height=40, force_terminal=True, color_system="truecolor"
    )
    console.print(screen(state, 120, 40, time.time()))
    return console.export_text(clear=False), console


def test_screen_shows_gauge_models_and_activity() -> None:
    state = TopState()
    state.apply(snapshot(model("coder"), model("chat", active=1)))
    request = pb.RequestEvent(
        model_id="chat",
        kind="infer",
        status="ok",
        total_ms=812,
        completion_tokens=64,
        tokens_per_second=78.8,
    )
    state.apply(pb.Event(time_unix=time.time(), request=request))
    evicted = pb.ModelEvent(
        model_id="coder",
        state=pb.MODEL_STATE_UNLOADED,
        reason="evicted",
        for_model="big",
        model=pb.Model(id="coder", state=pb.MODEL_STATE_UNLOADED),
    )
    state.apply(pb.Event(time_unix=time.time(), model=evicted))
    text, _ = draw(state)
    assert "mmd 9.9" in text
    assert "ram" in text
    assert "█" in text
    assert "┃" in text
    assert "budget 4.0 GiB" in text
    assert "chat" in text
    assert "1/2" in text
    assert "busy" in text
    assert "coder unloaded (evicted for big)" in text
    assert "78.8 tok/s" in text
    assert "coder" not in text.split("models")[1].split("requests and events")[0]
    assert state.stale  # per-model counts wait for a fresh Health


def test_gauge_turns_red_above_the_alert() -> None:
    state = TopState()
    state.apply(snapshot(model("a")))
    alert = pb.MemoryAlert(device="ram", used_percent=91, threshold_percent=85, above=True)
    state.apply(pb.Event(time_unix=time.time(), alert=alert))
    _, console = draw(state)
    ram_line = next(line for line in console.export_text(styles=True).splitlines() if "ram" in line)
    assert "\x1b[31m█" in ram_line  # mmd's share of the bar, in red
    state.apply(pb.Event(time_unix=time.time(), alert=pb.MemoryAlert(device="ram", above=False)))
    assert not state.alerts


def test_selection_moves_and_follows_models() -> None:
    state = TopState()
    state.apply(snapshot(model("a"), model("b"), model("c")))
    assert state.selected == "a"
    state.move(1)
    state.move(1)
    state.move(1)
    assert state.selected == "c"
    state.move(-1)
    assert state.selected == "b"
    gone = pb.ModelEvent(model_id="b", state=pb.MODEL_STATE_UNLOADED, model=pb.Model(id="b"))
    state.apply(pb.Event(model=gone))
    assert state.selected == "a"


def test_parse_keys() -> None:
    assert list(parse_keys(b"q")) == ["q"]
    assert list(parse_keys(b"\x1b[A\x1b[Bjk")) == ["up", "down", "j", "k"]
    assert list(parse_keys(b"\x1b[15~")) == []


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    yield from tmux_server("top")


def test_top_in_a_real_terminal(
    make_daemon: Any, model_files: dict[str, Path], tmux: Tmux, tmp_path: Path
) -> None:
    daemon: Daemon = make_daemon(
        f'[models.t]\npath = "{model_files["tiny"]}"\n[models.u]\npath = "{model_files["tiny2"]}"\n'
    )
    daemon.mmctl("load", "t")
    daemon.mmctl("load", "u")
    status = tmp_path / "status"
    command = f"{sys.executable} -m mmctl top; echo $? > {status}"
    started = tmux.run(
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "120",
        "-y",
        "40",
        "-e",
        f"MMD_SOCKET={daemon.socket}",
        command,
    )
    assert started.returncode == 0, started.stderr
    assert wait_until(lambda: "models" in tmux.screen() and "u " in tmux.screen(), timeout=30)
    # Each check waits: a capture can catch the screen in the middle of a redraw.
    for text in ("budget", "ram ", "┃", "ready", "q quit"):
        assert wait_until(lambda text=text: text in tmux.screen(), timeout=10), tmux.screen()
    # t is selected first; move down to u and unload it.
    tmux.keys("j")
    tmux.keys("u")
    assert wait_until(
        lambda: {m["id"] for m in json.loads(daemon.mmctl("ps", "--json").stdout)} == {"t"},
        timeout=30,
    )
    assert wait_until(lambda: "u unloaded (unload)" in tmux.screen(), timeout=10)
    tmux.keys("q")
    assert wait_until(lambda: status.exists() and status.read_text().strip() != "", timeout=10)
    assert status.read_text().strip() == "0"


def test_top_without_a_terminal_prints_lines(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(f'[models.t]\npath = "{model_files["tiny"]}"\n')
    process = subprocess.Popen(
        [sys.executable, "-m", "mmctl", "top"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=daemon.env(),
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline().decode()
        assert " snapshot " in first
        assert "ram mmd" in first
    finally:
        process.kill()
        process.wait()
