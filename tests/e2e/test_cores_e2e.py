"""The CPU budget with real children: the threads, the pinning and the affinity mmd gives each
llama-server, read back from the processes themselves, and the re-placement of a loaded model
when a second one needs cores."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import Daemon, wait_until
from watching import Watcher, is_subsequence, summary

from mmd.core.cores import parse_cpu_list
from mmd.v1 import mmd_pb2 as pb

pytestmark = pytest.mark.skipif(
    not {0, 1} <= os.sched_getaffinity(0), reason="needs CPUs 0 and 1 in this process's affinity"
)


def config(models: dict[str, Path]) -> str:
    return f"""
    [budget]
    cpus = "0-1"

    [models.a]
    path = "{models["tiny"]}"
    ctx = 256

    [models.b]
    path = "{models["tiny2"]}"
    ctx = 256

    [models.c]
    path = "{models["m40"]}"
    ctx = 256

    [models.own]
    path = "{models["embed"]}"
    ctx = 256
    args = ["--threads", "1"]
    """


def ps(daemon: Daemon) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in json.loads(daemon.mmctl("ps", "--json").stdout)}


def child(daemon: Daemon, model_id: str) -> tuple[int, list[str], str]:
    """(pid, argv, Cpus_allowed_list) of a model's llama-server, from /proc."""
    pid = ps(daemon)[model_id]["pid"]
    argv = psutil.Process(pid).cmdline()
    status = Path(f"/proc/{pid}/status").read_text()
    allowed = next(
        ln.split(":", 1)[1].strip()
        for ln in status.splitlines()
        if ln.startswith("Cpus_allowed_list")
    )
    return pid, argv, allowed


def seen(watcher: Watcher) -> list[tuple[Any, ...]]:
    return [summary(event) for event in list(watcher.events)]


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def answers(daemon: Daemon, model_id: str) -> None:
    request = pb.InferRequest(model_id=model_id, prompt="go", max_tokens=3)
    chunks = list(daemon.stub.Infer(request, timeout=60))
    assert chunks[-1].done.completion_tokens == 3


def test_children_get_their_own_cores_and_a_second_model_re_places_the_first(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(config(model_files))
    health = json.loads(daemon.mmctl("health", "--json").stdout)
    assert health["cpu"] == {"cpus": [0, 1], "source": "config, 2 cores"}
    assert "CPU: 0-1 (config, 2 cores)" in daemon.mmctl("health").stdout.decode()

    # Alone, a model computes on every core of the budget.
    assert daemon.mmctl("load", "a").returncode == 0
    first_pid, argv, allowed = child(daemon, "a")
    assert (flag(argv, "--threads"), flag(argv, "--threads-batch")) == ("2", "2")
    assert (flag(argv, "--cpu-mask"), flag(argv, "--cpu-strict")) == ("3", "1")
    assert allowed == "0-1"
    assert ps(daemon)["a"]["cores"] == {
        "cpus": [0, 1],
        "threads": 2,
        "shared_with": [],
        "reason": "2 of 2 cores: the only model on the CPU",
    }

    # A second one would halve it: plan says so, then the load does it.
    plan = json.loads(daemon.mmctl("plan", "b", "--json").stdout)
    assert plan["cores"]["cpus"] == [0]
    assert plan["replace"] == ["a"]
    assert "re-places:  a (restarted on fewer cores)" in daemon.mmctl("plan", "b").stdout.decode()
    watcher = Watcher(daemon)
    assert daemon.mmctl("load", "b").returncode == 0
    assert wait_until(lambda: ("model", "a", "MODEL_STATE_READY", "load", "") in seen(watcher))
    watcher.close()
    assert is_subsequence(
        [
            ("model", "a", "MODEL_STATE_UNLOADING", "re-placed", "b"),
            ("model", "a", "MODEL_STATE_UNLOADED", "re-placed", "b"),
            ("model", "a", "MODEL_STATE_READY", "load", ""),
        ],
        seen(watcher),
    )
    models = ps(daemon)
    assert models["a"]["state"] == "ready"
    assert models["a"]["pid"] != first_pid
    _, argv_a, allowed_a = child(daemon, "a")
    _, argv_b, allowed_b = child(daemon, "b")
    assert (flag(argv_b, "--threads"), flag(argv_b, "--cpu-mask"), allowed_b) == ("1", "1", "0")
    assert (flag(argv_a, "--threads"), flag(argv_a, "--cpu-mask"), allowed_a) == ("1", "2", "1")
    assert models["a"]["cores"]["reason"] == "1 of 2 cores: the CPU is split with b"
    answers(daemon, "a")
    answers(daemon, "b")

    # A third shares the least used core, on one thread; nobody is restarted for it.
    pids = {m: ps(daemon)[m]["pid"] for m in ("a", "b")}
    assert daemon.mmctl("load", "c").returncode == 0
    assert {m: ps(daemon)[m]["pid"] for m in ("a", "b")} == pids
    _, argv_c, allowed_c = child(daemon, "c")
    assert (flag(argv_c, "--threads"), allowed_c) == ("1", "0")
    assert ps(daemon)["c"]["cores"]["shared_with"] == ["b"]
    answers(daemon, "c")
    log = daemon.log_path.read_text()
    assert "b: re-placing a on fewer cores" in log


def test_a_model_whose_args_set_threads_is_left_to_them(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(config(model_files))
    assert daemon.mmctl("load", "own").returncode == 0
    _, argv, allowed = child(daemon, "own")
    assert flag(argv, "--threads") == "1"
    assert "--cpu-mask" not in argv
    assert "--threads-batch" not in argv
    # No affinity of mmd's: the child may run wherever mmd may.
    assert parse_cpu_list(allowed) == tuple(sorted(os.sched_getaffinity(0)))
    cores = ps(daemon)["own"]["cores"]
    assert cores["cpus"] == []
    assert cores["reason"] == "threads and cores set by its args"
    assert "args" in daemon.mmctl("ps").stdout.decode().splitlines()[1].split("\t")
    # It holds no cores of the budget: the next model gets them all, and nobody is re-placed.
    assert daemon.mmctl("load", "a").returncode == 0
    assert ps(daemon)["a"]["cores"]["cpus"] == [0, 1]
