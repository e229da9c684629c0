"""mmctl chat: a conversation in a real terminal (tmux), and one turn per piped line."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CHATML, Daemon, wait_until
from terminal import Tmux, tmux_server
from watching import Watcher

from mmd.runtime.synthetic import write_model

LONG_LINE = "word " * 300  # ~1,500 tokens: more than a 256-token context holds
GREEDY = ("--max-tokens", "4", "--temperature", "0")  # the same answer every time


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("chat")
    return {
        "chat": write_model(base / "chat.gguf", seed=1, chat_template=CHATML),
        "plain": write_model(base / "plain.gguf"),
        # Slow enough that an answer of thousands of tokens is still being written when
        # Ctrl-C arrives.
        "slow": write_model(
            base / "slow.gguf", embedding=512, blocks=8, heads=8, seed=2, chat_template=CHATML
        ),
    }


@pytest.fixture
def daemon(make_daemon: Any, models: dict[str, Path]) -> Daemon:
    return make_daemon(  # type: ignore[no-any-return]
        f'[models.chat]\npath = "{models["chat"]}"\nctx = 2048\n'
        f'[models.small]\npath = "{models["chat"]}"\nctx = 256\n'
        f'[models.plain]\npath = "{models["plain"]}"\nctx = 512\n'
        f'[models.slow]\npath = "{models["slow"]}"\nctx = 8192\n'
    )


def chat(daemon: Daemon, stdin: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "mmctl", "chat", *args],
        input=stdin.encode(),
        capture_output=True,
        env=daemon.env(),
        timeout=120,
        check=False,
    )


def finished(watcher: Watcher, count: int) -> list[tuple[str, int]]:
    """Status and prompt size of the first ``count`` finished requests, in order."""
    assert wait_until(lambda: len(watcher.kinds("request")) >= count, timeout=30)
    return [(r.status, r.prompt_tokens) for r in watcher.kinds("request")][:count]


def test_piped_lines_are_turns_of_one_conversation(daemon: Daemon) -> None:
    watcher = Watcher(daemon)
    try:
        result = chat(daemon, "hello\nthere\n\n/clear\nagain\n", "chat", *GREEDY)
        assert result.returncode == 0, result.stderr
        requests = finished(watcher, 3)
    finally:
        watcher.close()
    assert [status for status, _ in requests] == ["ok"] * 3
    tokens = [size for _, size in requests]
    # The second turn carries the first and its answer; after /clear the history is gone
    # ("again" is as long as "hello").
    assert tokens[1] > tokens[0] + 4
    assert tokens[2] == tokens[0]
    # stdout holds the answers alone, the first the same as infer's (one user turn
    # through the same template, greedy sampling).
    alone = daemon.mmctl("infer", "chat", "hello", *GREEDY)
    assert alone.returncode == 0, alone.stderr
    assert alone.stdout.strip()
    assert result.stdout.startswith(alone.stdout)
    assert b"cleared" not in result.stdout
    assert result.stderr.decode().splitlines() == ["(conversation cleared)"]


def test_a_model_without_a_template_warns_once_per_session(daemon: Daemon) -> None:
    result = chat(daemon, "one\ntwo\nthree\n", "plain", *GREEDY)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("mmctl: warning: model 'plain' has no chat template")
    assert result.stdout.count(b"\n") >= 3


def test_a_context_overflow_is_one_line_and_the_chat_goes_on(daemon: Daemon) -> None:
    watcher = Watcher(daemon)
    try:
        result = chat(daemon, f"hi\n{LONG_LINE}\nok\n/bye\nnever sent\n", "small", *GREEDY)
        requests = finished(watcher, 3)
    finally:
        watcher.close()
    assert len(watcher.kinds("request")) == 3  # nothing after /bye
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("mmctl: model 'small' rejected the request:")
    assert "exceeds the available context size" in lines[0]
    assert lines[0].endswith("(the conversation outgrew the model's context: /clear forgets it)")
    assert [status for status, _ in requests] == ["ok", "INVALID_ARGUMENT", "ok"]
    # "ok" went with "hi" and its answer, not with the refused turn (which no 256-token
    # context holds).
    (_, first), _, (_, third) = requests
    assert first < third < 256
    # Piped input ends with the status of the last turn that failed; /bye ended the input.
    assert result.returncode == 2


def test_unknown_model_fails_before_the_first_turn(daemon: Daemon) -> None:
    result = chat(daemon, "hello\n", "nope")
    assert result.returncode == 4
    assert result.stderr.decode() == "mmctl: unknown model 'nope' (see 'mmctl models')\n"
    assert result.stdout == b""


def start(tmux: Tmux, daemon: Daemon, command: str) -> None:
    started = tmux.run(
        "new-session", "-d", "-s", "chat", "-x", "100", "-y", "40",
        "-e", f"MMD_SOCKET={daemon.socket}", command,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    yield from tmux_server("chat")


def prompts(screen: str) -> int:
    return sum(1 for line in screen.splitlines() if line.startswith(">>>"))


def active(daemon: Daemon) -> int:
    return int(json.loads(daemon.mmctl("health", "--json").stdout)["active_inferences"])


def test_chat_in_a_real_terminal(daemon: Daemon, tmux: Tmux, tmp_path: Path) -> None:
    status = tmp_path / "status"
    start(
        tmux, daemon, f"{sys.executable} -m mmctl chat chat {' '.join(GREEDY)}; echo $? > {status}"
    )
    assert wait_until(lambda: "chatting with chat" in tmux.screen(), timeout=30), tmux.screen()
    assert wait_until(lambda: prompts(tmux.screen()) == 1, timeout=10), tmux.screen()
    tmux.keys("hello there", "Enter")
    # The answer is written under the question, then a new prompt.
    assert wait_until(lambda: prompts(tmux.screen()) == 2, timeout=30), tmux.screen()
    answer = tmux.screen().split(">>> hello there\n")[1].split(">>>")[0]
    assert answer.strip()
    tmux.keys("/clear", "Enter")
    assert wait_until(lambda: "(conversation cleared)" in tmux.screen(), timeout=10)
    # Ctrl-C at the prompt clears the line, and the chat goes on.
    tmux.keys("half a line")
    tmux.keys("C-c")
    assert wait_until(lambda: "(Ctrl-D or /bye ends the chat)" in tmux.screen(), timeout=10)
    tmux.keys("/help", "Enter")
    assert wait_until(lambda: "forget the conversation" in tmux.screen(), timeout=10)
    tmux.keys("/bye", "Enter")
    assert wait_until(lambda: status.exists() and status.read_text().strip() != "", timeout=10)
    assert status.read_text().strip() == "0"
    assert "Traceback" not in tmux.screen()


def test_ctrl_c_stops_the_answer_not_the_chat(daemon: Daemon, tmux: Tmux, tmp_path: Path) -> None:
    status = tmp_path / "status"
    command = f"{sys.executable} -m mmctl chat slow --max-tokens 8000; echo $? > {status}"
    start(tmux, daemon, command)
    assert wait_until(lambda: prompts(tmux.screen()) == 1, timeout=30), tmux.screen()
    tmux.keys("go on and on", "Enter")
    assert wait_until(lambda: active(daemon) == 1, timeout=30)
    # Text is arriving: the line under the question grows.
    assert wait_until(
        lambda: len("".join(tmux.screen().split(">>> go on and on")[1].split())) > 20,
        timeout=30,
    ), tmux.screen()
    tmux.keys("C-c")
    assert wait_until(lambda: "(answer stopped" in tmux.screen(), timeout=10), tmux.screen()
    # The daemon stopped generating, and the chat waits for the next turn.
    assert wait_until(lambda: active(daemon) == 0, timeout=10)
    assert wait_until(lambda: tmux.screen().rstrip().endswith(">>>"), timeout=10), tmux.screen()
    assert not status.exists()
    # Ctrl-D ends it.
    tmux.keys("C-d")
    assert wait_until(lambda: status.exists() and status.read_text().strip() != "", timeout=10)
    assert status.read_text().strip() == "0"
    assert "Traceback" not in tmux.screen()


def test_the_system_prompt_leads_every_turn(daemon: Daemon) -> None:
    watcher = Watcher(daemon)
    try:
        chat(daemon, "hello\nthere\n", "chat", *GREEDY)
        chat(daemon, "hello\nthere\n", "chat", "--system", "Be brief.", *GREEDY)
        requests = finished(watcher, 4)
    finally:
        watcher.close()
    plain, with_system = [size for _, size in requests[:2]], [size for _, size in requests[2:]]
    # "Be brief." in its own ChatML turn, in both requests of the conversation.
    assert with_system[0] > plain[0] + 9
    assert with_system[1] > plain[1] + 9


def test_no_daemon_ends_the_chat_with_exit_3(tmp_path: Path) -> None:
    missing = tmp_path / "run" / "mmd.sock"
    result = subprocess.run(
        [sys.executable, "-m", "mmctl", "--socket", str(missing), "chat", "smol"],
        input=b"hello\n",
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 3
    assert result.stderr.decode().startswith(f"mmctl: no mmd daemon at {missing} ")
    assert len(result.stderr.splitlines()) == 1
    assert result.stdout == b""
