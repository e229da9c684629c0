"""The TOML config: daemon settings, memory budget, scheduler and the model registry.

Lookup order: ``--config``, ``$MMD_CONFIG``, ``$XDG_CONFIG_HOME/mmd/mmd.toml``,
``/etc/mmd/mmd.toml``. With none of them present mmd starts with an empty
registry. Every problem is reported as one ConfigError naming the file, the key
and what is wrong.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmd import paths
from mmd.errors import ConfigError
from mmd.footprint import is_gguf
from mmd.memory import BudgetSettings, parse_budget_setting
from mmd.units import MIB, parse_duration, parse_size

MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ModelSpec:
    """One ``[models.<id>]`` table."""

    id: str
    path: Path
    role: str = ""
    ctx: int = 4096
    parallel: int = 1
    gpu_layers: int | None = None  # None: "auto", mmd's planner decides
    priority: int = 1  # lower stays loaded longer; 0 = pinned, never evicted
    keep_alive: float | None = None  # seconds; None: [scheduler] default; < 0: forever
    embedding: bool = False
    args: tuple[str, ...] = ()
    memory: int | None = None  # overrides the footprint estimate
    preload: bool = False

    @property
    def pinned(self) -> bool:
        return self.priority == 0


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


@dataclass(frozen=True)
class SchedulerSettings:
    max_concurrent: int = 8
    max_queue: int = 256
    min_headroom: int = 512 * MIB
    autoload: bool = True
    default_keep_alive: float = 300.0
    # A model is not evicted within this time of becoming ready unless memory demands it.
    min_residency: float = 5.0
    # Queued requests of a loaded model served before it may be swapped out.
    swap_batch: int = 8


@dataclass(frozen=True)
class Config:
    source: Path | None
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    models: Mapping[str, ModelSpec] = field(default_factory=dict)


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
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise ValueError(f"expected a size such as '8GiB', got {value!r}")
    return parse_size(value)


def _duration(value: Any) -> float:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError(f"expected a duration such as '5m', got {value!r}")
    return parse_duration(value)


def _positive_duration(value: Any) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise ValueError(f"must be positive, got {value!r}")
    return seconds


def _keep_alive(value: Any) -> float:
    seconds = _duration(value)
    return -1.0 if seconds < 0 else seconds


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
    return tuple(value)


_DAEMON_KEYS: dict[str, Callable[[Any], Any]] = {
    "socket": lambda v: Path(_str(v)),
    "llama_server": _str,
    "state_dir": lambda v: Path(_str(v)),
    "log_dir": lambda v: Path(_str(v)),
    "load_timeout": _positive_duration,
    "stop_grace": _positive_duration,
    "drain_timeout": _positive_duration,
    "unload_timeout": _positive_duration,
    "max_prompt_bytes": _size,
}
_BUDGET_KEYS: dict[str, Callable[[Any], Any]] = {
    "gpu": _budget,
    "ram": _budget,
    "reserve_gpu": _size,
    "reserve_ram": _size,
    "alert_percent": _percent,
}
_SCHEDULER_KEYS: dict[str, Callable[[Any], Any]] = {
    "max_concurrent": _int(1, 4096),
    "max_queue": _int(0, 1_000_000),
    "min_headroom": _size,
    "autoload": _bool,
    "default_keep_alive": _keep_alive,
    "min_residency": _duration,
    "swap_batch": _int(1, 1_000_000),
}
_MODEL_KEYS: dict[str, Callable[[Any], Any]] = {
    "path": _str,
    "role": _str,
    "ctx": _int(64, 4_194_304),
    "parallel": _int(1, 256),
    "gpu_layers": _gpu_layers,
    "priority": _int(0, 1000),
    "keep_alive": _keep_alive,
    "embedding": _bool,
    "args": _args,
    "memory": _size,
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
            f"{source}: [{name}]: model id must be 1-64 letters, digits, '.', '_' or '-'"
        )
    values = _table(source, name, raw, _MODEL_KEYS)
    if "path" not in values:
        raise ConfigError(f"{source}: {name}.path: missing (the model's GGUF file)")
    path = Path(values.pop("path")).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    check_model_file(path, f"{source}: {name}.path")
    if values.get("embedding") and values.get("parallel", 1) < 1:
        raise ConfigError(f"{source}: {name}.parallel: must be >= 1")
    return ModelSpec(id=model_id, path=path, **values)


def check_model_file(path: Path, where: str) -> None:
    """Raise ConfigError unless ``path`` is a readable GGUF file."""
    if not path.exists():
        hint = " (a symlink to nowhere)" if path.is_symlink() else ""
        raise ConfigError(f"{where}: {path} does not exist{hint}")
    if path.is_dir():
        raise ConfigError(f"{where}: {path} is a directory, not a GGUF file")
    try:
        ok = is_gguf(path)
    except OSError as err:
        raise ConfigError(f"{where}: {path} cannot be read: {err.strerror}") from None
    if not ok:
        raise ConfigError(f"{where}: {path} is not a GGUF file")


def parse_config(text: str, source: Path | None) -> Config:
    """Parse and validate config text. ``source`` names the file in errors and anchors
    relative model paths."""
    where = str(source) if source else "<config>"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        message = str(err)
        if "Cannot declare" in message or "overwrite" in message.lower():
            message += " (a duplicate model id or key?)"
        raise ConfigError(f"{where}: invalid TOML: {message}") from None
    known_tables = {"daemon", "budget", "scheduler", "models"}
    for key in raw:
        if key not in known_tables:
            raise ConfigError(
                f"{where}: {key}: unknown key (known tables: {', '.join(sorted(known_tables))})"
            )
    daemon = DaemonSettings(**_table(where, "daemon", raw.get("daemon", {}), _DAEMON_KEYS))
    budget = BudgetSettings(**_table(where, "budget", raw.get("budget", {}), _BUDGET_KEYS))
    scheduler = SchedulerSettings(
        **_table(where, "scheduler", raw.get("scheduler", {}), _SCHEDULER_KEYS)
    )
    models_raw = raw.get("models", {})
    if not isinstance(models_raw, dict):
        raise ConfigError(f"{where}: [models] must be a table of [models.<id>] tables")
    base_dir = source.parent if source else Path.cwd()
    models: dict[str, ModelSpec] = {}
    for model_id, model_raw in models_raw.items():
        spec = _model(where, base_dir, model_id, model_raw)
        if model_id.lower() in (m.lower() for m in models):
            raise ConfigError(f"{where}: models.{model_id}: duplicate model id (ids ignore case)")
        models[model_id] = spec
    return Config(source=source, daemon=daemon, budget=budget, scheduler=scheduler, models=models)


def find_config(explicit: Path | None) -> Path | None:
    """The config file to use, or None when none exists (an explicit path must exist)."""
    if explicit is not None:
        return explicit
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
        text = source.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{source}: permission denied") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not UTF-8 text") from None
    return parse_config(text, source.resolve())
