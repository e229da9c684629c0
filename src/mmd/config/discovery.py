"""Models the user already has: scanning ``[daemon] model_dirs`` and the well-known stores.

Each GGUF file found becomes a :class:`~mmd.core.spec.ModelSpec` with ``source`` saying
where it came from, defaults read from its header (mmd.core.sources decides them), and an id that
a ``[models.<id>]`` table overrides. Discovery reads and lists; it creates, changes and
follows nothing beyond the configured directories and the stores' documented layouts:
no directory symlink is followed, hidden directories are stepped over, and the walk is
bounded in depth and in entries. A file that cannot be used becomes a note (``Config.notes``:
the daemon's log, ``mmctl models`` and ``mmctl health``), never an error that stops the daemon.

The stores (the daemon user's home and environment; see the README):

* ``huggingface``: ``$HF_HUB_CACHE``, ``$HUGGINGFACE_HUB_CACHE``, ``$HF_HOME/hub``,
  ``$XDG_CACHE_HOME/huggingface/hub`` or ``~/.cache/huggingface/hub``;
  ``models--ORG--NAME/snapshots/REV/**.gguf`` (symlinks into ``blobs/``), the revision
  that ``refs/main`` names, else the newest snapshot. Recent llama.cpp builds download
  ``-hf`` models here too.
* ``llama.cpp``: ``$LLAMA_CACHE``, ``$XDG_CACHE_HOME/llama.cpp`` or ``~/.cache/llama.cpp``:
  the Hugging Face layout above, and the older flat ``ORG_REPO_FILE.gguf`` files.
* ``ollama``: ``$OLLAMA_MODELS``, else ``~/.ollama/models`` and the Linux service's
  ``/usr/share/ollama/.ollama/models``: ``manifests/HOST/NAMESPACE/NAME/TAG`` (JSON) whose
  model layer names the GGUF blob ``blobs/sha256-HEX``.
* ``lmstudio``: ``~/.lmstudio/models`` and the older ``~/.cache/lm-studio/models``:
  ``PUBLISHER/REPO/*.gguf``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from mmd.config.settings import Config, load_config
from mmd.core import sources
from mmd.core.sources import Found
from mmd.core.spec import ModelSpec
from mmd.runtime.gguf import GGUFError, is_gguf, read_shape

log = logging.getLogger("mmd.discovery")

# How deep below a model_dirs entry files are looked for, and how many directory entries
# one scan reads at most: a model_dirs = ["/"] must not take the daemon's start hostage.
MAX_DEPTH = 6
MAX_ENTRIES = 200_000
# Manifests and params blobs are a few hundred bytes; larger ones are not Ollama's.
MAX_MANIFEST_BYTES = 1 << 20
# The Ollama store's HOST/NAMESPACE/NAME/TAG levels below manifests/.
_OLLAMA_LEVELS = 4


class _Scan:
    """One discovery run: what it found and the notes it took."""

    def __init__(self) -> None:
        self.found: list[Found] = []
        self.notes: list[str] = []
        self.entries = 0
        self.truncated = False

    def add(
        self, model_id: str, path: Path, source: str, store: str, ctx: int | None = None
    ) -> None:
        if not model_id:
            self.notes.append(f"{path}: skipped: no model id can be made of its name")
            return
        try:
            real = os.path.realpath(path)
        except OSError as err:
            self.notes.append(f"{path}: skipped: {err.strerror}")
            return
        self.found.append(Found(model_id, path, source, store, real, ctx))

    def listdir(self, directory: Path) -> list[os.DirEntry[str]]:
        """The entries of ``directory`` (none, with a note, when it cannot be read)."""
        if self.truncated:
            return []
        try:
            with os.scandir(directory) as listing:
                entries = list(listing)
        except FileNotFoundError:
            return []
        except OSError as err:
            self.notes.append(f"{directory}: cannot be read: {err.strerror}")
            return []
        self.entries += len(entries)
        if self.entries > MAX_ENTRIES:
            self.truncated = True
            self.notes.append(
                f"{directory}: scan stopped after {MAX_ENTRIES} directory entries; "
                "name narrower model_dirs"
            )
            return []
        return sorted(entries, key=lambda e: e.name)

    def walk(self, root: Path, depth: int) -> Iterator[tuple[Path, list[str]]]:
        """(directory, file names) for ``root`` and the directories below it, down to
        ``depth`` levels; hidden directories and directory symlinks are not entered."""
        files: list[str] = []
        below: list[Path] = []
        for entry in self.listdir(root):
            if _is_dir(entry):
                if depth > 0 and not entry.name.startswith("."):
                    below.append(Path(entry.path))
            else:
                files.append(entry.name)
        yield root, files
        for directory in below:
            yield from self.walk(directory, depth - 1)

    def gguf_files(
        self, root: Path, depth: int, name_id: Callable[[str], str]
    ) -> Iterator[tuple[Path, str]]:
        """(first file, id) of each model below ``root``; split models missing a part
        become notes. ``name_id`` makes the id of a file's stem."""
        for directory, names in self.walk(root, depth):
            models, problems = sources.model_files(names)
            self.notes += [f"{directory}: {problem}" for problem in problems]
            for filename, name in models:
                yield directory / filename, name_id(name.stem)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


# --- the stores ----------------------------------------------------------------------


def store_roots(store: str, env: Mapping[str, str], home: Path) -> list[Path]:
    """Where ``store`` keeps its models for a user with ``env`` and ``home``."""
    cache = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else home / ".cache"
    if store == "huggingface":
        for var, below in (("HF_HUB_CACHE", ""), ("HUGGINGFACE_HUB_CACHE", ""), ("HF_HOME", "hub")):
            if env.get(var):
                return [Path(env[var]) / below if below else Path(env[var])]
        return [cache / "huggingface" / "hub"]
    if store == "llama.cpp":
        return [Path(env["LLAMA_CACHE"]) if env.get("LLAMA_CACHE") else cache / "llama.cpp"]
    if store == "ollama":
        if env.get("OLLAMA_MODELS"):
            return [Path(env["OLLAMA_MODELS"])]
        return [home / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]
    if store == "lmstudio":
        return [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]
    raise ValueError(f"unknown store {store!r}")


def _scan_dir(scan: _Scan, root: Path) -> None:
    if not root.is_dir():
        scan.notes.append(f"model_dirs: {root} is not a directory")
        return
    for path, model_id in scan.gguf_files(root, MAX_DEPTH, sources.slug):
        scan.add(model_id, path, f"dir:{root}", "dir")


def _hf_snapshot(scan: _Scan, repo: Path) -> Path | None:
    """The snapshot ``refs/main`` names, else the newest one."""
    try:
        commit = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        commit = ""
    if commit and "/" not in commit and commit not in (".", ".."):
        snapshot = repo / "snapshots" / commit
        if snapshot.is_dir():
            return snapshot
    snapshots = [Path(e.path) for e in scan.listdir(repo / "snapshots") if _is_dir(e)]
    return max(snapshots, key=lambda p: (p.stat().st_mtime_ns, p.name), default=None)


def _scan_hf_layout(scan: _Scan, root: Path, store: str) -> None:
    for entry in scan.listdir(root):
        repo = sources.hf_repo(entry.name)
        if repo is None or not _is_dir(entry):
            continue
        snapshot = _hf_snapshot(scan, Path(entry.path))
        if snapshot is None:
            continue
        # Repositories keep quantizations in sub-folders (Q4_K_M/...-00001-of-00002.gguf).
        for path, model_id in scan.gguf_files(snapshot, 3, sources.slug):
            scan.add(model_id, path, f"{store}:{repo}", store)


def _scan_huggingface(scan: _Scan, root: Path) -> None:
    _scan_hf_layout(scan, root, "huggingface")


def _scan_llamacpp(scan: _Scan, root: Path) -> None:
    _scan_hf_layout(scan, root, "llama.cpp")
    names = [e.name for e in scan.listdir(root) if not _is_dir(e)]
    prefixes = sources.llamacpp_prefixes(names)
    models, problems = sources.model_files(names)
    scan.notes += [f"{root}: {problem}" for problem in problems]
    for filename, name in models:
        model_id = sources.slug(sources.strip_prefix(name.stem, prefixes))
        scan.add(model_id, root / filename, "llama.cpp", "llama.cpp")


def _read_small(path: Path) -> str:
    with path.open("rb") as handle:
        data = handle.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ValueError(f"larger than {MAX_MANIFEST_BYTES} bytes")
    return data.decode("utf-8")


def _scan_ollama(scan: _Scan, root: Path) -> None:
    manifests = root / "manifests"
    for directory, names in scan.walk(manifests, _OLLAMA_LEVELS - 1):
        levels = directory.relative_to(manifests).parts
        if len(levels) != _OLLAMA_LEVELS - 1:
            continue
        host, namespace, name = levels
        for tag in names:
            _ollama_model(scan, root, directory / tag, (host, namespace, name, tag))


def _ollama_model(scan: _Scan, root: Path, manifest: Path, name: tuple[str, ...]) -> None:
    shown = sources.ollama_name(*name)
    try:
        layers = sources.parse_ollama_manifest(_read_small(manifest))
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        scan.notes.append(f"ollama:{shown}: skipped: manifest {manifest}: {_reason(err)}")
        return
    if layers.adapters:
        scan.notes.append(
            f"ollama:{shown}: skipped: it has a LoRA adapter, which mmd does not apply"
        )
        return
    ctx = None
    if layers.params is not None:
        try:
            ctx = sources.ollama_num_ctx(_read_small(root / "blobs" / layers.params))
        except (OSError, ValueError):
            ctx = None  # the parameters are advice: the model loads without them
    scan.add(
        sources.ollama_id(*name), root / "blobs" / layers.model, f"ollama:{shown}", "ollama", ctx
    )


def _scan_lmstudio(scan: _Scan, root: Path) -> None:
    for path, model_id in scan.gguf_files(root, 3, sources.slug):
        publisher_repo = "/".join(path.relative_to(root).parts[:2])
        scan.add(model_id, path, f"lmstudio:{publisher_repo}", "lmstudio")


_SCANNERS: dict[str, Callable[[_Scan, Path], None]] = {
    "huggingface": _scan_huggingface,
    "llama.cpp": _scan_llamacpp,
    "ollama": _scan_ollama,
    "lmstudio": _scan_lmstudio,
}


def _guarded(scan: _Scan, scanner: Callable[[_Scan, Path], None], root: Path) -> None:
    """Run one scan; a file system that changes under it (a snapshot removed while it is
    read) ends that scan with a note, never the daemon's start or reload."""
    try:
        scanner(scan, root)
    except OSError as err:
        scan.notes.append(f"{root}: scan stopped: {err.filename or root}: {_reason(err)}")


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err)


# --- models from what was found ------------------------------------------------------


def _spec(item: Found) -> tuple[ModelSpec | None, str | None]:
    """The model for a found file, or None and why it is skipped (None: silently, a
    projector that only its header gives away)."""
    path = item.path
    # An Ollama blob's hash says nothing to its owner: the note names the model too.
    where = f"{item.source} ({path})" if item.store == "ollama" else str(path)
    if not path.exists():
        hint = " (a symlink to nowhere)" if path.is_symlink() else ""
        return None, f"{where}: skipped: does not exist{hint}"
    if not os.access(path, os.R_OK):
        return None, f"{where}: skipped: cannot be read (permission denied)"
    if not is_gguf(path):
        return None, f"{where}: skipped: not a GGUF file"
    try:
        shape = read_shape(path)
    except GGUFError as err:
        return None, f"{where}: skipped: {str(err).removeprefix(f'{path}: ')}"
    except OSError as err:  # gone or changed since it was listed
        return None, f"{where}: skipped: {_reason(err)}"
    if shape.architecture == "clip":
        return None, None
    if shape.pooling_type == sources.POOLING_RANK:
        return None, f"{where}: skipped: a reranker (pooling type rank), which mmd does not serve"
    embedding = sources.is_embedding(shape.architecture, shape.pooling_type)
    spec = ModelSpec(
        id=item.id,
        path=path,
        ctx=sources.default_ctx(shape.context_train, item.ctx),
        embedding=embedding,
        args=sources.pooling_args(shape.pooling_type) if embedding else (),
        source=item.source,
    )
    return spec, None


def discover(config: Config, env: Mapping[str, str], home: Path) -> Config:
    """``config`` with the models found in its model_dirs and stores added (blocking)."""
    settings = config.daemon
    if not settings.model_dirs and not settings.model_stores:
        return config
    scan = _Scan()
    for root in settings.model_dirs:
        _guarded(scan, _scan_dir, root)
    for store in settings.model_stores:
        roots = [root for root in store_roots(store, env, home) if root.is_dir()]
        for root in roots:
            _guarded(scan, _SCANNERS[store], root)
    configured = {os.path.realpath(spec.path) for spec in config.models.values()}
    chosen, clash_notes = sources.resolve_ids(scan.found, config.models, configured)
    models = dict(config.models)
    notes = [*scan.notes, *clash_notes]
    for model_id, item in chosen.items():
        spec, problem = _spec(item)
        if problem is not None:
            notes.append(problem)
        if spec is not None:
            models[model_id] = spec
    return dataclasses.replace(config, models=models, notes=(*config.notes, *notes))


def load_registry(explicit: Path | None = None) -> Config:
    """The config, with the discovered models (raises ConfigError as load_config)."""
    return discover(load_config(explicit), os.environ, Path.home())


def log_discovery(config: Config) -> None:
    """What discovery found and skipped, in the daemon's log (at start and each reload)."""
    if not (config.daemon.model_dirs or config.daemon.model_stores):
        return
    found = sum(1 for spec in config.models.values() if spec.source != "config")
    log.info("%d models discovered", found)
    for note in config.notes:
        log.warning("%s", note)
