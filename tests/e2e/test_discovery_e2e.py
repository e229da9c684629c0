"""Discovered models in the real daemon: a user's Ollama store, Hugging Face cache and model
folder show up in `mmctl models` with no [models] table written, load in real llama-server
children and answer; a file added later appears on `mmctl reload`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon
from stores import hf_repo, ollama_model

from mmd.runtime.synthetic import write_model

# Store locations a test machine's environment might point elsewhere: the daemon must
# find the stores under the HOME the test gives it, as a user's daemon would.
_STORE_ENV = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "LLAMA_CACHE")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's home with a Hugging Face cache, an Ollama store and a model folder."""
    for var in _STORE_ENV:
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    hf_repo(home / ".cache" / "huggingface" / "hub", "someone/Chat-GGUF", {"Chat-Q4_K_M.gguf": 1})
    ollama_model(home / ".ollama" / "models", "llama3.2", "3b", 2, params={"num_ctx": 1024})
    write_model(home / "models" / "Folder-Model.gguf", seed=3)
    (home / "models" / "broken.gguf").write_text("not a model")
    return home


def start(make_daemon: Any, home: Path, *, serve: bool = True) -> Daemon:
    daemon: Daemon = make_daemon(
        "",  # no [models] tables at all
        daemon_extra=f"""
        model_dirs = ["{home / "models"}"]
        model_stores = ["huggingface", "ollama"]
        """,
        # OLLAMA_MODELS: the Linux service's store, /usr/share/ollama, is left out of the test.
        extra_env={"HOME": str(home), "OLLAMA_MODELS": str(home / ".ollama" / "models")},
        start=serve,
    )
    return daemon


def listed(daemon: Daemon) -> dict[str, dict[str, Any]]:
    result = daemon.mmctl("models", "--json")
    assert result.returncode == 0, result.stderr
    return {model["id"]: model for model in json.loads(result.stdout)}


def test_discovered_models_are_listed_loaded_and_rescanned(make_daemon: Any, home: Path) -> None:
    daemon = start(make_daemon, home)
    models = listed(daemon)
    assert {m: models[m]["source"] for m in models} == {
        "chat-q4_k_m": "huggingface:someone/Chat-GGUF",
        "llama3.2-3b": "ollama:llama3.2:3b",
        "folder-model": f"dir:{home / 'models'}",
    }
    assert models["llama3.2-3b"]["ctx"] == 1024  # the Modelfile's num_ctx
    assert models["chat-q4_k_m"]["ctx"] == 2048  # trained for 2048 tokens: below the cap
    assert all(m["state"] == "unloaded" for m in models.values())

    # The file that cannot be used: listed with its reason, in `models` and `health`.
    broken_note = f"{home / 'models' / 'broken.gguf'}: skipped: not a GGUF file"
    table = daemon.mmctl("models")
    assert table.returncode == 0
    header, *rows = table.stdout.decode().splitlines()
    assert header.split("\t")[-1] == "SOURCE"
    assert len(rows) == 3
    assert broken_note in table.stderr.decode()
    assert broken_note in daemon.health().notes
    assert broken_note in daemon.log_path.read_text()

    loaded = daemon.mmctl("load", "llama3.2-3b")
    assert loaded.returncode == 0, loaded.stderr
    answer = daemon.mmctl("infer", "llama3.2-3b", "hello", "--max-tokens", "3", "--json")
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["completion_tokens"] == 3
    assert listed(daemon)["llama3.2-3b"]["state"] == "ready"

    # A model pulled while the daemon runs: a reload rescans, the loaded one stays loaded.
    ollama_model(home / ".ollama" / "models", "qwen", "latest", 4)
    (home / "models" / "broken.gguf").unlink()
    reloaded = daemon.mmctl("reload", "--json")
    assert reloaded.returncode == 0, reloaded.stderr
    assert json.loads(reloaded.stdout)["added"] == ["qwen"]
    models = listed(daemon)
    assert models["qwen"]["source"] == "ollama:qwen:latest"
    assert models["llama3.2-3b"]["state"] == "ready"
    assert daemon.mmctl("models").stderr == b""  # the broken file is gone, so is its note
    assert not [note for note in daemon.health().notes if "broken.gguf" in note]


def test_a_models_table_overrides_a_discovered_model(make_daemon: Any, home: Path) -> None:
    blob = next(
        p for p in (home / ".ollama" / "models" / "blobs").iterdir() if p.stat().st_size > 1000
    )
    daemon: Daemon = make_daemon(
        f"""
        [models."llama3.2-3b"]
        path = "{blob}"
        ctx = 256
        priority = 0
        """,
        daemon_extra='model_stores = ["ollama"]\n',
        extra_env={"HOME": str(home), "OLLAMA_MODELS": str(home / ".ollama" / "models")},
    )
    models = listed(daemon)
    assert list(models) == ["llama3.2-3b"]
    assert models["llama3.2-3b"]["source"] == "config"
    assert models["llama3.2-3b"]["ctx"] == 256
    assert models["llama3.2-3b"]["pinned"]


def test_check_config_reports_what_discovery_finds(make_daemon: Any, home: Path) -> None:
    daemon = start(make_daemon, home, serve=False)
    daemon.write_config()
    env = {k: v for k, v in daemon.env().items() if k != "MMD_SOCKET"}
    result = subprocess.run(
        [sys.executable, "-m", "mmd", "--check-config", str(daemon.config_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "ok (3 models: 0 from the config, 3 discovered)" in lines[0]
    assert f"  llama3.2-3b: ollama:llama3.2:3b {home / '.ollama' / 'models' / 'blobs'}" in (
        "\n".join(lines)
    )
    assert f"  note: {home / 'models' / 'broken.gguf'}: skipped: not a GGUF file" in lines
    assert not daemon.socket.exists()  # checked, nothing started or created
