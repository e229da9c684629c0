"""`mmctl doctor`'s checks: llama-server, GPUs, config, model files, socket, daemon, and
the HTTP front door.

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
from typing import Any, Literal

import httpx
import typer

from mmctl import quick, tables
from mmctl.client import MmdClient
from mmctl.errors import CliError
from mmctl.sockets import check_runtime_dir, locate_socket, permission_message
from mmd.api import protojson
from mmd.config.http import Listen, parse_listen_address, read_keys_file
from mmd.config.settings import Config, check_model_file, find_config, load_config
from mmd.core.budget import BudgetSettings, DeviceBudgetView, compute_budgets, configured_cap
from mmd.core.errors import ConfigError, MmdError
from mmd.core.planner import DeviceBudget, Plan, plan_load
from mmd.core.spec import ModelSpec
from mmd.core.units import format_size
from mmd.host import paths
from mmd.host.cpu_topology import read_cpu_budget
from mmd.host.memory import MemoryProbe
from mmd.runtime.cpu import BUILD_HINT
from mmd.runtime.server import llama_server_candidates
from mmd.v1 import mmd_pb2

Status = Literal["ok", "warn", "fail"]

_HEALTH_TIMEOUT_S = 5.0
# Says where the HTTP listeners come from: they start with the daemon.
_HTTP_RESTART_HINT = (
    "the HTTP listeners start with the daemon (a reload does not move them): restart mmd "
    "('systemctl restart mmd'), and see 'journalctl -u mmd' if it still does not listen"
)


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
    from mmd.runtime.check import VerdictCache, choose

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


def _check_cpus(config: Config | None) -> Check:
    """The cores children would compute on, as the daemon reads them at start."""
    budget = read_cpu_budget(config.budget.cpus if config else "auto")
    return Check("cores", "ok", f"{tables.cpu_list_text(budget.cpus)} ({budget.source})")


def _raw_config(source: Path) -> dict[str, Any]:
    """The config file's tables as TOML gives them, unchecked; {} when it cannot be read."""
    try:
        return tomllib.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}


def _lenient_specs(source: Path) -> dict[str, ModelSpec | str]:
    """Each [models.<id>] as a spec, or the reason it is broken, even when the config as a
    whole is invalid: every bad model is named, not just the first."""
    models = _raw_config(source).get("models")
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
    from mmd.runtime.gguf import footprint_for

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


def _check_socket(socket: Path) -> tuple[list[Check], mmd_pb2.Health | None]:
    """The socket's checks and the daemon's; the daemon's Health when it answered."""
    try:
        check_runtime_dir(socket)
    except CliError as err:
        hint = f"remove {socket.parent} (mmd makes it anew, for you alone)"
        return [Check("socket", "fail", err.message, hint)], None
    try:
        info = socket.stat()
        dir_mode = stat.S_IMODE(socket.parent.stat().st_mode)
    except (FileNotFoundError, NotADirectoryError):
        hint = "start the daemon ('systemctl start mmd' or 'mmd'), or pass --socket"
        return [
            Check("socket", "fail", f"{socket} does not exist", hint),
            Check("daemon", "fail", "not reachable: no socket", hint),
        ], None
    except OSError as err:  # a directory on the way is closed to us
        detail = permission_message(socket) if isinstance(err, PermissionError) else str(err)
        return [
            Check("socket", "fail", detail, _GROUP_HINT),
            Check("daemon", "fail", "not reachable: no access to the socket", _GROUP_HINT),
        ], None
    if not stat.S_ISSOCK(info.st_mode):
        hint = "remove it; restart mmd"
        return [Check("socket", "fail", f"{socket} is not a socket", hint)], None
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
        return checks, None
    daemon, health = _check_daemon(socket)
    if health is None:
        return [*checks, daemon], None
    return [*checks, daemon, _check_quick(socket)], health


def _check_quick(socket: Path) -> Check:
    """The JSON Lines socket that mmctl's quick commands use (mmctl.quick)."""
    path = paths.json_socket(socket)
    why = quick.probe(socket, _HEALTH_TIMEOUT_S)
    if why is None:
        detail = f"{path} answers (mmctl ps, infer, models --json, health --json)"
        return Check("quick commands", "ok", detail)
    detail = f"{path}: {why}; the quick commands use gRPC instead, ~3x slower to start"
    hint = "restart mmd; its log says why it serves without that socket"
    return Check("quick commands", "warn", detail, hint)


def _check_daemon(socket: Path) -> tuple[Check, mmd_pb2.Health | None]:
    try:
        with MmdClient(socket, query_timeout=_HEALTH_TIMEOUT_S) as client:
            health = client.get_health()
            registry = client.list_models()
    except CliError as err:
        hint = "check 'systemctl status mmd' and 'journalctl -u mmd'; a stale socket: restart mmd"
        return Check("daemon", "fail", f"not reachable: {err.message}", hint), None
    states = [protojson.state_name(model.state) for model in health.models]
    counts = [f"{len(registry)} models, {states.count('ready')} loaded"]
    counts += [f"{states.count(s)} {s}" for s in ("loading", "unloading", "failed") if s in states]
    detail = (
        f"mmd {health.version}, up {tables.format_duration(health.uptime_seconds)}, "
        f"{', '.join(counts)}, {health.active_inferences} requests running"
    )
    failed = [model.id for model in health.models if protojson.state_name(model.state) == "failed"]
    if failed:
        hint = f"see why with 'mmctl ps' and 'mmctl logs {failed[0]}'"
        return Check("daemon", "warn", detail, hint), health
    return Check("daemon", "ok", detail), health


# ---------------------------------------------------------------------------
# The HTTP front door ([http])


@dataclass
class HttpConfig:
    """What the config says of [http]: each listen address as written, parsed or the reason
    it does not parse; the keys a client may send; the keys file, when one is named."""

    listen: list[tuple[str, Listen | str]]
    keys: list[str]
    keys_file: Path | None = None


def http_config(config: Config | None, source: Path | None) -> HttpConfig:
    """From the loaded config; from the file's raw [http] table when it did not load (each
    address is still checked on its own)."""
    if config is not None:
        settings = config.http
        parsed: list[tuple[str, Listen | str]] = [(a.text, a) for a in settings.listen]
        return HttpConfig(parsed, list(settings.api_keys), settings.api_keys_file)
    table = _raw_config(source).get("http") if source is not None else None
    if not isinstance(table, dict):
        return HttpConfig([], [])
    value = table.get("listen", [])
    items = value if isinstance(value, list) else [value]
    listen: list[tuple[str, Listen | str]] = []
    for item in items:
        try:
            if isinstance(item, bool) or not isinstance(item, str | int):
                raise ValueError(f"expected an address string, got {item!r}")
            listen.append((str(item), parse_listen_address(str(item))))
        except ValueError as err:
            listen.append((str(item), str(err)))
    keys = table.get("api_keys")
    keys_list = [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []
    keys_file = table.get("api_keys_file")
    file = Path(keys_file).expanduser() if isinstance(keys_file, str) and keys_file else None
    return HttpConfig(listen, keys_list, file)


def listen_text(address: Listen) -> str:
    """The address as the daemon reports it in Health.http_listen."""
    if address.path is not None:
        return f"unix:{address.path}"
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"http://{host}:{address.port}"


def _served_as(address: Listen, served: list[str], claimed: set[str]) -> str | None:
    """The daemon's address for ``address``: the same text, or for port 0 (a free port
    chosen at start) a TCP address on the same host that no other configured one names."""
    text = listen_text(address)
    if address.path is not None or address.port != 0:
        return text if text in served else None
    prefix = text.removesuffix(":0") + ":"
    return next((s for s in served if s.startswith(prefix) and s not in claimed), None)


def _check_keys_file(path: Path) -> tuple[Check, list[str]]:
    name = "http api_keys_file"
    if not os.access(path, os.R_OK) and path.exists():
        detail = f"{path}: not readable by you (the daemon reads it as its own user); not checked"
        return Check(name, "ok", detail), []
    try:
        keys = read_keys_file(path)
    except ValueError as err:
        hint = "the daemon refuses to start with it: fix the file (one key a line, chmod o-r)"
        return Check(name, "fail", str(err), hint), []
    count = f"{len(keys)} key" + ("" if len(keys) == 1 else "s")
    return Check(name, "ok", f"{path}: {count}"), list(keys)


def probe_health(served: str, key: str | None, timeout: float = _HEALTH_TIMEOUT_S) -> int:
    """GET /health at an address as the daemon reports it ("http://HOST:PORT" or
    "unix:/PATH"): the HTTP status; httpx.HTTPError when nothing answers."""
    transport: httpx.HTTPTransport | None = None
    if served.startswith("unix:"):
        transport = httpx.HTTPTransport(uds=served.removeprefix("unix:"))
        url = "http://localhost/health"
    else:
        # A wildcard address is reached on this machine through loopback.
        url = served.replace("//0.0.0.0:", "//127.0.0.1:").replace("//[::]:", "//[::1]:")
        url += "/health"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(transport=transport, timeout=timeout, trust_env=False) as client:
        return client.get(url, headers=headers).status_code


def _probe_check(name: str, served: str, key: str | None) -> Check:
    try:
        status = probe_health(served, key)
    except (httpx.HTTPError, httpx.InvalidURL) as err:
        detail = f"nothing answers at {served}: {str(err) or type(err).__name__}"
        return Check(name, "fail", detail, _HTTP_RESTART_HINT)
    if status == 200:
        return Check(name, "ok", f"{served}: GET /health answers")
    if status == 401 and not key:
        detail = f"{served}: answers; needs an API key (none readable here to check /health)"
        return Check(name, "ok", detail)
    if status == 401:
        hint = "the daemon holds other keys: it reads them when it starts; restart mmd"
        return Check(name, "fail", f"{served}: the API key from the config was refused", hint)
    return Check(name, "fail", f"{served}: GET /health answered {status}", _HTTP_RESTART_HINT)


def check_http(http: HttpConfig, health: mmd_pb2.Health | None) -> list[Check]:
    """Each [http] listen address: does it parse, and, with the daemon running, does
    GET /health answer there (with a key from the config when one is readable).
    ``health``: the daemon's, None when it is not reachable."""
    served = list(health.http_listen) if health is not None else []
    if not http.listen:
        if not served:
            return [Check("http", "ok", "off (no [http] listen)")]
        # No [http] here, but the daemon serves from its own config.
        return [_probe_check(f"http {s}", s, None) for s in served]
    checks = []
    keys = list(http.keys)
    if http.keys_file is not None:
        keys_check, file_keys = _check_keys_file(http.keys_file)
        checks.append(keys_check)
        keys += file_keys
    key = keys[0] if keys else None
    # The addresses with a port of their own are theirs; port 0 takes one of the others.
    claimed = {
        listen_text(a) for _, a in http.listen if isinstance(a, Listen) and (a.path or a.port)
    }
    for text, address in http.listen:
        name = f"http {text}"
        if isinstance(address, str):
            hint = "write HOST:PORT, a port number (loopback) or unix:/absolute/path"
            checks.append(Check(name, "fail", address, hint))
            continue
        if health is None:
            detail = f"{listen_text(address)}; not probed: the daemon is not running"
            checks.append(Check(name, "ok", detail))
            continue
        found = _served_as(address, served, claimed)
        if found is None:
            where = ", ".join(served) or "no HTTP address"
            detail = f"the daemon does not listen on {listen_text(address)} (it has {where})"
            checks.append(Check(name, "fail", detail, _HTTP_RESTART_HINT))
            continue
        claimed.add(found)  # for the next port 0 on this host
        checks.append(_probe_check(name, found, key))
    return checks


def run_checks(config: Path | None, socket: Path | None) -> list[Check]:
    """Every check, in order. ``socket`` is the one given to mmctl, if any."""
    config_check, loaded = _check_config(config)
    checks = _check_llama_server(loaded)
    with MemoryProbe() as probe:
        checks.append(_check_gpus(probe))
        checks.append(config_check)
        checks.append(_check_cpus(loaded))
        checks += _check_models(loaded, config, probe)
    if socket is None and loaded is not None and loaded.source is not None:
        socket = loaded.daemon.socket  # what the daemon binds (it honours $MMD_SOCKET too)
    elif socket is None:
        candidates = paths.socket_candidates()  # as the other commands find it
        socket = locate_socket(candidates) or candidates[0]
    socket_checks, health = _check_socket(socket.absolute())
    daemon = next((c for c in socket_checks if c.name == "daemon"), None)
    if loaded is not None and loaded.source is None and daemon and daemon.status != "fail":
        # No config here, but a daemon serves from its own (another user's, or one it was
        # started with): that is no empty registry.
        config_check.status = "ok"
        config_check.detail = (
            f"none found here; the daemon at {socket.absolute()} serves from its own config"
        )
        config_check.hint = ""
    http = http_config(loaded, find_config(config))
    return checks + socket_checks + check_http(http, health)


def as_json(checks: list[Check]) -> dict[str, object]:
    failed = any(c.status == "fail" for c in checks)
    return {"ok": not failed, "checks": [asdict(c) for c in checks]}


def print_checks(checks: list[Check]) -> None:
    width = max(len(c.name) for c in checks)
    for check in checks:
        typer.echo(f"{check.status:<4}  {check.name:<{width}}  {check.detail}")
        if check.hint and check.status != "ok":
            typer.echo(f"{'':<4}  {'':<{width}}  hint: {check.hint}")
