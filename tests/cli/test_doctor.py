"""mmctl doctor against a real daemon, a broken registry and a daemon that is down."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon

from mmd.host import paths


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
    names = ("llama-server", "llama-server starts", "config", "model tiny", "daemon")
    for name in (*names, "quick commands"):
        assert checks[name]["status"] == "ok", checks[name]
    assert checks["socket"]["status"] == "ok"
    assert checks["llama-server starts"]["detail"].startswith("version")
    assert checks["nvml"]["status"] in ("ok", "warn")  # warn on a machine without NVIDIA
    assert checks["cores"]["status"] == "ok"
    assert checks["cores"]["detail"].endswith(" cores)") or checks["cores"]["detail"].endswith(
        " core)"
    )
    text = doctor(daemon)
    assert text.returncode == 0
    assert b"model tiny" in text.stdout


def test_doctor_warns_when_the_quick_commands_have_no_socket(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(f'[models.tiny]\npath = "{model_files["tiny"]}"\nctx = 256\n')
    paths.json_socket(daemon.socket).unlink()
    result = doctor(daemon, "--json")
    assert result.returncode == 0, result.stdout + result.stderr  # a warning, not a failure
    check = checks_of(result)["quick commands"]
    assert check["status"] == "warn"
    assert "No such file" in check["detail"]
    assert "restart mmd" in check["hint"]


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


# --- the HTTP front door ([http]) -------------------------------------------------------

KEY = "doctor-test-key-0123456789"


def test_doctor_checks_each_http_address_and_probes_the_daemon_there(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    from mmctl.doctor import HttpConfig, check_http
    from mmd.config.http import parse_listen_address
    from mmd.v1 import mmd_pb2

    daemon: Daemon = make_daemon(
        "[http]\n"
        f'listen = ["127.0.0.1:0", "unix:{Path("/tmp") / f"mmd-doc-{os.getpid()}.sock"}"]\n'
        f'api_keys = ["{KEY}"]\n'
        f'[models.tiny]\npath = "{model_files["tiny"]}"\nctx = 256\n'
    )
    result = doctor(daemon, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    checks = checks_of(result)
    unix = f"unix:/tmp/mmd-doc-{os.getpid()}.sock"
    for name in ("http 127.0.0.1:0", f"http {unix}"):
        assert checks[name]["status"] == "ok", checks[name]
        assert checks[name]["detail"].endswith(": GET /health answers"), checks[name]
    assert checks[f"http {unix}"]["detail"].startswith(unix)
    assert checks["http 127.0.0.1:0"]["detail"].startswith("http://127.0.0.1:")
    text = doctor(daemon).stdout.decode()
    assert f"http {unix}" in text

    health = daemon.stub.GetHealth(mmd_pb2.GetHealthRequest(), timeout=10)
    listen = [(a, parse_listen_address(a)) for a in ("127.0.0.1:0", unix)]
    # No key to send: a 401 says the listener is there, and that it wants a key.
    for check in check_http(HttpConfig(list(listen), []), health):
        assert check.status == "ok", check
        assert "needs an API key" in check.detail
    wrong = check_http(HttpConfig([listen[1]], ["wrong-key-0123456789abc"]), health)
    assert [c.status for c in wrong] == ["fail"]
    assert "refused" in wrong[0].detail
    assert "restart mmd" in wrong[0].hint
    elsewhere = "unix:/tmp/mmd-doc-elsewhere.sock"
    missing = check_http(HttpConfig([(elsewhere, parse_listen_address(elsewhere))], []), health)
    assert missing[0].status == "fail"
    assert missing[0].detail.startswith(f"the daemon does not listen on {elsewhere} (it has ")


def test_doctor_says_http_is_off_and_probes_nothing_without_a_daemon(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(
        f'[http]\nlisten = ["8080"]\n[models.tiny]\npath = "{model_files["tiny"]}"\nctx = 256\n',
        start=False,
    )
    daemon.write_config()
    checks = checks_of(doctor(daemon, "--json"))
    assert checks["http 8080"]["status"] == "ok"
    assert checks["http 8080"]["detail"] == (
        "http://127.0.0.1:8080; not probed: the daemon is not running"
    )
    daemon.config_text = f'[models.tiny]\npath = "{model_files["tiny"]}"\nctx = 256\n'
    daemon.write_config()
    checks = checks_of(doctor(daemon, "--json"))
    assert checks["http"] == {
        "name": "http",
        "status": "ok",
        "detail": "off (no [http] listen)",
        "hint": "",
    }


def test_http_addresses_are_checked_one_by_one_in_a_config_that_does_not_load(
    tmp_path: Path,
) -> None:
    from mmctl.doctor import check_http, http_config

    config = tmp_path / "mmd.toml"
    config.write_text('[http]\nlisten = ["127.0.0.1:8080", "nope", "unix:relative.sock", true]\n')
    checks = {c.name: c for c in check_http(http_config(None, config), None)}
    assert checks["http 127.0.0.1:8080"].status == "ok"
    assert checks["http nope"].status == "fail"
    assert "expected HOST:PORT" in checks["http nope"].detail
    assert "HOST:PORT" in checks["http nope"].hint
    assert checks["http unix:relative.sock"].status == "fail"
    assert "absolute" in checks["http unix:relative.sock"].detail
    assert checks["http True"].status == "fail"


def test_http_keys_file_problems_and_a_listener_that_does_not_answer(tmp_path: Path) -> None:
    from mmctl.doctor import HttpConfig, check_http
    from mmd.config.http import parse_listen_address
    from mmd.v1 import mmd_pb2

    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\n")
    keys.chmod(0o644)
    dead = f"unix:{tmp_path / 'dead.sock'}"
    health = mmd_pb2.Health(http_listen=[dead])
    http = HttpConfig([(dead, parse_listen_address(dead))], [], keys)
    checks = {c.name: c for c in check_http(http, health)}
    assert checks["http api_keys_file"].status == "fail"
    assert "chmod o-r" in checks["http api_keys_file"].detail
    assert checks[f"http {dead}"].status == "fail"
    assert checks[f"http {dead}"].detail.startswith(f"nothing answers at {dead}: ")
    assert "restart mmd" in checks[f"http {dead}"].hint
    keys.chmod(0o600)
    checks = {c.name: c for c in check_http(http, health)}
    assert checks["http api_keys_file"].status == "ok"
    assert checks["http api_keys_file"].detail == f"{keys}: 1 key"
