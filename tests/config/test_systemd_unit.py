"""The files under systemd/: the unit, sysusers.d, tmpfiles.d and the example config."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from mmd.runtime.synthetic import write_model

REPO = Path(__file__).resolve().parents[2]
SYSTEMD_DIR = REPO / "systemd"
UNIT = SYSTEMD_DIR / "mmd.service"
VERIFY_SCRIPT = REPO / "tests" / "verify_unit.sh"

# CI sets MMD_REQUIRE_SYSTEMD_ANALYZE so that a missing tool fails instead of skipping.
needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None and not os.environ.get("MMD_REQUIRE_SYSTEMD_ANALYZE"),
    reason="systemd-analyze is not installed",
)


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) lists; a key may repeat (e.g. DeviceAllow=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"setting outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=VALUE line: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def _colon_file(path: Path) -> dict[str, list[str]]:
    """/etc/passwd or /etc/group as name -> fields."""
    rows = (line.split(":") for line in path.read_text().splitlines() if line)
    return {fields[0]: fields for fields in rows}


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [value for name, value in section if name == key]


@pytest.fixture(scope="module")
def unit() -> dict[str, list[tuple[str, str]]]:
    return parse_unit(UNIT.read_text())


@needs_systemd_analyze
def test_verify_script_passes() -> None:
    result = subprocess.run(
        ["bash", str(VERIFY_SCRIPT)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok:")


@needs_systemd_analyze
def test_verify_script_rejects_a_broken_unit(tmp_path: Path) -> None:
    (tmp_path / "systemd").mkdir()
    (tmp_path / "tests").mkdir()
    shutil.copy(VERIFY_SCRIPT, tmp_path / "tests" / "verify_unit.sh")
    broken = UNIT.read_text().replace("KillMode=mixed", "KillMode=gently")
    (tmp_path / "systemd" / "mmd.service").write_text(broken)
    result = subprocess.run(
        ["bash", str(tmp_path / "tests" / "verify_unit.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "kill mode" in result.stderr.lower()


def test_unit_key_settings(unit: dict[str, list[tuple[str, str]]]) -> None:
    service = unit["Service"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "WatchdogSec": "30",
        "KillMode": "mixed",
        "OOMPolicy": "continue",
        "TimeoutStopSec": "90",
        "Restart": "on-failure",
        "User": "mmd",
        "Group": "mmd",
        "RuntimeDirectory": "mmd",
        "RuntimeDirectoryMode": "0750",
        "StateDirectory": "mmd",
        "LogsDirectory": "mmd",
        "ConfigurationDirectory": "mmd",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "UMask": "0027",
    }
    for key, value in expected.items():
        assert values(service, key) == [value], key
    assert values(service, "ExecStart") == ["/usr/local/bin/mmd --config /etc/mmd/mmd.toml"]
    assert "MMD_CONFIG=/etc/mmd/mmd.toml" in values(service, "Environment")
    assert values(service, "SupplementaryGroups") == ["video render"]
    assert values(unit["Install"], "WantedBy") == ["multi-user.target"]


def test_unit_keeps_gpus_reachable(unit: dict[str, list[tuple[str, str]]]) -> None:
    service = unit["Service"]
    # Either would hide or break the GPU: /dev/nvidia* and /dev/dri vanish; JIT cannot map code.
    assert "yes" not in values(service, "PrivateDevices")
    assert "yes" not in values(service, "MemoryDenyWriteExecute")
    allowed = values(service, "DeviceAllow")
    for rule in ("char-nvidia rw", "char-nvidia-uvm rw", "char-drm rw"):
        assert rule in allowed
    for rule in allowed:
        specifier, _, access = rule.partition(" ")
        assert specifier.startswith(("char-", "/dev/")), rule
        assert access, rule
        assert set(access) <= set("rwm"), rule


def test_unit_directories_have_the_tmpfiles_modes(unit: dict[str, list[tuple[str, str]]]) -> None:
    service = unit["Service"]
    tmpfiles = {
        fields[1]: fields[2]
        for fields in (line.split() for line in (SYSTEMD_DIR / "mmd.tmpfiles.conf").open())
        if fields and fields[0] == "d"
    }
    for key, path in (
        ("RuntimeDirectoryMode", "/run/mmd"),
        ("StateDirectoryMode", "/var/lib/mmd"),
        ("LogsDirectoryMode", "/var/log/mmd"),
    ):
        assert values(service, key) == [tmpfiles[path]], key


def test_unit_hardening_that_leaves_gpus_alone(unit: dict[str, list[tuple[str, str]]]) -> None:
    service = unit["Service"]
    for key, value in {
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "ProtectClock": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectHostname": "yes",
        "PrivateMounts": "yes",
        "RemoveIPC": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    }.items():
        assert values(service, key) == [value], key
    assert not values(service, "SystemCallFilter")
    assert not values(service, "PrivateUsers")


@needs_systemd_analyze
def test_security_exposure_is_at_most_4(tmp_path: Path) -> None:
    """`systemd-analyze security` scored the unit 6.7 (MEDIUM) before the hardening above."""
    unit = tmp_path / "mmd.service"
    stand_in = shutil.which("true") or "/bin/true"  # ExecStart must exist
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/mmd", stand_in))
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze cannot analyze a unit file offline (systemd < 250)")
    marker = "Overall exposure level for mmd.service: "
    [line] = [line for line in result.stdout.splitlines() if marker in line]
    exposure = float(line.split(marker)[1].split()[0])
    assert exposure <= 4.0, line


def test_sysusers_creates_user_and_gpu_groups(tmp_path: Path) -> None:
    lines = [
        line.split()
        for line in (SYSTEMD_DIR / "mmd.sysusers.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ["m", "mmd", "video"] in lines
    assert ["m", "mmd", "render"] in lines
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.skip("systemd-sysusers is not installed")
    conf_dir = tmp_path / "etc" / "sysusers.d"
    conf_dir.mkdir(parents=True)
    shutil.copy(SYSTEMD_DIR / "mmd.sysusers.conf", conf_dir / "mmd.conf")
    result = subprocess.run(
        [sysusers, f"--root={tmp_path}", "mmd.conf"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    passwd = _colon_file(tmp_path / "etc" / "passwd")
    assert passwd["mmd"][4:6] == ["mmd model daemon", "/var/lib/mmd"]
    groups = {
        name: fields[3].split(",")
        for name, fields in _colon_file(tmp_path / "etc" / "group").items()
    }
    assert "mmd" in groups["video"]
    assert "mmd" in groups["render"]


def test_tmpfiles_directories(tmp_path: Path) -> None:
    entries = {
        fields[1]: fields
        for fields in (
            line.split()
            for line in (SYSTEMD_DIR / "mmd.tmpfiles.conf").read_text().splitlines()
            if line.strip() and not line.startswith("#")
        )
    }
    for path in ("/run/mmd", "/var/lib/mmd", "/var/log/mmd"):
        assert entries[path][0] == "d"
        assert entries[path][2:5] == ["0750", "mmd", "mmd"]
    tmpfiles = shutil.which("systemd-tmpfiles")
    sysusers = shutil.which("systemd-sysusers")
    if tmpfiles is None or sysusers is None or os.geteuid() != 0:
        pytest.skip("applying tmpfiles.d needs systemd-tmpfiles, systemd-sysusers and root")
    for kind, name in (("sysusers.d", "mmd.sysusers.conf"), ("tmpfiles.d", "mmd.tmpfiles.conf")):
        (tmp_path / "etc" / kind).mkdir(parents=True)
        shutil.copy(SYSTEMD_DIR / name, tmp_path / "etc" / kind / "mmd.conf")
    for command in (
        [sysusers, f"--root={tmp_path}", "mmd.conf"],
        [tmpfiles, f"--root={tmp_path}", "--create", "mmd.conf"],
    ):
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
    for path in ("run/mmd", "var/lib/mmd", "var/lib/mmd/models", "var/log/mmd"):
        assert (tmp_path / path).stat().st_mode & 0o777 == 0o750, path


def test_example_config_parses() -> None:
    config = tomllib.loads((SYSTEMD_DIR / "mmd.toml.example").read_text())
    assert set(config) == {"daemon", "budget", "scheduler", "models"}
    models = config["models"]
    assert len(models) == 3
    pinned = [model for model in models.values() if model.get("priority") == 0]
    assert len(pinned) == 1
    assert pinned[0]["embedding"] is True
    assert pinned[0]["args"] == ["--pooling", "mean"]


def test_example_config_describes_min_headroom_as_the_readme_does() -> None:
    """It said "free memory a load must leave behind after eviction": admission, not loads."""
    lines = (SYSTEMD_DIR / "mmd.toml.example").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("min_headroom"))
    comment = " ".join(line.lstrip("# ") for line in lines[at - 2 : at])
    assert "Measured free memory a model's devices need before another request starts" in comment


@pytest.mark.skipif(
    importlib.util.find_spec("mmd.core.footprint") is None,
    reason="mmd.config's imports are missing",
)
def test_example_config_loads_with_mmd(tmp_path: Path) -> None:
    from mmd.config.settings import parse_config

    text = (SYSTEMD_DIR / "mmd.toml.example").read_text()
    text = text.replace("/var/lib/mmd/models/", f"{tmp_path}/")
    for model in tomllib.loads(text)["models"].values():
        write_model(Path(model["path"]))
    config = parse_config(text, tmp_path / "mmd.toml")
    assert [spec.id for spec in config.models.values() if spec.pinned] == ["embed"]
    assert config.models["embed"].embedding
    assert config.models["codellama"].args == ("--flash-attn", "on")
    assert config.daemon.drain_timeout == 30.0
