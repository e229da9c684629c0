"""Models the user already has: the rules of discovery, free of I/O.

:mod:`mmd.config.discovery` walks the directories and stores and reads the files; this module
decides what they mean: which file names are models (a split GGUF counts once, under its
first part; ``mmproj`` projectors are not models), the id each model gets, what an
Ollama manifest names, the defaults read from a GGUF header, and how clashing ids are
reported and told apart. Every function here is a plain function of its arguments.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

# The well-known stores, in the order they are scanned (the first to find a file keeps it).
STORES = ("huggingface", "llama.cpp", "ollama", "lmstudio")

# Short names that tell clashing ids apart: "ollama-llama3.2-3b", "hf-llama3.2-3b".
STORE_TAGS = {
    "dir": "dir",
    "huggingface": "hf",
    "llama.cpp": "llamacpp",
    "ollama": "ollama",
    "lmstudio": "lmstudio",
}

# As config.MAX_MODEL_ID_CHARS (config imports this module, not the other way round).
MAX_ID_CHARS = 64
MIN_CTX = 64  # the smallest ctx a [models] table accepts
# A discovered model's context unless its store says otherwise (Ollama's num_ctx): a
# 128k-token model would otherwise reserve gigabytes of KV cache on its first load.
DEFAULT_CTX_CAP = 4096

# Architectures that only embed (llama.cpp's names): served with --embeddings.
EMBEDDING_ARCHITECTURES = frozenset(
    {
        "bert",
        "nomic-bert",
        "nomic-bert-moe",
        "jina-bert-v2",
        "jina-bert-v3",
        "neo-bert",
        "modern-bert",
        "t5encoder",
    }
)
# llama.cpp's pooling types that make an embedding model, by the name --pooling takes.
POOLING_NAMES = {1: "mean", 2: "cls", 3: "last"}
POOLING_RANK = 4  # a reranker: scores pairs, which mmd does not serve

OLLAMA_REGISTRY = "registry.ollama.ai"
OLLAMA_LIBRARY = "library"
OLLAMA_MODEL = "application/vnd.ollama.image.model"
OLLAMA_TEMPLATE = "application/vnd.ollama.image.template"
OLLAMA_PARAMS = "application/vnd.ollama.image.params"
OLLAMA_SYSTEM = "application/vnd.ollama.image.system"
OLLAMA_ADAPTER = "application/vnd.ollama.image.adapter"

_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<parts>\d{5})$", re.IGNORECASE)
_DIGEST = re.compile(r"^sha256[:-](?P<hex>[0-9a-f]{64})$")
_NOT_ID = re.compile(r"[^a-z0-9._-]+")


def slug(text: str) -> str:
    """``text`` as a model id: lowercase, runs of other characters as one ``-``, starting
    with a letter or digit, at most 64 characters; "" when nothing is left."""
    text = _NOT_ID.sub("-", text.lower())
    text = re.sub(r"-{2,}", "-", text)
    text = text.lstrip("._-")[:MAX_ID_CHARS]
    return text.rstrip("._-")


@dataclass(frozen=True)
class GGUFName:
    """What a file name says: ``Qwen-Q4_K_M-00001-of-00003.gguf`` is part 1 of 3 of
    ``Qwen-Q4_K_M``."""

    stem: str
    part: int = 1
    parts: int = 1


def gguf_name(filename: str) -> GGUFName | None:
    """The model a ``*.gguf`` file name belongs to; None for other files."""
    if not filename.lower().endswith(".gguf") or len(filename) <= len(".gguf"):
        return None
    stem = filename[: -len(".gguf")]
    match = _SPLIT.match(stem)
    if match is None:
        return GGUFName(stem)
    return GGUFName(match["stem"], int(match["part"]), int(match["parts"]))


def is_projector(filename: str) -> bool:
    """A multimodal projector (``mmproj-*.gguf``), which llama-server takes beside a model
    (``--mmproj``), not as one."""
    return "mmproj" in filename.lower()


def model_files(filenames: Iterable[str]) -> tuple[list[tuple[str, GGUFName]], list[str]]:
    """The model files among the names in one directory: each split model once, by its
    first part; projectors and other files left out. Also the reasons for split models
    skipped (a part missing)."""
    singles: list[tuple[str, GGUFName]] = []
    splits: dict[tuple[str, int], dict[int, str]] = {}
    for filename in sorted(filenames):
        name = gguf_name(filename)
        if name is None or is_projector(filename):
            continue
        if name.parts == 1 and name.part == 1:
            singles.append((filename, name))
        else:
            splits.setdefault((name.stem, name.parts), {})[name.part] = filename
    problems: list[str] = []
    for (stem, parts), found in sorted(splits.items()):
        missing = [n for n in range(1, parts + 1) if n not in found]
        if missing:
            shown = ", ".join(str(n) for n in missing[:5]) + (", ..." if len(missing) > 5 else "")
            problems.append(f"{stem}: split into {parts} files, part {shown} missing")
            continue
        singles.append((found[1], GGUFName(stem, 1, parts)))
    singles.sort()
    return singles, problems


@dataclass(frozen=True)
class Found:
    """A model file found by a scan, before ids are settled."""

    id: str  # the id it asks for
    path: Path  # the file (the first part of a split model)
    source: str  # where it came from, as `mmctl models` shows it
    store: str  # a key of STORE_TAGS
    real: str  # the resolved path: one file found twice is one model
    ctx: int | None = None  # a context its store asks for (Ollama's num_ctx)


def resolve_ids(
    found: Sequence[Found], configured_ids: Iterable[str], configured_files: Iterable[str]
) -> tuple[dict[str, Found], list[str]]:
    """The discovered models by id, and notes on what was resolved.

    A ``[models]`` table overrides a discovered model with its id (compared ignoring case,
    as the config does), and a file that a table names is not discovered again. The same
    file found twice counts once (the first scan wins). When several files ask for one
    id, none gets it: each takes its store's tag in front (``ollama-llama3.2``), and
    where that clashes as well, a short hash of its path at the end; a note says so.
    """
    taken = {model_id.lower() for model_id in configured_ids}
    named = set(configured_files)
    seen: set[str] = set()
    by_id: dict[str, list[Found]] = {}
    for item in found:
        if item.real in named or item.real in seen or item.id in taken:
            continue
        seen.add(item.real)
        by_id.setdefault(item.id, []).append(item)
    result: dict[str, Found] = {
        model_id: items[0] for model_id, items in by_id.items() if len(items) == 1
    }
    notes: list[str] = []
    for model_id, items in sorted(by_id.items()):
        if len(items) == 1:
            continue
        renamed = _tell_apart(items, taken | set(by_id) | set(result))
        for item in renamed:
            result[item.id] = item
        listed = ", ".join(
            f"{new.id} ({old.path})" for old, new in zip(items, renamed, strict=True)
        )
        notes.append(f"{len(items)} models would be {model_id!r}: listed as {listed}")
    return dict(sorted(result.items())), notes


def _tell_apart(items: Sequence[Found], taken: set[str]) -> list[Found]:
    tagged = [slug(f"{STORE_TAGS[item.store]}-{item.id}") for item in items]
    renamed: list[Found] = []
    for item, model_id in zip(items, tagged, strict=True):
        if tagged.count(model_id) > 1 or model_id in taken:
            digest = hashlib.sha256(item.real.encode()).hexdigest()[:6]
            model_id = slug(model_id[: MAX_ID_CHARS - 7]) + f"-{digest}"
        taken.add(model_id)
        renamed.append(replace(item, id=model_id))
    return renamed


# --- the stores' names ----------------------------------------------------------------


def hf_repo(folder: str) -> str | None:
    """``models--ORG--NAME`` (a Hugging Face cache folder) -> ``ORG/NAME``; None for the
    cache's other folders (datasets, spaces)."""
    if not folder.startswith("models--"):
        return None
    parts = folder.removeprefix("models--").split("--")
    if len(parts) < 2 or not all(parts):
        return None
    return "/".join(parts)


def llamacpp_prefixes(filenames: Iterable[str]) -> list[str]:
    """The ``ORG_REPO_`` prefixes that an older llama.cpp gave the files it downloaded
    into its flat cache, read from its ``manifest=ORG=REPO=TAG.json`` files beside them
    (longest first, so the most specific prefix is stripped)."""
    prefixes: set[str] = set()
    for filename in filenames:
        if not (filename.startswith("manifest=") and filename.endswith(".json")):
            continue
        parts = filename.removesuffix(".json").split("=")
        if len(parts) >= 3 and parts[1] and parts[2]:
            prefixes.add(f"{parts[1]}_{parts[2]}_")
    return sorted(prefixes, key=lambda p: (-len(p), p))


def strip_prefix(stem: str, prefixes: Sequence[str]) -> str:
    for prefix in prefixes:
        if stem.startswith(prefix) and len(stem) > len(prefix):
            return stem[len(prefix) :]
    return stem


def ollama_name(host: str, namespace: str, name: str, tag: str) -> str:
    """The name Ollama shows: ``llama3.2:3b``, ``user/model:tag``, ``hf.co/org/repo:Q4_K_M``."""
    if host == OLLAMA_REGISTRY:
        return f"{name}:{tag}" if namespace == OLLAMA_LIBRARY else f"{namespace}/{name}:{tag}"
    return f"{host}/{namespace}/{name}:{tag}"


def ollama_id(host: str, namespace: str, name: str, tag: str) -> str:
    """``llama3.2:3b`` -> ``llama3.2-3b``; the ``latest`` tag is left out (``llama3.2``),
    as Ollama does; another namespace comes first (``user-model-tag``), the registry's
    host is left out (``hf.co/org/repo:Q4_K_M`` -> ``org-repo-q4_k_m``)."""
    parts = [name] if tag == "latest" else [name, tag]
    if not (host == OLLAMA_REGISTRY and namespace == OLLAMA_LIBRARY):
        parts.insert(0, namespace)
    return slug("-".join(parts))


@dataclass(frozen=True)
class OllamaManifest:
    """The blobs (``sha256-HEX`` file names) one Ollama manifest names."""

    model: str
    template: str | None = None
    params: str | None = None
    system: str | None = None
    adapters: int = 0


def blob_name(digest: object) -> str:
    """``sha256:HEX`` -> the blob's file name ``sha256-HEX``. Anything else is refused:
    the name must never lead outside the store's blobs directory."""
    match = _DIGEST.match(digest) if isinstance(digest, str) else None
    if match is None:
        raise ValueError(f"digest {digest!r} is not sha256:<64 hex digits>")
    return f"sha256-{match['hex']}"


def parse_ollama_manifest(text: str) -> OllamaManifest:
    """An Ollama manifest's layers (ValueError with the reason when it cannot be used)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err.msg} at line {err.lineno})") from None
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, list):
        raise ValueError("no list of layers")
    blobs: dict[str, str] = {}
    adapters = 0
    for layer in layers:
        if not isinstance(layer, dict):
            raise ValueError("a layer is not an object")
        media_type = layer.get("mediaType")
        if media_type == OLLAMA_ADAPTER:
            adapters += 1
        elif media_type in (OLLAMA_MODEL, OLLAMA_TEMPLATE, OLLAMA_PARAMS, OLLAMA_SYSTEM):
            blobs.setdefault(str(media_type), blob_name(layer.get("digest")))
    if OLLAMA_MODEL not in blobs:
        raise ValueError("no model layer")
    return OllamaManifest(
        model=blobs[OLLAMA_MODEL],
        template=blobs.get(OLLAMA_TEMPLATE),
        params=blobs.get(OLLAMA_PARAMS),
        system=blobs.get(OLLAMA_SYSTEM),
        adapters=adapters,
    )


def ollama_num_ctx(params_text: str) -> int | None:
    """``num_ctx`` from an Ollama params blob (JSON), or None when it sets none."""
    try:
        params = json.loads(params_text)
    except json.JSONDecodeError:
        return None
    value = params.get("num_ctx") if isinstance(params, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


# --- defaults from the GGUF header ---------------------------------------------------


def default_ctx(trained: int, asked: int | None = None, cap: int = DEFAULT_CTX_CAP) -> int:
    """The context a discovered model gets: what its store asks for, else ``cap``; never
    more than it was trained for (when its header says), nor less than ``MIN_CTX``."""
    ctx = asked if asked is not None else cap
    if trained > 0:
        ctx = min(ctx, trained)
    return max(ctx, MIN_CTX)


def is_embedding(architecture: str, pooling_type: int) -> bool:
    """Whether a model only embeds: an encoder architecture or a pooling type of its own."""
    return architecture in EMBEDDING_ARCHITECTURES or pooling_type in POOLING_NAMES


def pooling_args(pooling_type: int) -> tuple[str, ...]:
    """llama-server arguments that keep the model's own pooling (mmd passes ``--pooling
    mean`` to an embedding model that names none)."""
    name = POOLING_NAMES.get(pooling_type)
    return ("--pooling", name) if name else ()


def summary(sources: Mapping[str, str]) -> str:
    """``3 models: 1 from the config, 2 discovered`` from each model's source (always
    "models": ``mmd --check-config`` has printed "ok (N models)" for scripts to read)."""
    discovered = sum(1 for source in sources.values() if source != "config")
    total = len(sources)
    if not discovered:
        return f"{total} models"
    return f"{total} models: {total - discovered} from the config, {discovered} discovered"
