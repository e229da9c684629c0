"""A model whose file is gone fails its load before anything is planned: no other model is
evicted for a load that cannot start."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import Daemon
from test_scheduler import failed, load, loads, make, state_of, stops

from mmd.core.effects import Kind, LoadFailed
from mmd.core.errors import RuntimeFailed
from mmd.core.model_state import State
from mmd.runtime.synthetic import write_model


def states(daemon: Daemon) -> dict[str, dict[str, Any]]:
    result = daemon.mmctl("models", "--json")
    assert result.returncode == 0, result.stderr
    return {model["id"]: model for model in json.loads(result.stdout)}


def test_loading_a_model_whose_file_is_gone_evicts_nothing(
    make_daemon: Any, model_files: dict[str, Path], tmp_path: Path
) -> None:
    gone = write_model(tmp_path / "gone.gguf", seed=7)
    # Room for one of the two (each counts 600 MiB): loading b would evict a.
    daemon: Daemon = make_daemon(
        '[budget]\nram = "1GiB"\nreserve_ram = "0"\n'
        f'[models.a]\npath = "{model_files["tiny"]}"\nctx = 256\nmemory = "600MiB"\n'
        f'[models.b]\npath = "{gone}"\nctx = 256\nmemory = "600MiB"\n'
    )
    plan = json.loads(daemon.mmctl("plan", "b", "--json").stdout)
    assert plan["feasible"]
    assert plan["evict"] == []
    assert daemon.mmctl("load", "a").returncode == 0
    plan = json.loads(daemon.mmctl("plan", "b", "--json").stdout)
    assert plan["evict"] == ["a"], plan  # the setting this test is about
    pid = states(daemon)["a"]["pid"]

    gone.unlink()
    load = daemon.mmctl("load", "b")
    assert load.returncode == 6
    stderr = load.stderr.decode()
    assert stderr.splitlines()[-1] == f"mmctl: model 'b': {gone} does not exist"
    assert "evicting" not in stderr
    after = states(daemon)
    assert (after["a"]["state"], after["a"]["pid"]) == ("ready", pid)
    assert after["b"]["state"] == "failed"
    assert str(gone) in after["b"]["last_error"]
    assert "evicted" not in daemon.log_path.read_text()


def test_the_scheduler_checks_the_file_before_planning_evictions() -> None:
    core = make({"a": 6, "b": 6}, budget=10)  # one fits at a time
    load(core, "a")
    core.file_problem = lambda spec: f"{spec.path} does not exist" if spec.id == "b" else None
    for kind in (Kind.LOAD, Kind.INFER):
        ticket, effects = core.submit("b", kind, 1.0)
        assert not stops(effects)
        assert not loads(effects)
        [(failed_ticket, error)] = failed(effects).items()
        assert failed_ticket == ticket
        assert isinstance(error, RuntimeFailed)
        assert error.message == "b.gguf does not exist"
        assert [e for e in effects if isinstance(e, LoadFailed)] == [
            LoadFailed("b", "b.gguf does not exist")
        ]
        assert (state_of(core, "a"), state_of(core, "b")) == (State.READY, State.FAILED)
        assert core.models["b"].last_error == "b.gguf does not exist"
    core.file_problem = lambda spec: None  # the file is back: b loads, a is evicted for it
    _ticket, effects = core.submit("b", Kind.LOAD, 2.0)
    assert stops(effects) == [("a", "evicted for b")]
    assert [s.model_id for s in loads(effects)] == ["b"]
