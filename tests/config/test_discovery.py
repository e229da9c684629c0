"""Model discovery over the stores' real layouts (tiny synthetic GGUFs, nothing downloaded):
what each store yields, the defaults read from the headers, what is skipped and why."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from stores import hf_repo, llamacpp_flat, lmstudio_model, ollama_model

from mmd.config import discovery
from mmd.config.discovery import discover, store_roots
from mmd.config.settings import Config, parse_config
from mmd.core.errors import ConfigError
from mmd.core.sources import DEFAULT_CTX_CAP
from mmd.runtime.synthetic import write_model


def config(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "mmd.toml"
    return parse_config(textwrap.dedent(text), path)


def run(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    """Discover for a user whose home is ``tmp_path/home`` with only ``env`` set."""
    return discover(config(tmp_path, text), env or {}, tmp_path / "home")


def sources_of(found: Config) -> dict[str, str]:
    return {model_id: spec.source for model_id, spec in found.models.items()}


def test_nothing_is_scanned_unless_asked(tmp_path: Path) -> None:
    write_model(tmp_path / "home" / ".lmstudio" / "models" / "p" / "r" / "m.gguf")
    found = run(tmp_path, "")
    assert found.models == {}
    assert found.notes == ()


def test_model_dirs_are_scanned_recursively_with_ids_from_file_names(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_model(models / "Qwen2.5-0.5B-Instruct-Q4_K_M.gguf", context=32768)
    write_model(models / "deep" / "er" / "Tiny.gguf", context=1024)
    for part in (1, 2):
        write_model(models / f"big-{part:05d}-of-00002.gguf", seed=part)
    write_model(models / "mmproj-vision-f16.gguf")
    write_model(models / ".hidden" / "secret.gguf")
    found = run(tmp_path, f'[daemon]\nmodel_dirs = ["{models}"]\n')
    assert sources_of(found) == {
        "big": f"dir:{models}",
        "qwen2.5-0.5b-instruct-q4_k_m": f"dir:{models}",
        "tiny": f"dir:{models}",
    }
    assert found.models["big"].path == models / "big-00001-of-00002.gguf"
    assert found.models["qwen2.5-0.5b-instruct-q4_k_m"].ctx == DEFAULT_CTX_CAP
    assert found.models["tiny"].ctx == 1024  # never more than it was trained for
    assert not found.models["tiny"].embedding
    assert found.notes == ()


def test_relative_model_dirs_are_relative_to_the_config(tmp_path: Path) -> None:
    write_model(tmp_path / "m" / "a.gguf")
    found = run(tmp_path, '[daemon]\nmodel_dirs = ["m"]\n')
    assert found.models["a"].path == tmp_path / "m" / "a.gguf"


def test_the_scan_is_bounded_in_depth_and_follows_no_directory_symlink(tmp_path: Path) -> None:
    models = tmp_path / "models"
    deep = models.joinpath(*"abcdefgh")
    write_model(deep / "too-deep.gguf")
    elsewhere = write_model(tmp_path / "elsewhere" / "outside.gguf")
    (models / "link").symlink_to(elsewhere.parent)
    (models / "loop").symlink_to(models)
    found = run(tmp_path, f'[daemon]\nmodel_dirs = ["{models}"]\n')
    assert found.models == {}


def test_unreadable_and_malformed_files_are_listed_with_the_reason(tmp_path: Path) -> None:
    models = tmp_path / "models"
    good = write_model(models / "good.gguf")
    (models / "text.gguf").write_text("not a model")
    (models / "cut.gguf").write_bytes(good.read_bytes()[:100])
    (models / "dangling.gguf").symlink_to(models / "gone.gguf")
    locked = write_model(models / "locked.gguf", seed=1)
    locked.chmod(0)
    write_model(models / "half-00002-of-00002.gguf")
    try:
        found = run(tmp_path, f'[daemon]\nmodel_dirs = ["{models}", "{tmp_path / "nope"}"]\n')
    finally:
        locked.chmod(0o644)
    assert list(found.models) == (["good"] if os.geteuid() else ["good", "locked"])
    notes = "\n".join(found.notes)
    assert f"{models / 'text.gguf'}: skipped: not a GGUF file" in notes
    assert f"{models / 'cut.gguf'}: skipped: unreadable GGUF file" in notes
    assert f"{models / 'dangling.gguf'}: skipped: does not exist (a symlink to nowhere)" in notes
    assert "half: split into 2 files, part 1 missing" in notes
    assert f"model_dirs: {tmp_path / 'nope'} is not a directory" in notes
    if os.geteuid():  # root reads every file
        assert f"{locked}: skipped: cannot be read (permission denied)" in notes


def test_huggingface_cache_uses_the_snapshot_refs_main_names(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    hf_repo(
        hub,
        "bartowski/Llama-3.2-1B-Instruct-GGUF",
        {"Llama-3.2-1B-Instruct-Q4_K_M.gguf": 1, "mmproj-f16.gguf": 2},
    )
    hf_repo(
        hub,
        "org/Split-GGUF",
        {"Q8_0/Split-Q8_0-00001-of-00002.gguf": 3, "Q8_0/Split-Q8_0-00002-of-00002.gguf": 4},
    )
    # An older revision of the first repo stays in the cache: only refs/main counts.
    hf_repo(
        hub, "bartowski/Llama-3.2-1B-Instruct-GGUF", {"Old-Q2.gguf": 5}, rev="f" * 40, ref=False
    )
    (hub / "datasets--x--y" / "snapshots").mkdir(parents=True)
    found = run(tmp_path, '[daemon]\nmodel_stores = ["huggingface"]\n', {"HF_HUB_CACHE": str(hub)})
    assert sources_of(found) == {
        "llama-3.2-1b-instruct-q4_k_m": "huggingface:bartowski/Llama-3.2-1B-Instruct-GGUF",
        "split-q8_0": "huggingface:org/Split-GGUF",
    }
    spec = found.models["llama-3.2-1b-instruct-q4_k_m"]
    assert spec.path.is_symlink()  # the snapshot's name, not the blob's hash
    assert spec.path.parent.name == "0123456789abcdef0123456789abcdef01234567"
    assert found.notes == ()


def test_ollama_manifests_name_the_blob_and_num_ctx(tmp_path: Path) -> None:
    store = tmp_path / "ollama"
    blob = ollama_model(store, "llama3.2", "3b", 1, params={"num_ctx": 1024, "stop": ["x"]})
    ollama_model(store, "phi3", "latest", 2)
    ollama_model(store, "Repo-GGUF", "Q4_K_M", 3, host="hf.co", namespace="org")
    ollama_model(store, "broken", "1b", 4, model_bytes=b"not a gguf")
    (store / "manifests" / "registry.ollama.ai" / "library" / "garbled").mkdir()
    (store / "manifests" / "registry.ollama.ai" / "library" / "garbled" / "7b").write_text("{")
    found = run(tmp_path, '[daemon]\nmodel_stores = ["ollama"]\n', {"OLLAMA_MODELS": str(store)})
    assert sources_of(found) == {
        "llama3.2-3b": "ollama:llama3.2:3b",
        "org-repo-gguf-q4_k_m": "ollama:hf.co/org/Repo-GGUF:Q4_K_M",
        "phi3": "ollama:phi3:latest",
    }
    assert found.models["llama3.2-3b"].path == blob
    assert found.models["llama3.2-3b"].ctx == 1024  # the Modelfile's num_ctx
    assert found.models["phi3"].ctx == 2048  # trained context below the cap
    notes = "\n".join(found.notes)
    assert f"ollama:broken:1b ({store / 'blobs'}/sha256-" in notes
    assert "): skipped: not a GGUF file" in notes
    assert "ollama:garbled:7b: skipped: manifest" in notes
    assert "not JSON" in notes


def test_lmstudio_and_llamacpp_layouts(tmp_path: Path) -> None:
    home = tmp_path / "home"
    lmstudio_model(
        home / ".lmstudio" / "models", "lmstudio-community", "Phi-GGUF", "Phi-Q4.gguf", 1
    )
    lmstudio_model(home / ".cache" / "lm-studio" / "models", "old", "Repo", "Older.gguf", 2)
    cache = tmp_path / "llama-cache"
    llamacpp_flat(cache, "ggml-org", "gemma-3-GGUF", "gemma-3-Q4_K_M.gguf", 3)
    write_model(cache / "unmanifested_file.gguf", seed=4)
    hf_repo(cache, "ggml-org/New-GGUF", {"New-Q8_0.gguf": 5})
    found = run(
        tmp_path,
        '[daemon]\nmodel_stores = ["llama.cpp", "lmstudio"]\n',
        {"LLAMA_CACHE": str(cache)},
    )
    assert sources_of(found) == {
        "gemma-3-q4_k_m": "llama.cpp",
        "new-q8_0": "llama.cpp:ggml-org/New-GGUF",
        "older": "lmstudio:old/Repo",
        "phi-q4": "lmstudio:lmstudio-community/Phi-GGUF",
        "unmanifested_file": "llama.cpp",
    }


def test_all_stores_default_to_the_users_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env: dict[str, str] = {}
    assert store_roots("huggingface", env, home) == [home / ".cache" / "huggingface" / "hub"]
    assert store_roots("llama.cpp", env, home) == [home / ".cache" / "llama.cpp"]
    assert store_roots("ollama", env, home)[0] == home / ".ollama" / "models"
    assert store_roots("huggingface", {"HF_HOME": "/h"}, home) == [Path("/h/hub")]
    assert store_roots("llama.cpp", {"XDG_CACHE_HOME": "/c"}, home) == [Path("/c/llama.cpp")]
    hf_repo(home / ".cache" / "huggingface" / "hub", "o/r", {"R.gguf": 1})
    ollama_model(home / ".ollama" / "models", "qwen", "0.5b", 2)
    found = discover(config(tmp_path, '[daemon]\nmodel_stores = "all"\n'), env, home)
    assert sources_of(found) == {"qwen-0.5b": "ollama:qwen:0.5b", "r": "huggingface:o/r"}


def test_config_tables_override_discovered_models(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_model(models / "chat.gguf")
    named = write_model(models / "named.gguf", seed=1)
    found = run(
        tmp_path,
        f"""
        [daemon]
        model_dirs = ["{models}"]
        [models.CHAT]
        path = "{models / "chat.gguf"}"
        ctx = 512
        [models.mine]
        path = "{named}"
        """,
    )
    assert sources_of(found) == {"CHAT": "config", "mine": "config"}
    assert found.models["CHAT"].ctx == 512


def test_a_clash_between_stores_is_reported_and_both_are_listed(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_model(models / "llama3.2.gguf", seed=1)
    store = tmp_path / "ollama"
    ollama_model(store, "llama3.2", "latest", 2)
    found = run(
        tmp_path,
        f'[daemon]\nmodel_dirs = ["{models}"]\nmodel_stores = ["ollama"]\n',
        {"OLLAMA_MODELS": str(store)},
    )
    assert sources_of(found) == {
        "dir-llama3.2": f"dir:{models}",
        "ollama-llama3.2": "ollama:llama3.2:latest",
    }
    assert len(found.notes) == 1
    assert "2 models would be 'llama3.2'" in found.notes[0]


def test_embedding_models_get_their_own_pooling(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_model(models / "embedder.gguf", pooling_type=2)
    write_model(models / "reranker.gguf", pooling_type=4, seed=1)
    found = run(tmp_path, f'[daemon]\nmodel_dirs = ["{models}"]\n')
    spec = found.models["embedder"]
    assert spec.embedding
    assert spec.args == ("--pooling", "cls")
    assert "reranker" not in found.models
    assert any("reranker" in note and "pooling type rank" in note for note in found.notes)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('model_stores = ["docker"]', "unknown store 'docker'"),
        ('model_stores = "some"', 'expected "all" or a list'),
        ('model_dirs = "/models"', "expected a list of directories"),
    ],
)
def test_bad_discovery_settings_are_refused(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, f"[daemon]\n{line}\n")


def test_a_store_changing_under_the_scan_ends_that_scan_with_a_note(tmp_path: Path) -> None:
    """A snapshot removed while it is read raises in the middle of a scan: the scan stops
    with a note; what other scans found stays."""
    scan = discovery._Scan()
    scan.add("kept", tmp_path / "kept.gguf", "dir:x", "dir")

    def vanishing(scan: discovery._Scan, root: Path) -> None:
        raise FileNotFoundError(2, "No such file or directory", str(root / "snapshots" / "r"))

    discovery._guarded(scan, vanishing, tmp_path)
    assert [f.id for f in scan.found] == ["kept"]
    assert scan.notes == [
        f"{tmp_path}: scan stopped: {tmp_path / 'snapshots' / 'r'}: No such file or directory"
    ]
