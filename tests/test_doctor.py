"""mmctl doctor against a real daemon, a broken registry and a daemon that is down."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

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
