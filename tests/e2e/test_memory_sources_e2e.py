"""Memory per device from three sources, through a real daemon and real children: the
plan's figure, llama-server's own buffer sizes, the measurement; and figures learned
from measurement kept across a restart."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from conftest import Daemon, wait_until

# A CPU placement (gpu_layers = 0): the same on machines with and without a GPU.
CONFIG = """
[models.m]
path = "{path}"
ctx = 1024
gpu_layers = 0
"""


def ps(daemon: Daemon) -> dict[str, Any]:
    done = daemon.mmctl("ps", "--json")
    assert done.returncode == 0, done.stderr
    (model,) = json.loads(done.stdout)
    return dict(model)


def ram_memory(model: dict[str, Any]) -> dict[str, Any]:
    by_device = {m["device"]: m for m in model["memory"]}
    return dict(by_device["ram"])


def load_and_measure(daemon: Daemon) -> dict[str, Any]:
    done = daemon.mmctl("load", "m")
    assert done.returncode == 0, done.stderr
    assert wait_until(lambda: ram_memory(ps(daemon))["measured_bytes"] > 0, timeout=15)
    assert wait_until(lambda: ram_memory(ps(daemon))["runtime_bytes"] > 0, timeout=15)
    return ps(daemon)


def test_ps_shows_estimated_runtime_and_measured_bytes(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(CONFIG.format(path=model_files["m40"]))
    model = load_and_measure(daemon)

    memory = ram_memory(model)
    (share,) = model["placement"]["shares"]
    assert memory["estimated_bytes"] == share["bytes"] == model["estimated_bytes"]
    assert memory["estimate_source"] == share["source"] == "estimated"
    # llama-server's buffers (weights, KV cache, compute) are part of what the process
    # holds; the process holds more (code, heap, tokenizer).
    assert 0 < memory["runtime_bytes"] < memory["measured_bytes"]
    log = (daemon.root / "logs" / "m.log").read_text()
    assert "CPU_Mapped model buffer size" in log
    # A CPU placement starts without any GPU backend: no GPU device reports anything.
    assert all(m["device"] == "ram" for m in model["memory"])
    (child,) = daemon.children()
    cmdline = " ".join(child.cmdline())
    assert "--device none" in cmdline
    assert "--verbosity 4" in cmdline


def test_a_measured_footprint_is_learned_across_a_restart(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(CONFIG.format(path=model_files["m40"]))
    before = json.loads(daemon.mmctl("plan", "m", "--json").stdout)
    assert [s["source"] for s in before["placement"]["shares"]] == ["estimated"]
    load_and_measure(daemon)
    assert daemon.stop() == 0

    store = daemon.root / "state" / "footprints.json"
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    (entry,) = json.loads(store.read_text())["footprints"]
    assert entry["path"] == str(model_files["m40"].resolve())
    assert (entry["ctx"], entry["parallel"], entry["gpu_layers"]) == (1024, 1, 0)
    assert entry["ram_bytes"] > 0

    daemon.start()
    done = daemon.mmctl("plan", "m", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    (share,) = plan["placement"]["shares"]
    assert share == {"device": "ram", "bytes": entry["ram_bytes"], "layers": 0, "source": "learned"}
    text = daemon.mmctl("plan", "m").stdout.decode()
    assert "measured on an earlier load" in text

    # Loaded again, the model is placed with the learned figure.
    assert daemon.mmctl("load", "m").returncode == 0
    memory = ram_memory(ps(daemon))
    assert memory["estimate_source"] == "learned"
    assert memory["estimated_bytes"] == entry["ram_bytes"]
