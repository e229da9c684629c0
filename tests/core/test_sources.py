"""The rules of model discovery, without files: names, ids, clashes, manifests, defaults."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmd.config.settings import MODEL_ID_RE
from mmd.core import sources
from mmd.core.sources import Found, GGUFName


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Llama-3.2-1B-Instruct-Q4_K_M", "llama-3.2-1b-instruct-q4_k_m"),
        ("qwen2.5 coder (7B)", "qwen2.5-coder-7b"),
        ("--._weird__name..", "weird__name"),
        ("!!!", ""),
        ("x" * 80, "x" * 64),
    ],
)
def test_slug(text: str, expected: str) -> None:
    assert sources.slug(text) == expected


@given(st.text(max_size=100))
def test_a_slug_is_empty_or_a_valid_lowercase_model_id(text: str) -> None:
    made = sources.slug(text)
    assert made == "" or (MODEL_ID_RE.match(made) and made == made.lower())
    assert not made.endswith(("-", ".", "_"))


def test_gguf_names_and_split_parts() -> None:
    assert sources.gguf_name("a.GGUF") == GGUFName("a")
    assert sources.gguf_name("m-Q4-00002-of-00003.gguf") == GGUFName("m-Q4", 2, 3)
    assert sources.gguf_name("model.bin") is None
    assert sources.gguf_name(".gguf") is None


def test_a_split_model_counts_once_by_its_first_part_and_projectors_are_not_models() -> None:
    names = [
        "big-00002-of-00002.gguf",
        "big-00001-of-00002.gguf",
        "mmproj-model-f16.gguf",
        "small.gguf",
        "small.gguf.etag",
        "README.md",
    ]
    models, problems = sources.model_files(names)
    assert models == [
        ("big-00001-of-00002.gguf", GGUFName("big", 1, 2)),
        ("small.gguf", GGUFName("small")),
    ]
    assert problems == []


def test_a_split_model_missing_a_part_is_reported_not_listed() -> None:
    models, problems = sources.model_files(["half-00001-of-00003.gguf", "half-00003-of-00003.gguf"])
    assert models == []
    assert problems == ["half: split into 3 files, part 2 missing"]


def found(model_id: str, path: str, store: str = "dir") -> Found:
    return Found(model_id, Path(path), f"{store}:x", store, path)


def test_a_configured_id_overrides_a_discovered_one_ignoring_case() -> None:
    chosen, notes = sources.resolve_ids(
        [found("qwen", "/a/qwen.gguf"), found("phi", "/a/phi.gguf")], ["Qwen"], []
    )
    assert list(chosen) == ["phi"]
    assert notes == []


def test_a_file_the_config_names_is_not_discovered_again() -> None:
    chosen, _ = sources.resolve_ids([found("qwen", "/a/qwen.gguf")], ["mine"], ["/a/qwen.gguf"])
    assert chosen == {}


def test_the_same_file_found_twice_is_one_model_kept_by_the_first_scan() -> None:
    chosen, notes = sources.resolve_ids(
        [found("qwen", "/blob", "huggingface"), found("qwen", "/blob", "lmstudio")], [], []
    )
    assert [(m, f.store) for m, f in chosen.items()] == [("qwen", "huggingface")]
    assert notes == []


def test_a_clash_gives_no_one_the_plain_id_and_is_reported() -> None:
    chosen, notes = sources.resolve_ids(
        [found("llama3.2", "/hf/l.gguf", "huggingface"), found("llama3.2", "/o/b", "ollama")],
        [],
        [],
    )
    assert sorted(chosen) == ["hf-llama3.2", "ollama-llama3.2"]
    assert chosen["ollama-llama3.2"].path == Path("/o/b")
    assert len(notes) == 1
    assert "2 models would be 'llama3.2'" in notes[0]
    assert "hf-llama3.2 (/hf/l.gguf)" in notes[0]
    assert "ollama-llama3.2 (/o/b)" in notes[0]


def test_a_clash_within_one_store_adds_a_hash_of_the_path() -> None:
    chosen, notes = sources.resolve_ids(
        [found("m", "/one/m.gguf"), found("m", "/two/m.gguf"), found("other", "/o.gguf")], [], []
    )
    assert "m" not in chosen
    clashing = sorted(i for i in chosen if i != "other")
    assert len(clashing) == 2
    assert all(re.fullmatch(r"dir-m-[0-9a-f]{6}", i) for i in clashing)
    assert {chosen[i].path for i in clashing} == {Path("/one/m.gguf"), Path("/two/m.gguf")}
    assert len(notes) == 1


def test_a_renamed_clash_never_takes_an_id_already_used() -> None:
    chosen, _ = sources.resolve_ids(
        [found("m", "/a/m.gguf"), found("m", "/o/m", "ollama"), found("dir-m", "/b/dir-m.gguf")],
        [],
        [],
    )
    assert chosen["dir-m"].path == Path("/b/dir-m.gguf")
    assert "ollama-m" in chosen
    assert len(chosen) == 3


def test_ollama_names_and_ids() -> None:
    assert sources.ollama_name("registry.ollama.ai", "library", "llama3.2", "3b") == "llama3.2:3b"
    assert sources.ollama_id("registry.ollama.ai", "library", "llama3.2", "3b") == "llama3.2-3b"
    assert sources.ollama_id("registry.ollama.ai", "library", "llama3.2", "latest") == "llama3.2"
    assert sources.ollama_id("registry.ollama.ai", "me", "bot", "v1") == "me-bot-v1"
    assert (
        sources.ollama_name("hf.co", "org", "Repo-GGUF", "Q4_K_M") == "hf.co/org/Repo-GGUF:Q4_K_M"
    )
    assert sources.ollama_id("hf.co", "org", "Repo-GGUF", "Q4_K_M") == "org-repo-gguf-q4_k_m"


HEX = "ab" * 32


def manifest(*layers: tuple[str, str]) -> str:
    return json.dumps({"layers": [{"mediaType": m, "digest": d, "size": 1} for m, d in layers]})


def test_an_ollama_manifest_names_the_model_template_and_params_blobs() -> None:
    parsed = sources.parse_ollama_manifest(
        manifest(
            (sources.OLLAMA_MODEL, f"sha256:{HEX}"),
            (sources.OLLAMA_TEMPLATE, f"sha256:{'cd' * 32}"),
            (sources.OLLAMA_PARAMS, f"sha256:{'ef' * 32}"),
            ("application/vnd.ollama.image.license", f"sha256:{'01' * 32}"),
        )
    )
    assert parsed.model == f"sha256-{HEX}"
    assert parsed.template == f"sha256-{'cd' * 32}"
    assert parsed.params == f"sha256-{'ef' * 32}"
    assert parsed.system is None
    assert parsed.adapters == 0


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not json", "not JSON"),
        ("[]", "no list of layers"),
        (manifest((sources.OLLAMA_TEMPLATE, f"sha256:{HEX}")), "no model layer"),
        (manifest((sources.OLLAMA_MODEL, "sha256:../../etc/passwd")), "is not sha256:"),
        (manifest((sources.OLLAMA_MODEL, f"md5:{HEX}")), "is not sha256:"),
    ],
)
def test_an_unusable_ollama_manifest_says_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        sources.parse_ollama_manifest(text)


def test_ollama_num_ctx() -> None:
    assert sources.ollama_num_ctx('{"num_ctx": 8192, "stop": ["<|eot|>"]}') == 8192
    assert sources.ollama_num_ctx('{"stop": ["x"]}') is None
    assert sources.ollama_num_ctx('{"num_ctx": true}') is None
    assert sources.ollama_num_ctx("garbage") is None


def test_hf_repo_folders_and_llamacpp_prefixes() -> None:
    assert sources.hf_repo("models--bartowski--Llama-3.2-1B-GGUF") == "bartowski/Llama-3.2-1B-GGUF"
    assert sources.hf_repo("datasets--x--y") is None
    assert sources.hf_repo("models--broken") is None
    prefixes = sources.llamacpp_prefixes(
        ["manifest=org=repo=latest.json", "manifest=org=repo-GGUF=Q4.json", "org_repo_x.gguf"]
    )
    assert prefixes == ["org_repo-GGUF_", "org_repo_"]
    assert sources.strip_prefix("org_repo-GGUF_M-Q4.gguf", prefixes) == "M-Q4.gguf"
    assert sources.strip_prefix("other_file", prefixes) == "other_file"


def test_default_context_is_capped_by_training_and_the_cap() -> None:
    assert sources.default_ctx(131072) == sources.DEFAULT_CTX_CAP
    assert sources.default_ctx(2048) == 2048
    assert sources.default_ctx(0) == sources.DEFAULT_CTX_CAP  # unknown: the cap
    assert sources.default_ctx(131072, asked=16384) == 16384  # Ollama's num_ctx
    assert sources.default_ctx(8192, asked=16384) == 8192
    assert sources.default_ctx(32) == sources.MIN_CTX


def test_embedding_models_are_recognised_by_architecture_or_pooling() -> None:
    assert sources.is_embedding("nomic-bert", -1)
    assert sources.is_embedding("qwen3", 3)
    assert not sources.is_embedding("llama", -1)
    assert not sources.is_embedding("llama", 0)
    assert sources.pooling_args(2) == ("--pooling", "cls")
    assert sources.pooling_args(-1) == ()


def test_summary_counts_discovered_models() -> None:
    assert sources.summary({}) == "0 models"
    assert sources.summary({"a": "config"}) == "1 models"  # as --check-config always said
    assert sources.summary({"a": "config", "b": "ollama:b:latest"}) == (
        "2 models: 1 from the config, 1 discovered"
    )
