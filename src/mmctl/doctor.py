"""`mmctl doctor`'s checks: llama-server, GPUs, config, model files, socket, daemon.

Imported only when `mmctl doctor` runs: it needs most of mmd (config, footprints,
memory probes, the planner), which the other commands do not.
"""

from __future__ import annotations

import asyncio
import os
import stat
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import grpc
import typer

from mmctl import render
from mmctl.client import CliError, check_runtime_dir, locate_socket, permission_message
from mmd import paths, protojson
from mmd.budget import BudgetSettings, DeviceBudgetView, compute_budgets, configured_cap
from mmd.config import Config, ModelSpec, check_model_file, find_config, load_config
from mmd.cpu import BUILD_HINT
from mmd.errors import ConfigError, MmdError
from mmd.memory import MemoryProbe
from mmd.planner import DeviceBudget, Plan, plan_load
from mmd.runtime import llama_server_candidates
from mmd.units import format_size
from mmd.v1 import mmd_pb2

Status = Literal["ok", "warn", "fail"]

_HEALTH_TIMEOUT_S = 5.0


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    hint: str = ""


def _check_config(explicit: Path | None) -> tuple[Check, Config | None]:
    source = find_config(explicit)
    try:
        config = load_config(explicit)
    except ConfigError as err:
        hint = "fix the file; 'mmd --check-config PATH' validates it"
        return Check("config", "fail", str(err), hint), None
    if source is None:
        hint = "write /etc/mmd/mmd.toml (see systemd/mmd.toml.example) or pass --config"
        return Check("config", "warn", "no config file found: an empty registry", hint), config
    return Check("config", "ok", f"{config.source}: {len(config.models)} models"), config


def _check_llama_server(config: Config | None) -> list[Check]:
    """The binary the daemon would use, proven the way the daemon proves it (same cache)."""
    from mmd.runtime_check import VerdictCache, choose

    configured = config.daemon.llama_server if config else None
    try:
        candidates, explicit = llama_server_candidates(configured)
    except MmdError as err:
        hint = "pip install 'mmd[llama]', or set daemon.llama_server / $MMD_LLAMA_SERVER"
        return [Check("llama-server", "fail", err.message, hint)]
    cache = VerdictCache(config.daemon.state_dir if config else paths.default_state_dir())
    choice = asyncio.run(choose(candidates, cache))
    skipped = list(choice.rejected)
    if choice.binary is not None and choice.verdict is not None:
        found = f"{choice.binary.path} ({choice.binary.source})"
        if skipped:
            found += f"; skipped {'; '.join(skipped)}"
        return [
            Check("llama-server", "warn" if skipped else "ok", found, _BROKEN_BINARY_HINT),
            Check("llama-server starts", "ok", choice.verdict.detail or "loads and runs a model"),
        ]
    where = ", ".join(f"{c.path} ({c.source})" for c in candidates)
    hint = BUILD_HINT if any("illegal instruction" in s for s in skipped) else _BROKEN_BINARY_HINT
    checks = [Check("llama-server", "ok" if explicit else "fail", where, hint)]
    return [*checks, Check("llama-server starts", "fail", "; ".join(skipped), hint)]


_BROKEN_BINARY_HINT = (
    "run it by hand to see why (missing shared libraries, wrong architecture); "
    "reinstall it or point daemon.llama_server at a working build"
)


def _check_gpus(probe: MemoryProbe) -> Check:
    snapshot = probe.read()
    gpus = [d for d in snapshot.devices if d.kind == "gpu"]
    if not gpus:
        notes = "; ".join(snapshot.notes) or "no GPU"
        hint = "expected on a machine without an NVIDIA GPU; else install the NVIDIA driver"
        return Check("nvml", "warn", notes, hint)
    listed = ", ".join(f"{d.id} {d.name} {format_size(d.total)}" for d in gpus)
    return Check("nvml", "ok", listed)


def _lenient_specs(source: Path) -> dict[str, ModelSpec | str]:
    """Each [models.<id>] as a spec, or the reason it is broken, even when the config as a
    whole is invalid: every bad model is named, not just the first."""
    try:
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}
    models = raw.get("models")
    found: dict[str, ModelSpec | str] = {}
    for model_id, table in (models if isinstance(models, dict) else {}).items():
        value = table.get("path") if isinstance(table, dict) else None
        if not isinstance(value, str) or not value:
            found[model_id] = f"models.{model_id}.path: missing"
            continue
        path = Path(value).expanduser()
        path = path if path.is_absolute() else source.parent / path
        try:
            check_model_file(path, f"models.{model_id}.path")
        except ConfigError as err:
            found[model_id] = str(err)
            continue
        ctx, parallel = table.get("ctx", 4096), table.get("parallel", 1)
        found[model_id] = ModelSpec(
            id=model_id,
            path=path,
            ctx=ctx if type(ctx) is int and ctx > 0 else 4096,
            parallel=parallel if type(parallel) is int and parallel > 0 else 1,
        )
    return found


def _check_models(config: Config | None, explicit: Path | None, probe: MemoryProbe) -> list[Check]:
    from mmd.footprint import footprint_for

    source = find_config(explicit)
    specs: dict[str, ModelSpec | str]
    if config is not None:
        specs = dict(config.models)
    elif source is not None:
        specs = _lenient_specs(source)
    else:
        specs = {}
    budget = config.budget if config is not None else Config(source=None).budget
    views = compute_budgets(probe.read(), budget, {})
    devices = [v.to_planner() for v in views]
    # What [budget] allows on an otherwise empty machine: when even that is too little,
    # the setting is the cause, not what other processes hold now.
    configured = [
        DeviceBudget(d.id, d.kind, configured_cap(v.total, *budget.for_kind(v.kind)))
        for d, v in zip(devices, views, strict=True)
    ]
    caps = {v.id: v for v in views}
    checks = []
    for model_id, spec in sorted(specs.items()):
        name = f"model {model_id}"
        if isinstance(spec, str):
            hint = f"fix models.{model_id}.path or put the GGUF file there"
            checks.append(Check(name, "fail", spec, hint))
            continue
        try:
            footprint = footprint_for(spec)
        except ConfigError as err:
            checks.append(Check(name, "fail", str(err), "replace the file with a valid GGUF"))
            continue
        plan = plan_load(model_id, footprint, devices, [], gpu_layers=spec.gpu_layers)
        size = format_size(footprint.total)
        if isinstance(plan, Plan):
            detail = f"{spec.path}: ~{size}, fits ({plan.placement.kind})"
            checks.append(Check(name, "ok", detail))
            continue
        total_cap = sum(v.total for v in caps.values())
        status: Status = "fail"
        if footprint.total > total_cap:
            hint = "use a smaller quantization or a smaller ctx: it exceeds the machine"
        elif not isinstance(
            plan_load(model_id, footprint, configured, [], gpu_layers=spec.gpu_layers), Plan
        ):
            hint = f"raise [budget] ({_budget_settings(budget, views)}), or use a smaller ctx"
        else:
            status = "warn"
            hint = "other processes (or models mmd has loaded) hold the memory now"
        checks.append(Check(name, status, f"~{size}: {plan.reason}", hint))
    return checks


def _budget_settings(budget: BudgetSettings, views: list[DeviceBudgetView]) -> str:
    """The [budget] settings that bound the devices there are, as written in the config."""
    kinds = sorted({"gpu" if v.kind == "gpu" else "ram" for v in views})
    parts = []
    for kind in kinds:
        setting, reserve = budget.for_kind(kind)
        parts.append(f'{kind} = "{setting}", reserve_{kind} = {format_size(reserve)}')
    return "; ".join(parts)


_GROUP_HINT = "join the daemon's group (usermod -aG mmd $USER, then log in again) or use sudo"


def _check_socket(socket: Path) -> list[Check]:
    try:
        check_runtime_dir(socket)
    except CliError as err:
        hint = f"remove {socket.parent} (mmd makes it anew, for you alone)"
        return [Check("socket", "fail", err.message, hint)]
    try:
        info = socket.stat()
        dir_mode = stat.S_IMODE(socket.parent.stat().st_mode)
    except (FileNotFoundError, NotADirectoryError):
        hint = "start the daemon ('systemctl start mmd' or 'mmd'), or pass --socket"
        return [
            Check("socket", "fail", f"{socket} does not exist", hint),
            Check("daemon", "fail", "not reachable: no socket", hint),
        ]
    except OSError as err:  # a directory on the way is closed to us
        detail = permission_message(socket) if isinstance(err, PermissionError) else str(err)
        return [
            Check("socket", "fail", detail, _GROUP_HINT),
            Check("daemon", "fail", "not reachable: no access to the socket", _GROUP_HINT),
        ]
    if not stat.S_ISSOCK(info.st_mode):
        return [Check("socket", "fail", f"{socket} is not a socket", "remove it; restart mmd")]
    mode = stat.S_IMODE(info.st_mode)
    checks = []
    if mode & 0o007 and dir_mode & 0o001:
        detail = f"{socket} mode {mode:04o}, directory {dir_mode:04o}: anyone can use it"
        hint = f"chmod o-rwx {socket.parent} (mmd does this when it creates the directory)"
        checks.append(Check("socket", "fail", detail, hint))
    elif mode & 0o007 or dir_mode & 0o007:
        detail = f"{socket} mode {mode:04o}, directory {dir_mode:04o}"
        hint = f"chmod o-rwx {socket} {socket.parent}"
        checks.append(Check("socket", "warn", detail, hint))
    else:
        checks.append(Check("socket", "ok", f"{socket} (mode {mode:04o}, dir {dir_mode:04o})"))
    if not os.access(socket, os.R_OK | os.W_OK):
        checks.append(Check("daemon", "fail", permission_message(socket), _GROUP_HINT))
        return checks
    checks.append(_check_daemon(socket))
    return checks


def _check_daemon(socket: Path) -> Check:
    from mmd.v1 import mmd_pb2_grpc

    try:
        with grpc.insecure_channel(f"unix:{socket}") as channel:
            stub = mmd_pb2_grpc.ModelManagerStub(channel)
            health: mmd_pb2.Health = stub.GetHealth(
                mmd_pb2.GetHealthRequest(), timeout=_HEALTH_TIMEOUT_S
            )
            registry: mmd_pb2.ListModelsResponse = stub.ListModels(
                mmd_pb2.ListModelsRequest(), timeout=_HEALTH_TIMEOUT_S
            )
    except grpc.RpcError as err:
        hint = "check 'systemctl status mmd' and 'journalctl -u mmd'; a stale socket: restart mmd"
        return Check("daemon", "fail", f"not reachable: {err.details() or err.code()}", hint)
    states = [protojson.state_name(model.state) for model in health.models]
    counts = [f"{len(registry.models)} models, {states.count('ready')} loaded"]
    counts += [f"{states.count(s)} {s}" for s in ("loading", "unloading", "failed") if s in states]
    detail = (
        f"mmd {health.version}, up {render.format_duration(health.uptime_seconds)}, "
        f"{', '.join(counts)}, {health.active_inferences} requests running"
    )
    failed = [model.id for model in health.models if protojson.state_name(model.state) == "failed"]
    if failed:
        hint = f"see why with 'mmctl ps' and 'mmctl logs {failed[0]}'"
        return Check("daemon", "warn", detail, hint)
    return Check("daemon", "ok", detail)


def run_checks(config: Path | None, socket: Path | None) -> list[Check]:
    """Every check, in order. ``socket`` is the one given to mmctl, if any."""
    config_check, loaded = _check_config(config)
    checks = _check_llama_server(loaded)
    with MemoryProbe() as probe:
        checks.append(_check_gpus(probe))
        checks.append(config_check)
        checks += _check_models(loaded, config, probe)
    if socket is None and loaded is not None and loaded.source is not None:
        socket = loaded.daemon.socket  # what the daemon binds (it honours $MMD_SOCKET too)
    elif socket is None:
        candidates = paths.socket_candidates()  # as the other commands find it
        socket = locate_socket(candidates) or candidates[0]
    socket_checks = _check_socket(socket.absolute())
    daemon = next((c for c in socket_checks if c.name == "daemon"), None)
    if loaded is not None and loaded.source is None and daemon and daemon.status != "fail":
        # No config here, but a daemon serves from its own (another user's, or one it was
        # started with): that is no empty registry.
        config_check.status = "ok"
        config_check.detail = (
            f"none found here; the daemon at {socket.absolute()} serves from its own config"
        )
        config_check.hint = ""
    return checks + socket_checks


def as_json(checks: list[Check]) -> dict[str, object]:
    failed = any(c.status == "fail" for c in checks)
    return {"ok": not failed, "checks": [asdict(c) for c in checks]}


def print_checks(checks: list[Check]) -> None:
    width = max(len(c.name) for c in checks)
    for check in checks:
        typer.echo(f"{check.status:<4}  {check.name:<{width}}  {check.detail}")
        if check.hint and check.status != "ok":
            typer.echo(f"{'':<4}  {'':<{width}}  hint: {check.hint}")
