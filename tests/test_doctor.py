"""mmctl doctor against a real daemon, a broken registry and a daemon that is down."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon


def checks_of(result: Any) -> dict[str, dict[str, str]]:
    payload = json.loads(result.stdout)
    assert isinstance(payload["ok"], bool)
    return {check["name"]: check for check in payload["checks"]}


def doctor(daemon: Daemon, *args: str) -> Any:
    return daemon.mmctl("doctor", "--config", str(daemon.config_path), *args)


def test_doctor_on_a_good_setup(make_daemon: Any, model_files: dict[str, Path]) -> None:
    daemon: Daemon = make_daemon(f'[models.tiny]\npath = "{model_files["tiny"]}"\nctx = 256\n')
    result = doctor(daemon, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    checks = checks_of(result)
    assert all(c["status"] in ("ok", "warn") for c in checks.values())
    for name in ("llama-server", "llama-server starts", "config", "model tiny", "daemon"):
        assert checks[name]["status"] == "ok", checks[name]
    assert checks["socket"]["status"] == "ok"
    assert checks["llama-server starts"]["detail"].startswith("version")
    assert checks["nvml"]["status"] in ("ok", "warn")  # warn on a machine without NVIDIA
    text = doctor(daemon)
    assert text.returncode == 0
    assert b"model tiny" in text.stdout


def test_doctor_names_a_missing_model_file(
    make_daemon: Any, model_files: dict[str, Path], tmp_path: Path
) -> None:
    doomed = shutil.copy(model_files["tiny"], tmp_path / "doomed.gguf")
    daemon: Daemon = make_daemon(
        f'[models.tiny]\npath = "{model_files["tiny"]}"\n\n[models.doomed]\npath = "{doomed}"\n',
        start=False,
    )
    daemon.write_config()
    Path(doomed).unlink()
    result = doctor(daemon, "--json")
    assert result.returncode == 1
    checks = checks_of(result)
    assert checks["model doomed"]["status"] == "fail"
    assert "does not exist" in checks["model doomed"]["detail"]
    assert "models.doomed.path" in checks["model doomed"]["hint"]
    assert checks["model tiny"]["status"] == "ok"
    assert checks["config"]["status"] == "fail"
    text = doctor(daemon)
    assert text.returncode == 1
    assert b"hint:" in text.stdout


def test_doctor_with_the_daemon_down(make_daemon: Any, model_files: dict[str, Path]) -> None:
    daemon: Daemon = make_daemon(
        f'[models.tiny]\npath = "{model_files["tiny"]}"\nctx = 256\n', start=False
    )
    daemon.write_config()
    result = doctor(daemon, "--json")
    assert result.returncode == 1
    checks = checks_of(result)
    assert checks["daemon"]["status"] == "fail"
    assert checks["daemon"]["hint"]
    assert checks["config"]["status"] == "ok"


def test_check_config_takes_the_path_as_its_value(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    import subprocess
    import sys

    daemon: Daemon = make_daemon(f'[models.tiny]\npath = "{model_files["tiny"]}"\n', start=False)
    daemon.write_config()
    command = [sys.executable, "-m", "mmd", "--check-config", str(daemon.config_path)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "ok (1 models)" in result.stdout
    daemon.config_path.write_text("[models.x]\npath = 1\n")
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 2
    assert "models.x.path" in result.stderr


def test_doctor_counts_failed_models_apart_from_loaded(
    make_daemon: Any, model_files: dict[str, Path], tmp_path: Path
) -> None:
    broken = Path(shutil.copy(model_files["tiny"], tmp_path / "broken.gguf"))
    daemon: Daemon = make_daemon(
        f'[models.tiny]\npath = "{model_files["tiny"]}"\nctx = 256\n'
        f'[models.broken]\npath = "{broken}"\nctx = 256\n'
    )
    broken.write_bytes(b"GGUF" + bytes(range(256)) * 64)  # the header was read at start
    assert daemon.mmctl("load", "broken").returncode == 6
    assert daemon.mmctl("load", "tiny").returncode == 0
    checks = checks_of(daemon.mmctl("doctor", "--json"))
    assert ", 2 models, 1 loaded, 1 failed, 0 requests running" in checks["daemon"]["detail"]
    assert checks["daemon"]["status"] == "warn"
    assert "mmctl logs broken" in checks["daemon"]["hint"]


def test_doctor_without_a_config_of_its_own_trusts_the_running_daemon(
    make_daemon: Any, model_files: dict[str, Path], tmp_path: Path
) -> None:
    if Path("/etc/mmd/mmd.toml").exists():
        pytest.skip("this machine has a system config for doctor to find")
    daemon: Daemon = make_daemon(f'[models.tiny]\npath = "{model_files["tiny"]}"\nctx = 256\n')
    daemon.extra_env["XDG_CONFIG_HOME"] = str(tmp_path / "no-config-here")
    checks = checks_of(daemon.mmctl("doctor", "--json"))
    assert checks["config"]["status"] == "ok", checks["config"]
    assert checks["config"]["detail"] == (
        f"none found here; the daemon at {daemon.socket} serves from its own config"
    )
    assert checks["daemon"]["status"] == "ok"


def test_doctor_blames_the_budget_setting_when_that_is_what_is_too_small(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(
        f'[budget]\nram = "4MiB"\n[models.tiny]\npath = "{model_files["tiny"]}"\nctx = 256\n',
        start=False,
    )
    daemon.write_config()
    check = checks_of(doctor(daemon, "--json"))["model tiny"]
    assert check["status"] == "fail"
    assert check["hint"].startswith('raise [budget] (ram = "4MiB", reserve_ram = 1.0 GiB)')
