"""Fixtures that run the real daemon with real llama-server children on synthetic models."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon_proc import Daemon, llama_children

from mmd.runtime.synthetic import write_model

# A suite started in the background by a script without job control inherits SIGINT
# ignored, and so would every mmctl it starts: the tests of Ctrl-C would then see none.
# A handler of our own is reset to the default in each child at exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

__all__ = ["CHATML", "Daemon", "llama_children", "serving_through", "wait_until"]

# A chat template (ChatML) for synthetic models that need one: the chat-mode tests.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(autouse=True)
def cpu_only_unless_gpu_marked(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tests mean CPU placement unless marked ``gpu``: on a machine with NVIDIA GPUs they
    are hidden from mmd (and CUDA children) the documented way, CUDA_VISIBLE_DEVICES=""."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic models shared by the session: tiny ones and three of ~40-60 MB."""
    base = tmp_path_factory.mktemp("models")
    return {
        "tiny": write_model(base / "tiny.gguf"),
        "tiny2": write_model(base / "tiny2.gguf", seed=1),
        "embed": write_model(base / "embed.gguf", embedding=128, seed=2),
        "m40": write_model(base / "m40.gguf", embedding=512, blocks=4, heads=8, seed=3),
        "m50": write_model(base / "m50.gguf", embedding=512, blocks=6, heads=8, seed=4),
        "m60": write_model(base / "m60.gguf", embedding=512, blocks=8, heads=8, seed=5),
    }


def wait_until(predicate: object, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return bool(predicate())  # type: ignore[operator]


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[object]:
    """Factory: make_daemon(config_text) -> a started Daemon; all are stopped after the test,
    and the test fails if any llama-server child outlives its daemon."""
    started: list[Daemon] = []

    def factory(config_text: str, *args: str, start: bool = True, **kw: object) -> Daemon:
        root = tmp_path / f"d{len(started)}"
        root.mkdir()
        daemon = Daemon(root, config_text, **kw)  # type: ignore[arg-type]
        started.append(daemon)
        if start:
            daemon.start(*args)
        return daemon

    yield factory
    for daemon in started:
        daemon.stop()
    leftovers = llama_children(str(tmp_path))
    for proc in leftovers:
        proc.kill()
    assert not leftovers, f"llama-server children survived their daemon: {leftovers}"


def serving_through(
    make_daemon: Callable[..., Daemon],
    model: Path,
    binary: Path,
    tmp_path: Path,
    *,
    load_timeout: float,
    timeout: float,
) -> Daemon:
    """A daemon whose llama-server is ``binary`` (a wrapper that runs it on an emulated
    CPU), proven: a load and a 6-token answer work, and health names the binary with its
    version (its verify-before-trust check passed)."""
    daemon = make_daemon(
        f'[models.tiny]\npath = "{model}"\nctx = 256\n',
        daemon_extra=f'llama_server = "{binary}"\nload_timeout = "{load_timeout:g}s"\n',
        extra_env={"XDG_DATA_HOME": str(tmp_path / "data")},
    )
    daemon.load_and_answer("tiny", tokens=6, timeout=timeout)
    health = json.loads(daemon.mmctl("health", "--json").stdout)
    assert health["llama_server"].startswith(f"{binary} (config daemon.llama_server), version")
    return daemon
