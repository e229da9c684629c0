"""The TOML config: daemon settings, memory budget, scheduler and the model registry.

Lookup order: ``--config``, ``$MMD_CONFIG``, ``$XDG_CONFIG_HOME/mmd/mmd.toml``,
``/etc/mmd/mmd.toml``. With none of them present mmd starts with an empty
registry. Every problem is reported as one ConfigError naming the file, the key
and what is wrong.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmd.config.http import (
    HTTP_KEYS,
    HttpSettings,
    http_settings,
    load_access,
    parse_host_port,
)
from mmd.core.budget import BudgetSettings, parse_budget_setting
from mmd.core.cores import parse_cpus_setting
from mmd.core.errors import ConfigError
from mmd.core.sources import STORES
from mmd.core.spec import ModelSpec, SchedulerSettings
from mmd.core.units import MIB, parse_duration, parse_keep_alive, parse_size
from mmd.host import paths
from mmd.runtime.gguf import GGUFError, is_gguf, read_shape

MAX_MODEL_ID_CHARS = 64
MODEL_ID_RE = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_MODEL_ID_CHARS - 1}}}$")

# A registry is a few KiB; anything this large is a mistake (or hostile), refused unread.
MAX_CONFIG_BYTES = MIB

# sun_path holds 108 bytes on Linux, including the terminating NUL.

# llama-server options that mmd sets itself from the plan and the registry: a model's
# ``args`` overriding them would break the placement or mmd's connection to the child.
_MMD_OWNED_FLAGS = {
    "-m": "path",
    "--model": "path",
    "--host": "(mmd's private socket)",
    "--port": "(mmd's private socket)",
    "-c": "ctx",
    "--ctx-size": "ctx",
    "-np": "parallel",
    "--parallel": "parallel",
    "-ngl": "gpu_layers",
    "--gpu-layers": "gpu_layers",
    "--n-gpu-layers": "gpu_layers",
    "-ts": "(mmd's placement)",
    "--tensor-split": "(mmd's placement)",
    "-fit": "(mmd's placement)",
    "--fit": "(mmd's placement)",
    "-a": "(the model id)",
    "--alias": "(the model id)",
    "--embedding": "embedding",
    "--embeddings": "embedding",
}


@dataclass(frozen=True)
class DaemonSettings:
    socket: Path = field(default_factory=paths.default_socket)
    llama_server: str | None = None
    state_dir: Path = field(default_factory=paths.default_state_dir)
    log_dir: Path = field(default_factory=paths.default_log_dir)
    load_timeout: float = 120.0
    stop_grace: float = 10.0
    drain_timeout: float = 30.0
    unload_timeout: float = 30.0
    max_prompt_bytes: int = MIB
    # At most one message per stream this often (the first and the last are never held):
    # fewer gRPC writes per token on fast models, which leaves the CPU to generation.
    stream_interval: float = 0.01
    # Directories scanned for *.gguf files, and the well-known stores scanned
    # (mmd.config.discovery).
    model_dirs: tuple[Path, ...] = ()
    model_stores: tuple[str, ...] = ()


@dataclass(frozen=True)
class MetricsSettings:
    # "HOST:PORT" or a bare port (loopback) for the Prometheus endpoint; None: off.
    listen: str | None = None


@dataclass(frozen=True)
class Config:
    source: Path | None
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    models: Mapping[str, ModelSpec] = field(default_factory=dict)
    # What discovery skipped and why (unreadable files, id clashes): for the log and notes.
    notes: tuple[str, ...] = ()


# --- value checkers: each returns the converted value or raises ValueError ------------


def _int(lo: int, hi: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {value}")
        return value

    return check


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _size(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise ValueError(f"size must not be negative: {value}")
    if isinstance(value, str) and value.strip().startswith("-"):
        raise ValueError(f"size must not be negative: {value!r}")
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise ValueError(f"expected a size such as '8GiB', got {value!r}")
    return parse_size(value)


def _positive_size(value: Any) -> int:
    size = _size(value)
    if size <= 0:
        raise ValueError(f"must be more than 0 bytes, got {value!r}")
    return size


def _duration(value: Any) -> float:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError(f"expected a duration such as '5m', got {value!r}")
    return parse_duration(value)


def _positive_duration(value: Any) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise ValueError(f"must be positive, got {value!r}")
    return seconds


def _non_negative_duration(value: Any) -> float:
    seconds = _duration(value)
    if seconds < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return seconds


def _keep_alive(value: Any) -> float:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError(f"expected a duration such as '5m', got {value!r}")
    return parse_keep_alive(value)


def _budget(value: Any) -> str:
    text = _str(value)
    parse_budget_setting(text)
    return text


def _percent(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {value!r}")
    if not 0 < value <= 100:
        raise ValueError(f"must be between 0 and 100, got {value}")
    return float(value)


def _gpu_layers(value: Any) -> int | None:
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f'expected "auto" or a number of layers >= 0, got {value!r}')
    return value


def _args(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    for arg in value:
        flag = arg.split("=", 1)[0]
        if flag in _MMD_OWNED_FLAGS:
            instead = _MMD_OWNED_FLAGS[flag]
            hint = f"set the model's {instead} key" if not instead.startswith("(") else instead
            raise ValueError(f"{flag} is set by mmd and cannot be overridden here: {hint}")
    return tuple(value)


def _non_empty_str(value: Any) -> str:
    text = _str(value)
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _path(value: Any) -> Path:
    return Path(_non_empty_str(value)).expanduser()


def _path_list(value: Any) -> tuple[Path, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of directories, got {value!r}")
    return tuple(_path(item) for item in value)


def _stores(value: Any) -> tuple[str, ...]:
    if value == "all":
        return STORES
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f'expected "all" or a list of store names, got {value!r}')
    for name in value:
        if name not in STORES:
            raise ValueError(f"unknown store {name!r} (known: {', '.join(STORES)})")
    return tuple(dict.fromkeys(value))  # duplicates named once


def check_socket_path(path: Path, where: str) -> None:
    """Raise ConfigError when ``path``, or the children's sockets beside it, would be too
    long to bind as a Unix socket."""
    limit = paths.MAX_SOCKET_PATH_BYTES
    size = paths.socket_path_bytes(path)
    if size > limit:
        raise ConfigError(
            f"{where}: socket path {path} is {size} bytes; a Unix socket path holds at most {limit}"
        )
    longest_child = paths.child_socket(paths.children_dir(path), "x" * MAX_MODEL_ID_CHARS)
    size = paths.socket_path_bytes(longest_child)
    if size > limit:
        raise ConfigError(
            f"{where}: socket directory {path.parent} is too long: the models' sockets in it "
            f"(such as {longest_child.name}) would be {size} bytes; a Unix socket path holds "
            f"at most {limit}"
        )


_DAEMON_KEYS: dict[str, Callable[[Any], Any]] = {
    "socket": _path,
    "llama_server": _non_empty_str,
    "state_dir": _path,
    "log_dir": _path,
    "load_timeout": _positive_duration,
    "stop_grace": _positive_duration,
    "drain_timeout": _positive_duration,
    "unload_timeout": _positive_duration,
    "max_prompt_bytes": _positive_size,
    "stream_interval": _non_negative_duration,
    "model_dirs": _path_list,
    "model_stores": _stores,
}


def _cpus(value: Any) -> str | int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f'expected "auto", a number of cores or a CPU list, got {value!r}')
    parse_cpus_setting(value)
    return value


_BUDGET_KEYS: dict[str, Callable[[Any], Any]] = {
    "gpu": _budget,
    "ram": _budget,
    "reserve_gpu": _size,
    "reserve_ram": _size,
    "alert_percent": _percent,
    "cpus": _cpus,
}


def _listen(value: Any) -> str:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else _str(value)
    parse_host_port(text)
    return text


_METRICS_KEYS: dict[str, Callable[[Any], Any]] = {"listen": _listen}
_SCHEDULER_KEYS: dict[str, Callable[[Any], Any]] = {
    "max_concurrent": _int(1, 4096),
    "max_queue": _int(0, 1_000_000),
    "min_headroom": _size,
    "autoload": _bool,
    "default_keep_alive": _keep_alive,
    "min_residency": _non_negative_duration,
    "swap_batch": _int(1, 1_000_000),
}
_MODEL_KEYS: dict[str, Callable[[Any], Any]] = {
    "path": _non_empty_str,
    "role": _str,
    "ctx": _int(64, 4_194_304),
    "parallel": _int(1, 256),
    "gpu_layers": _gpu_layers,
    "priority": _int(0, 1000),
    "keep_alive": _keep_alive,
    "embedding": _bool,
    "args": _args,
    "memory": _positive_size,
    "preload": _bool,
}


def _table(
    source: str, name: str, raw: Any, schema: Mapping[str, Callable[[Any], Any]]
) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        check = schema.get(key)
        if check is None:
            known = ", ".join(sorted(schema))
            raise ConfigError(f"{source}: {name}.{key}: unknown key (known: {known})")
        try:
            values[key] = check(value)
        except ValueError as err:
            raise ConfigError(f"{source}: {name}.{key}: {err}") from None
    return values


def _model(source: str, base_dir: Path, model_id: str, raw: Any) -> ModelSpec:
    name = f"models.{model_id}"
    if not MODEL_ID_RE.match(model_id):
        raise ConfigError(
            f"{source}: [{name}]: model id must be 1-64 letters, digits, '.', '_' or '-' "
            "and start with a letter or digit"
        )
    values = _table(source, name, raw, _MODEL_KEYS)
    if "path" not in values:
        raise ConfigError(f"{source}: {name}.path: missing (the model's GGUF file)")
    path = Path(values.pop("path")).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    where = f"{source}: {name}.path"
    check_model_file(path, where)
    try:
        shape = read_shape(path)  # the header must be readable now, not at the first request
    except GGUFError as err:
        raise ConfigError(f"{where}: {err}") from None
    gpu_layers = values.get("gpu_layers")
    if gpu_layers is not None and gpu_layers > shape.n_layers:
        # Honoured exactly or refused: every load of it would be refused.
        raise ConfigError(
            f"{source}: {name}.gpu_layers: {gpu_layers}, but {path.name} has only "
            f"{shape.n_layers} layers"
        )
    return ModelSpec(id=model_id, path=path, **values)


def check_model_file(path: Path, where: str) -> None:
    """Raise ConfigError unless ``path`` is a readable file that starts like a GGUF file."""
    if not path.exists():
        hint = " (a symlink to nowhere)" if path.is_symlink() else ""
        raise ConfigError(f"{where}: {path} does not exist{hint}")
    if path.is_dir():
        raise ConfigError(f"{where}: {path} is a directory, not a GGUF file")
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as err:
        raise ConfigError(f"{where}: {path} cannot be read: {err.strerror}") from None
    if not magic:
        raise ConfigError(f"{where}: {path} is empty, not a GGUF file")
    if not is_gguf(path):
        raise ConfigError(f"{where}: {path} is not a GGUF file")


def _parse_toml(text: str, where: str) -> dict[str, Any]:
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{where}: config is {len(text)} characters; the limit is {MAX_CONFIG_BYTES}"
        )
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        message = str(err)
        if "Cannot declare" in message or "overwrite" in message.lower():
            message += " (a duplicate model id or key?)"
        raise ConfigError(f"{where}: invalid TOML: {message}") from None
    except RecursionError:
        raise ConfigError(f"{where}: invalid TOML: values nested too deeply") from None


def _daemon_settings(where: str, base_dir: Path, raw: Any) -> DaemonSettings:
    values = _table(where, "daemon", raw, _DAEMON_KEYS)
    for key in ("socket", "state_dir", "log_dir"):
        if key in values and not values[key].is_absolute():
            values[key] = base_dir / values[key]
    if "model_dirs" in values:
        values["model_dirs"] = tuple(
            d if d.is_absolute() else base_dir / d for d in values["model_dirs"]
        )
    if "socket" in values:
        check_socket_path(values["socket"], f"{where}: daemon.socket")
    return DaemonSettings(**values)


def parse_config(text: str, source: Path | None) -> Config:
    """Parse and validate config text. ``source`` names the file in errors and anchors
    relative paths (models, socket, state and log directories)."""
    where = str(source) if source else "<config>"
    raw = _parse_toml(text, where)
    known_tables = {"daemon", "budget", "scheduler", "metrics", "http", "models"}
    for key in raw:
        if key not in known_tables:
            raise ConfigError(
                f"{where}: {key}: unknown key (known tables: {', '.join(sorted(known_tables))})"
            )
    base_dir = source.parent if source else Path.cwd()
    daemon = _daemon_settings(where, base_dir, raw.get("daemon", {}))
    budget = BudgetSettings(**_table(where, "budget", raw.get("budget", {}), _BUDGET_KEYS))
    scheduler = SchedulerSettings(
        **_table(where, "scheduler", raw.get("scheduler", {}), _SCHEDULER_KEYS)
    )
    models_raw = raw.get("models", {})
    if not isinstance(models_raw, dict):
        raise ConfigError(f"{where}: [models] must be a table of [models.<id>] tables")
    models: dict[str, ModelSpec] = {}
    by_folded_id: dict[str, str] = {}
    for model_id, model_raw in models_raw.items():
        earlier = by_folded_id.get(model_id.lower())
        if earlier is not None:
            raise ConfigError(
                f"{where}: models.{model_id}: duplicate model id: differs from "
                f"models.{earlier} only in case (ids ignore case)"
            )
        by_folded_id[model_id.lower()] = model_id
        models[model_id] = _model(where, base_dir, model_id, model_raw)
    metrics = MetricsSettings(**_table(where, "metrics", raw.get("metrics", {}), _METRICS_KEYS))
    try:
        http = http_settings(_table(where, "http", raw.get("http", {}), HTTP_KEYS))
    except ValueError as err:
        raise ConfigError(f"{where}: http.{err}") from None
    try:
        load_access(http)  # a keys file that cannot be used is refused now, not at bind
    except ValueError as err:
        raise ConfigError(f"{where}: http.api_keys_file: {err}") from None
    return Config(
        source=source,
        daemon=daemon,
        budget=budget,
        scheduler=scheduler,
        metrics=metrics,
        http=http,
        models=models,
    )


def find_config(explicit: Path | None) -> Path | None:
    """The config file to use, or None when none exists.

    ``--config`` and ``$MMD_CONFIG`` must name an existing file; the XDG and system
    locations are used only when present.
    """
    if explicit is not None:
        return explicit
    from_env = os.environ.get(paths.CONFIG_ENV)
    if from_env:
        return Path(from_env)
    for candidate in paths.config_candidates():
        if candidate.is_file():
            return candidate
    return None


def load_config(explicit: Path | None = None) -> Config:
    """Find, read and validate the config."""
    source = find_config(explicit)
    if source is None:
        return Config(source=None)
    try:
        with source.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{source}: permission denied") from None
    except OSError as err:
        raise ConfigError(f"{source}: cannot be read: {err.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{source}: config file is larger than {MAX_CONFIG_BYTES} bytes; refused unread"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{source}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None
    return parse_config(text, source.resolve())
