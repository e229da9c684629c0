"""The store of learned footprints: identity, what is kept, the file on disk."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from mmd.core.footprint import LearnedBytes
from mmd.core.spec import ModelSpec
from mmd.core.units import GIB, MIB
from mmd.host import learned as learned_module
from mmd.host.learned import LearnedStore, ModelIdentity, model_identity

RUNTIME = Path("/opt/mmd/bin/llama-server")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "m.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(100))
    return path


def identity(path: Path, **kw: object) -> ModelIdentity:
    spec = ModelSpec(id="m", path=path, **kw)  # type: ignore[arg-type]
    found = model_identity(spec, RUNTIME)
    assert found is not None
    return found


def test_measurements_survive_a_new_store(tmp_path: Path, model: Path) -> None:
    store = LearnedStore(tmp_path / "state")
    ident = identity(model, ctx=2048)
    assert store.record(ident, 32, 5 * GIB, 300 * MIB)
    assert store.record(ident, 0, 0, 6 * GIB)
    assert store.write(store.dumps(), store.generation)

    again = LearnedStore(tmp_path / "state")
    again.load()
    assert again.for_model(ident) == (
        LearnedBytes(0, 0, 6 * GIB),
        LearnedBytes(32, 5 * GIB, 300 * MIB),
    )
    assert again.for_model(None) == ()


def test_the_file_is_private_and_written_whole(tmp_path: Path, model: Path) -> None:
    state = tmp_path / "state"
    store = LearnedStore(state)
    store.record(identity(model), 0, 0, GIB)
    assert store.write(store.dumps(), store.generation)

    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert os.listdir(state) == ["footprints.json"]  # no temporary file left behind
    data = json.loads(store.path.read_text())
    assert data["version"] == 1
    (entry,) = data["footprints"]
    assert entry["path"] == str(model.resolve())
    assert entry["size"] == model.stat().st_size
    assert entry["mtime_ns"] == model.stat().st_mtime_ns
    assert (entry["ctx"], entry["parallel"], entry["gpu_layers"]) == (4096, 1, 0)
    assert (entry["gpu_bytes"], entry["ram_bytes"]) == (0, GIB)
    assert entry["runtime"] == str(RUNTIME)


def test_an_older_text_never_replaces_a_newer_one(tmp_path: Path, model: Path) -> None:
    store = LearnedStore(tmp_path)
    ident = identity(model)
    store.record(ident, 0, 0, GIB)
    old = (store.dumps(), store.generation)
    store.record(ident, 0, 0, 2 * GIB)
    assert store.write(store.dumps(), store.generation)
    assert store.write(*old)  # a late writer: skipped
    again = LearnedStore(tmp_path)
    again.load()
    assert again.for_model(ident) == (LearnedBytes(0, 0, 2 * GIB),)


def test_the_largest_measurement_is_kept_and_noise_is_ignored(model: Path) -> None:
    store = LearnedStore(Path("/nonexistent"))
    ident = identity(model)
    assert store.record(ident, 8, 4 * GIB, GIB)
    generation = store.generation
    # Smaller, or larger by less than 1% (and 1 MiB): nothing to save.
    assert not store.record(ident, 8, 3 * GIB, GIB // 2)
    assert not store.record(ident, 8, 4 * GIB + 10 * MIB, GIB + 512 * 1024)
    assert store.generation == generation
    # One share grew: the larger of each share is kept.
    assert store.record(ident, 8, 3 * GIB, 2 * GIB)
    assert store.for_model(ident) == (LearnedBytes(8, 4 * GIB, 2 * GIB),)
    assert store.generation == generation + 1


def test_identity_follows_the_file_and_the_settings(model: Path) -> None:
    store = LearnedStore(Path("/nonexistent"))
    ident = identity(model, ctx=2048, parallel=2)
    store.record(ident, 0, 0, GIB)
    for other in (
        identity(model, ctx=4096, parallel=2),
        identity(model, ctx=2048, parallel=1),
        identity(model, ctx=2048, parallel=2, embedding=True),
        identity(model, ctx=2048, parallel=2, args=("--flash-attn", "on")),
    ):
        assert store.for_model(other) == ()
    spec = ModelSpec(id="m", path=model, ctx=2048, parallel=2)
    assert store.for_model(model_identity(spec, Path("/usr/bin/llama-server"))) == ()
    # The same file and settings, found again: the same identity.
    assert store.for_model(identity(model, ctx=2048, parallel=2)) == (LearnedBytes(0, 0, GIB),)
    # A file replaced on disk is another model.
    model.write_bytes(b"GGUF" + bytes(200))
    assert store.for_model(identity(model, ctx=2048, parallel=2)) == ()
    model.unlink()
    assert model_identity(spec, RUNTIME) is None


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"version": 2, "footprints": []}',
        '{"version": 1, "footprints": {}}',
    ],
)
def test_an_unreadable_file_is_an_empty_store(tmp_path: Path, model: Path, text: str) -> None:
    (tmp_path / "footprints.json").write_text(text)
    store = LearnedStore(tmp_path)
    store.load()
    assert store.for_model(identity(model)) == ()
    assert store.dumps() == '{\n "version": 1,\n "footprints": []\n}\n'


def test_malformed_entries_are_skipped(tmp_path: Path, model: Path) -> None:
    good = LearnedStore(tmp_path)
    good.record(identity(model), 0, 0, GIB)
    data = json.loads(good.dumps())
    entry = data["footprints"][0]
    data["footprints"] = [
        {**entry, "gpu_layers": True},
        {**entry, "ram_bytes": -1},
        {k: v for k, v in entry.items() if k != "ctx"},
        "junk",
        entry,
    ]
    (tmp_path / "footprints.json").write_text(json.dumps(data))
    store = LearnedStore(tmp_path)
    store.load()
    assert store.for_model(identity(model)) == (LearnedBytes(0, 0, GIB),)


def test_a_state_dir_that_cannot_be_written_is_reported(tmp_path: Path, model: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the directory should be")
    store = LearnedStore(blocker)
    store.record(identity(model), 0, 0, GIB)
    assert not store.write(store.dumps(), store.generation)


def test_the_least_recently_updated_entries_go_first(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(learned_module, "MAX_ENTRIES", 2)
    store = LearnedStore(Path("/nonexistent"))
    ident = identity(model)
    for layers in (1, 2, 3):
        store.record(ident, layers, GIB, GIB)
    assert [m.gpu_layers for m in store.for_model(ident)] == [2, 3]
