"""[http] settings: addresses, keys, and the refusals the README promises."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmd.config.http import load_access, parse_listen_address
from mmd.config.settings import parse_config
from mmd.core.errors import ConfigError

KEY = "k" * 16


def http(text: str) -> str:
    return "[http]\n" + text


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:8080", True),
        ("127.1.2.3:8080", True),
        ("[::1]:8080", True),
        ("localhost:8080", True),
        ("8080", True),
        ("unix:/run/mmd/http.sock", True),
        ("0.0.0.0:8080", False),
        ("[::]:8080", False),
        ("192.0.2.7:8080", False),
        ("box.example:8080", False),
    ],
)
def test_loopback_addresses(address: str, loopback: bool) -> None:
    assert parse_listen_address(address).loopback is loopback


def test_bare_port_means_loopback() -> None:
    listen = parse_listen_address("8080")
    assert (listen.host, listen.port) == ("127.0.0.1", 8080)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('listen = ["0.0.0.0:8080"]', "0.0.0.0:8080 can be reached from other machines"),
        ('listen = ["unix:relative.sock"]', "must be absolute"),
        (f'listen = ["unix:/{"x" * 120}"]', "a Unix socket path holds at most"),
        ('listen = ["127.0.0.1:99999"]', "expected HOST:PORT"),
        ("listen = []", "expected a list of addresses"),
        ('listen = ["8080"]\napi_keys = ["short"]', "at least 16 printable characters"),
        ('listen = ["8080"]\napi_keys_file = "keys"', "must be an absolute path"),
        ('listen = ["8080"]\nport = 1', "http.port: unknown key"),
        ('listen = ["8080"]\ninsufficient_memory_status = 500', "expected 507 or 503"),
        ('listen = ["8080"]\ninsufficient_memory_status = true', "expected 507 or 503"),
    ],
)
def test_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="http") as refused:
        parse_config(http(text), None)
    assert message in str(refused.value)


def test_network_address_with_keys_is_accepted() -> None:
    config = parse_config(http(f'listen = ["0.0.0.0:8080", 9000]\napi_keys = ["{KEY}"]'), None)
    assert [a.text for a in config.http.listen] == ["0.0.0.0:8080", "9000"]
    assert load_access(config.http).keys == frozenset({KEY})


def test_keys_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# comment\n\n{KEY}\n{'z' * 20}\n")
    keys.chmod(0o640)
    config = parse_config(
        http(f'listen = ["0.0.0.0:1"]\napi_keys_file = "{keys}"\napi_keys = ["{"y" * 16}"]'), None
    )
    assert load_access(config.http).keys == frozenset({KEY, "z" * 20, "y" * 16})
    keys.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="has no keys"):
        parse_config(http(f'listen = ["8080"]\napi_keys_file = "{keys}"'), None)


def test_insufficient_memory_status() -> None:
    assert parse_config(http('listen = ["8080"]'), None).http.insufficient_memory_status == 507
    config = parse_config(http('listen = ["8080"]\ninsufficient_memory_status = 503'), None)
    assert config.http.insufficient_memory_status == 503


def test_no_http_table_is_off() -> None:
    config = parse_config("", None)
    assert not config.http.enabled
    assert not load_access(config.http).required


def test_changing_http_needs_a_restart() -> None:
    from mmd.engine.reload import diff_configs, keep_restart_settings

    old = parse_config(http('listen = ["8080"]'), None)
    new = parse_config(http(f'listen = ["8081"]\napi_keys = ["{KEY}"]'), None)
    diff = diff_configs(old, new)
    assert set(diff.restart_needed) == {"http.listen", "http.api_keys"}
    assert "http.listen (needs a restart)" in diff.changed_entries()
    assert keep_restart_settings(old, new).http == old.http
