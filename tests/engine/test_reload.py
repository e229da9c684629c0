"""Config reload: the pure diff and scheduler transitions, then SIGHUP and `mmctl reload` on
a real daemon with real children."""

from __future__ import annotations

import json
import signal
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from conftest import Daemon, wait_until

from mmd.config.settings import Config, DaemonSettings
from mmd.core.effects import Admit, Fail, Kind, StartLoad, Stop
from mmd.core.errors import FailedPrecondition
from mmd.core.footprint import Footprint
from mmd.core.model_state import State
from mmd.core.planner import DeviceBudget
from mmd.core.scheduler import Scheduler
from mmd.core.spec import ModelSpec, SchedulerSettings
from mmd.core.units import GIB
from mmd.engine.reload import diff_configs, keep_restart_settings
from mmd.v1 import mmd_pb2 as pb

# --- the pure parts -----------------------------------------------------------------------


def spec(model_id: str, **settings: Any) -> ModelSpec:
    return ModelSpec(id=model_id, path=Path(f"{model_id}.gguf"), **settings)


def footprint(size_gib: float) -> Footprint:
    size = int(size_gib * GIB)
    return Footprint((), 0, size, size, 0, 0)


def config(*specs: ModelSpec, **sections: Any) -> Config:
    return Config(source=Path("mmd.toml"), models={s.id: s for s in specs}, **sections)


def test_diff_names_added_removed_changed_and_restart_settings() -> None:
    old = config(spec("a"), spec("b"), spec("c", ctx=512))
    new = config(
        spec("b"),
        spec("c", ctx=1024),
        spec("d"),
        daemon=DaemonSettings(socket=Path("/elsewhere.sock"), drain_timeout=5.0),
        scheduler=SchedulerSettings(max_concurrent=2),
    )
    diff = diff_configs(old, new)
    assert diff.added == ("d",)
    assert diff.removed == ("a",)
    assert diff.changed == ("c",)
    assert set(diff.applied) == {"daemon.drain_timeout", "scheduler.max_concurrent"}
    assert diff.restart_needed == ("daemon.socket",)
    assert "daemon.socket (needs a restart)" in diff.changed_entries()
    assert diff_configs(old, old).summary() == "no changes"


def test_a_model_file_that_reads_differently_counts_as_changed() -> None:
    old = config(spec("a"))
    diff = diff_configs(old, old, {"a": footprint(1)}, {"a": footprint(2)})
    assert diff.changed == ("a",)


def test_settings_bound_at_start_keep_their_old_value() -> None:
    old = config(daemon=DaemonSettings(socket=Path("/old.sock"), stop_grace=1.0))
    new = config(daemon=DaemonSettings(socket=Path("/new.sock"), stop_grace=2.0))
    kept = keep_restart_settings(old, new)
    assert kept.daemon.socket == Path("/old.sock")
    assert kept.daemon.stop_grace == 2.0


def scheduler(*specs: ModelSpec) -> Scheduler:
    core = Scheduler(SchedulerSettings(), {s.id: (s, footprint(1)) for s in specs})
    core.update_devices([DeviceBudget("ram", "ram", 10 * GIB)], frozenset())
    return core


def ready(core: Scheduler, model_id: str, now: float = 0.0) -> None:
    _, effects = core.submit(model_id, Kind.LOAD, now)
    assert any(isinstance(e, StartLoad) for e in effects)
    core.load_done(model_id, now)


def test_removing_a_busy_model_refuses_queued_lets_running_finish_then_stops() -> None:
    core = scheduler(spec("a"))
    ready(core, "a")
    running, effects = core.submit("a", Kind.INFER, 1.0)
    assert Admit(running) in effects
    queued, effects = core.submit("a", Kind.INFER, 1.0)
    assert Admit(queued) not in effects
    effects = core.remove_model("a", 2.0)
    [failed] = [e for e in effects if isinstance(e, Fail)]
    assert failed.ticket == queued
    assert isinstance(failed.error, FailedPrecondition)
    assert "removed from the config" in failed.error.message
    assert not any(isinstance(e, Stop) for e in effects)
    with pytest.raises(FailedPrecondition):
        core.submit("a", Kind.INFER, 2.5)
    assert Stop("a", "unload") in core.request_done(running, 3.0)
    assert core.forget_removed() == []  # still stopping
    core.stopped("a", 4.0)
    assert core.forget_removed() == ["a"]
    assert "a" not in core.models


def test_removing_an_idle_or_unloaded_model() -> None:
    core = scheduler(spec("idle"), spec("never"))
    ready(core, "idle")
    assert Stop("idle", "removed from the config") in core.remove_model("idle", 1.0)
    assert core.remove_model("never", 1.0) == []
    assert "never" not in core.models
    core.stopped("idle", 2.0)
    assert core.forget_removed() == ["idle"]


def test_a_changed_spec_applies_at_the_next_load() -> None:
    core = scheduler(spec("a", ctx=512))
    ready(core, "a")
    core.update_spec(spec("a", ctx=1024), footprint(2))
    assert core.models["a"].spec.ctx == 512  # the running child keeps its settings
    core.unload("a", 1.0, force=False)
    core.stopped("a", 2.0)
    assert core.models["a"].spec.ctx == 512
    _, effects = core.submit("a", Kind.LOAD, 3.0)
    assert core.models["a"].spec.ctx == 1024
    assert core.models["a"].footprint == footprint(2)
    [start] = [e for e in effects if isinstance(e, StartLoad)]
    assert start.placement.usage["ram"] == 2 * GIB


def test_added_model_and_new_settings_admit_at_once() -> None:
    core = scheduler(spec("a", parallel=4))
    core.update_settings(replace(core.settings, max_concurrent=1), 0.0)
    ready(core, "a")
    core.submit("a", Kind.INFER, 1.0)
    second, effects = core.submit("a", Kind.INFER, 1.0)
    assert Admit(second) not in effects
    assert Admit(second) in core.update_settings(replace(core.settings, max_concurrent=2), 2.0)
    core.add_model(spec("b"), footprint(1))
    assert core.models["b"].state == State.UNLOADED


# --- a real daemon --------------------------------------------------------------------------


def models_of(daemon: Daemon) -> dict[str, pb.Model]:
    return {m.id: m for m in daemon.stub.ListModels(pb.ListModelsRequest()).models}


def rewrite(daemon: Daemon, text: str) -> None:
    daemon.config_text = text
    daemon.write_config()


def infer_tokens(daemon: Daemon, model_id: str, tokens: int = 2) -> int:
    chunks = list(
        daemon.stub.Infer(pb.InferRequest(model_id=model_id, prompt="x", max_tokens=tokens))
    )
    return chunks[-1].done.completion_tokens


def sighup(daemon: Daemon) -> None:
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)


def tiny(path: Path, model_id: str = "tiny", **settings: str) -> str:
    extra = "\n".join(f"{k} = {v}" for k, v in settings.items())
    return f'\n[models.{model_id}]\npath = "{path}"\nctx = 512\n{extra}\n'


def test_add_via_sighup_and_mmctl_reload(make_daemon: Any, model_files: dict[str, Path]) -> None:
    daemon: Daemon = make_daemon(tiny(model_files["tiny"]))
    rewrite(daemon, tiny(model_files["tiny"]) + tiny(model_files["tiny2"], "tiny2"))
    sighup(daemon)
    assert wait_until(lambda: "tiny2" in models_of(daemon), timeout=10)
    assert infer_tokens(daemon, "tiny2") == 2

    text = daemon.config_text + tiny(model_files["tiny"], "third")
    rewrite(daemon, text + "\n[scheduler]\nmax_concurrent = 3\n")
    result = daemon.mmctl("reload", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["added"] == ["third"]
    assert payload["source"] == str(daemon.config_path.resolve())
    assert "scheduler.max_concurrent" in payload["changed"]
    assert daemon.stub.GetHealth(pb.GetHealthRequest()).max_concurrent == 3
    assert infer_tokens(daemon, "third") == 2
    text_out = daemon.mmctl("reload")
    assert text_out.returncode == 0, text_out.stderr
    assert b"no changes" in text_out.stdout


def test_remove_a_busy_model_drains_it(make_daemon: Any, model_files: dict[str, Path]) -> None:
    big = f'\n[models.big]\npath = "{model_files["m50"]}"\nctx = 2048\n'
    daemon: Daemon = make_daemon(big + tiny(model_files["tiny"]))
    results: dict[str, Any] = {}

    def generate(name: str, tokens: int) -> None:
        try:
            request = pb.InferRequest(model_id="big", prompt="go", max_tokens=tokens)
            chunks = []
            for chunk in daemon.stub.Infer(request):
                chunks.append(chunk)
                results.setdefault(f"{name}-started", True)
            results[name] = chunks[-1].done.completion_tokens
        except grpc.RpcError as err:
            results[name] = err

    long_run = threading.Thread(target=generate, args=("long", 1500))
    long_run.start()
    assert wait_until(lambda: "long-started" in results, timeout=30)
    queued = threading.Thread(target=generate, args=("queued", 5))
    queued.start()
    assert wait_until(lambda: models_of(daemon)["big"].queued_requests == 1, timeout=10)
    [child] = [p for p in daemon.children() if str(model_files["m50"]) in " ".join(p.cmdline())]

    rewrite(daemon, tiny(model_files["tiny"]))
    response = daemon.stub.Reload(pb.ReloadRequest())
    assert list(response.removed) == ["big"]
    queued.join(10)
    error = results["queued"]
    assert isinstance(error, grpc.RpcError)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "removed from the config" in (error.details() or "")
    with pytest.raises(grpc.RpcError) as refused:
        infer_tokens(daemon, "big")
    assert refused.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)

    long_run.join(120)
    assert results["long"] == 1500  # the running request completed in full
    assert wait_until(lambda: "big" not in models_of(daemon), timeout=15)
    assert wait_until(lambda: not child.is_running() or child.status() == "zombie", timeout=5)
    assert infer_tokens(daemon, "tiny") == 2


def test_changed_ctx_applies_at_the_next_load(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(tiny(model_files["tiny"]))
    assert daemon.mmctl("load", "tiny").returncode == 0
    pid = models_of(daemon)["tiny"].pid
    assert "512" in psutil.Process(pid).cmdline()

    rewrite(daemon, tiny(model_files["tiny"]).replace("ctx = 512", "ctx = 1024"))
    result = daemon.mmctl("reload", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["changed"] == ["tiny"]
    assert models_of(daemon)["tiny"].pid == pid  # not restarted
    assert infer_tokens(daemon, "tiny") == 2

    assert daemon.mmctl("unload", "tiny").returncode == 0
    assert daemon.mmctl("load", "tiny").returncode == 0
    model = models_of(daemon)["tiny"]
    assert model.pid != pid
    argv = psutil.Process(model.pid).cmdline()
    assert argv[argv.index("--ctx-size") + 1] == "1024"
    assert model.ctx == 1024


def test_invalid_config_is_refused_and_the_old_one_stays(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(tiny(model_files["tiny"]))
    good = daemon.config_path.read_text()
    daemon.config_path.write_text(good + "\n[models.broken]\npath = 42\n")

    with pytest.raises(grpc.RpcError) as err:
        daemon.stub.Reload(pb.ReloadRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "models.broken.path" in (err.value.details() or "")

    result = daemon.mmctl("reload")
    assert result.returncode == 2
    assert result.stderr.decode().count("\n") == 1
    assert b"models.broken.path" in result.stderr

    sighup(daemon)
    assert wait_until(lambda: "reload refused" in daemon.log_path.read_text(), timeout=10)
    [line] = [ln for ln in daemon.log_path.read_text().splitlines() if "reload refused" in ln]
    assert line.startswith("ERROR")
    assert "models.broken.path" in line
    assert set(models_of(daemon)) == {"tiny"}
    assert infer_tokens(daemon, "tiny") == 2

    moved = good.replace(str(daemon.socket), str(daemon.root / "other.sock"))
    daemon.config_path.write_text(moved)
    response = daemon.stub.Reload(pb.ReloadRequest())
    assert "daemon.socket (needs a restart)" in response.changed
    assert "needs a restart" in daemon.log_path.read_text()
    assert infer_tokens(daemon, "tiny") == 2  # still on the old socket
