"""Footprints learned from measurement, kept across restarts in ``state_dir``.

Once a model is ready, the daemon measures what its process holds (PSS for RAM, NVML
per process for GPUs) every second. The largest figures seen are stored here under the
model's identity (its file by path, size and mtime; ctx, parallel, embedding and the
extra llama-server args; the llama-server binary) and the number of offloaded layers.
The next time the planner places the model with that many layers offloaded, it uses
these figures instead of the estimate from the GGUF header.

The file is ``footprints.json`` in ``daemon.state_dir``: written atomically (a temporary
file, fsync, rename) with mode 0600. A missing or unreadable file is an empty store; a
store that cannot be written is logged and the daemon goes on with what it has.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mmd.core.footprint import LearnedBytes
from mmd.core.spec import ModelSpec
from mmd.core.units import MIB

log = logging.getLogger("mmd.learned")

STORE_FILE = "footprints.json"
_VERSION = 1
# Entries kept at most; the least recently updated go first (a model file replaced on
# disk leaves its old identity behind).
MAX_ENTRIES = 1000
# A measurement replaces the stored one when it is larger by this much (either share).
_GROWTH_FRACTION = 0.01
_GROWTH_MIN_BYTES = MIB


@dataclass(frozen=True)
class ModelIdentity:
    """What makes two loads of a model hold the same memory, bar the placement."""

    path: str
    size: int
    mtime_ns: int
    ctx: int
    parallel: int
    embedding: bool
    args: tuple[str, ...]
    runtime: str  # the llama-server binary


def model_identity(spec: ModelSpec, runtime: Path) -> ModelIdentity | None:
    """The identity of ``spec``'s model as its file is now; None when it cannot be read."""
    try:
        path = spec.path.resolve()
        info = path.stat()
    except OSError:
        return None
    return ModelIdentity(
        path=str(path),
        size=info.st_size,
        mtime_ns=info.st_mtime_ns,
        ctx=spec.ctx,
        parallel=spec.parallel,
        embedding=spec.embedding,
        args=tuple(spec.args),
        runtime=str(runtime),
    )


@dataclass(frozen=True)
class _Entry:
    gpu_bytes: int
    ram_bytes: int
    updated_unix: float


def _grew(old: int, new: int) -> bool:
    return new - old >= max(_GROWTH_MIN_BYTES, old * _GROWTH_FRACTION)


class LearnedStore:
    """The learned footprints: read once, updated in memory, written whole.

    Reads and updates happen on the daemon's event loop; :meth:`write` may run in a
    worker thread (a lock keeps a late write of an older text from replacing a newer).
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STORE_FILE
        self._entries: dict[tuple[ModelIdentity, int], _Entry] = {}
        self._lock = threading.Lock()
        self._written = 0  # the generation of the text last written
        self.generation = 0  # bumped by every change

    def load(self) -> None:
        """Read the file; a missing or malformed one leaves the store empty."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as err:
            log.warning("ignoring learned footprints in %s: %s", self.path, err)
            return
        entries = data.get("footprints") if isinstance(data, dict) else None
        if not isinstance(entries, list) or data.get("version") != _VERSION:
            log.warning(
                "ignoring learned footprints in %s: not a version %d file", self.path, _VERSION
            )
            return
        for item in entries:
            parsed = _parse_entry(item)
            if parsed is not None:
                key, entry = parsed
                self._entries[key] = entry

    def for_model(self, identity: ModelIdentity | None) -> tuple[LearnedBytes, ...]:
        """Everything learned about ``identity``, by number of offloaded layers."""
        if identity is None:
            return ()
        return tuple(
            LearnedBytes(layers, entry.gpu_bytes, entry.ram_bytes)
            for (ident, layers), entry in sorted(self._entries.items(), key=lambda item: item[0][1])
            if ident == identity
        )

    def record(
        self, identity: ModelIdentity, gpu_layers: int, gpu_bytes: int, ram_bytes: int
    ) -> bool:
        """Keep a measurement: True when it is new or larger than the stored one."""
        key = (identity, gpu_layers)
        old = self._entries.get(key)
        if old is not None and not (
            _grew(old.gpu_bytes, gpu_bytes) or _grew(old.ram_bytes, ram_bytes)
        ):
            return False
        if old is not None:
            gpu_bytes, ram_bytes = max(gpu_bytes, old.gpu_bytes), max(ram_bytes, old.ram_bytes)
        self._entries.pop(key, None)  # the most recently updated last
        self._entries[key] = _Entry(gpu_bytes, ram_bytes, time.time())
        if len(self._entries) > MAX_ENTRIES:
            oldest = sorted(self._entries, key=lambda k: self._entries[k].updated_unix)  # stable
            for stale in oldest[: len(self._entries) - MAX_ENTRIES]:
                del self._entries[stale]
        self.generation += 1
        return True

    def dumps(self) -> str:
        """The store as the file's text."""
        items = [
            {
                **asdict(identity),
                "args": list(identity.args),
                "gpu_layers": layers,
                "gpu_bytes": entry.gpu_bytes,
                "ram_bytes": entry.ram_bytes,
                "updated_unix": round(entry.updated_unix, 3),
            }
            for (identity, layers), entry in self._entries.items()
        ]
        return json.dumps({"version": _VERSION, "footprints": items}, indent=1) + "\n"

    def write(self, text: str, generation: int) -> bool:
        """Write ``text`` (from :meth:`dumps` at ``generation``) atomically, mode 0600.

        Skipped when a newer generation was written already. False when it failed.
        """
        with self._lock:
            if generation <= self._written:
                return True
            try:
                write_atomically(self.path, text)
            except OSError as err:
                log.warning("cannot write learned footprints to %s: %s", self.path, err)
                return False
            self._written = generation
            return True


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (mode 0600) so that readers see the old or the new
    file, never a part; a state directory that is missing is made 0700."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself, durable where supported
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _parse_entry(item: Any) -> tuple[tuple[ModelIdentity, int], _Entry] | None:
    """One entry of the file; None for anything malformed (skipped)."""
    if not isinstance(item, dict):
        return None
    try:
        identity = ModelIdentity(
            path=_typed(item["path"], str),
            size=_typed(item["size"], int),
            mtime_ns=_typed(item["mtime_ns"], int),
            ctx=_typed(item["ctx"], int),
            parallel=_typed(item["parallel"], int),
            embedding=_typed(item["embedding"], bool),
            args=tuple(_typed(a, str) for a in _typed(item["args"], list)),
            runtime=_typed(item["runtime"], str),
        )
        layers = _typed(item["gpu_layers"], int)
        entry = _Entry(
            gpu_bytes=_typed(item["gpu_bytes"], int),
            ram_bytes=_typed(item["ram_bytes"], int),
            updated_unix=float(_typed(item.get("updated_unix", 0.0), (int, float))),
        )
    except (KeyError, TypeError):
        return None
    if layers < 0 or entry.gpu_bytes < 0 or entry.ram_bytes < 0:
        return None
    return (identity, layers), entry


def _typed(value: Any, kind: type | tuple[type, ...]) -> Any:
    # bool is an int to isinstance; a count given as true/false is malformed all the same.
    if isinstance(value, bool) and kind is not bool:
        raise TypeError(f"unexpected boolean {value!r}")
    if not isinstance(value, kind):
        raise TypeError(f"expected {kind}, got {value!r}")
    return value
