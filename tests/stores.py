"""The well-known model stores' real layouts, built with tiny synthetic GGUF models.

Each builder lays files out as the tool that owns the store does (the Hugging Face hub
cache's blobs and snapshot symlinks, Ollama's manifests and sha256 blobs, LM Studio's
publisher folders, llama.cpp's flat cache), so that discovery is tested against the
layouts it meets on a user's machine. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mmd.runtime.synthetic import write_model

REV = "0123456789abcdef0123456789abcdef01234567"


def hf_repo(
    hub: Path, repo: str, files: dict[str, int], *, rev: str = REV, ref: bool = True
) -> Path:
    """``hub/models--ORG--NAME``: each file (a path in the repo -> a seed) written as a
    blob named by its sha256 and linked from ``snapshots/REV/``; ``refs/main`` names REV."""
    folder = hub / ("models--" + repo.replace("/", "--"))
    blobs = folder / "blobs"
    snapshot = folder / "snapshots" / rev
    blobs.mkdir(parents=True, exist_ok=True)
    for name, seed in files.items():
        scratch = folder / f"incoming-{seed}.gguf"
        write_model(scratch, seed=seed)
        digest = hashlib.sha256(scratch.read_bytes()).hexdigest()
        blob = blobs / digest
        scratch.replace(blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(rev)
    return folder


def ollama_model(
    store: Path,
    name: str,
    tag: str,
    seed: int,
    *,
    params: dict[str, object] | None = None,
    namespace: str = "library",
    host: str = "registry.ollama.ai",
    model_bytes: bytes | None = None,
) -> Path:
    """An Ollama model as ``ollama pull`` leaves it: the GGUF, template and params blobs
    under ``blobs/sha256-HEX`` and a manifest naming them. The GGUF blob's path."""
    blobs = store / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    if model_bytes is None:
        scratch = write_model(store / f"incoming-{seed}.gguf", seed=seed)
        model_bytes = scratch.read_bytes()
        scratch.unlink()
    layers = [
        _blob(blobs, "application/vnd.ollama.image.model", model_bytes),
        _blob(blobs, "application/vnd.ollama.image.template", b"{{ .Prompt }}"),
    ]
    if params is not None:
        layers.append(_blob(blobs, "application/vnd.ollama.image.params", json.dumps(params)))
    config = _blob(blobs, "application/vnd.docker.container.image.v1+json", b"{}")
    manifest = store / "manifests" / host / namespace / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": config,
                "layers": layers,
            }
        )
    )
    return blobs / ("sha256-" + hashlib.sha256(model_bytes).hexdigest())


def _blob(blobs: Path, media_type: str, data: bytes | str) -> dict[str, object]:
    raw = data.encode() if isinstance(data, str) else data
    digest = hashlib.sha256(raw).hexdigest()
    (blobs / f"sha256-{digest}").write_bytes(raw)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(raw)}


def lmstudio_model(models: Path, publisher: str, repo: str, filename: str, seed: int) -> Path:
    """``models/PUBLISHER/REPO/FILE.gguf``, as LM Studio downloads it."""
    return write_model(models / publisher / repo / filename, seed=seed)


def llamacpp_flat(cache: Path, org: str, repo: str, filename: str, seed: int) -> Path:
    """An older llama.cpp's ``-hf`` download: ``ORG_REPO_FILE.gguf`` beside its etag and
    ``manifest=ORG=REPO=latest.json``."""
    path = write_model(cache / f"{org}_{repo}_{filename}", seed=seed)
    (cache / f"{path.name}.etag").write_text('"etag"')
    (cache / f"manifest={org}={repo}=latest.json").write_text(
        json.dumps({"ggufFile": {"rfilename": filename}})
    )
    return path
