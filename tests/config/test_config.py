"""The TOML config: every key and table, the lookup order, and one clear error per mistake.

Every error must name the file, the key and the problem, on one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmd.config.settings import (
    find_config,
    load_config,
    parse_config,
)
from mmd.core.errors import ConfigError
from mmd.core.units import GIB, MIB, parse_keep_alive
from mmd.host import paths
from mmd.runtime.synthetic import write_model

IS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny, valid GGUF model for the registry entries."""
    return write_model(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return tmp_path / "mmd.toml"


def config_error(text: str, source: Path) -> str:
    """The one-line ConfigError message for ``text``; it must start with the file's name."""
    with pytest.raises(ConfigError) as err:
        parse_config(textwrap.dedent(text), source)
    message = str(err.value)
    assert message.startswith(f"{source}: "), message
    assert "\n" not in message
    return message


@pytest.fixture
def no_config_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No $MMD_CONFIG, an empty XDG config home and a system config path under tmp_path."""
    monkeypatch.delenv(paths.CONFIG_ENV, raising=False)
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    monkeypatch.setattr(paths, "SYSTEM_CONFIG", tmp_path / "etc" / "mmd" / "mmd.toml")
    return xdg


# --- a good config ---------------------------------------------------------------------


def test_every_key_of_every_table_is_parsed(gguf: Path, source: Path) -> None:
    text = f"""
    [daemon]
    socket = "/run/test-mmd/mmd.sock"
    llama_server = "/opt/llama/bin/llama-server"
    state_dir = "/var/lib/test-mmd"
    log_dir = "/var/log/test-mmd"
    load_timeout = "2m"
    stop_grace = "3s"
    drain_timeout = 45
    unload_timeout = "1.5s"
    max_prompt_bytes = "64KiB"
    stream_interval = "25ms"

    [budget]
    gpu = "90%"
    ram = "20GiB"
    reserve_gpu = "256MiB"
    reserve_ram = 1073741824
    alert_percent = 75.5

    [scheduler]
    max_concurrent = 4
    max_queue = 0
    min_headroom = "1GiB"
    autoload = false
    default_keep_alive = "10m"
    min_residency = "500ms"
    swap_batch = 3

    [models.coder]
    path = "{gguf}"
    role = "coding"
    ctx = 8192
    parallel = 2
    gpu_layers = 2
    priority = 3
    keep_alive = "1h"
    embedding = false
    args = ["--flash-attn", "on"]
    memory = "1.5GiB"
    preload = true

    [models.embed]
    path = "{gguf}"
    gpu_layers = "auto"
    priority = 0
    keep_alive = -1
    embedding = true
    """
    config = parse_config(textwrap.dedent(text), source)
    assert config.source == source
    daemon = config.daemon
    assert daemon.socket == Path("/run/test-mmd/mmd.sock")
    assert daemon.llama_server == "/opt/llama/bin/llama-server"
    assert daemon.state_dir == Path("/var/lib/test-mmd")
    assert daemon.log_dir == Path("/var/log/test-mmd")
    assert daemon.load_timeout == 120.0
    assert daemon.stop_grace == 3.0
    assert daemon.drain_timeout == 45.0
    assert daemon.unload_timeout == 1.5
    assert daemon.max_prompt_bytes == 64 * 1024
    assert daemon.stream_interval == 0.025
    budget = config.budget
    assert (budget.gpu, budget.ram) == ("90%", "20GiB")
    assert (budget.reserve_gpu, budget.reserve_ram) == (256 * MIB, GIB)
    assert budget.alert_percent == 75.5
    scheduler = config.scheduler
    assert (scheduler.max_concurrent, scheduler.max_queue, scheduler.swap_batch) == (4, 0, 3)
    assert scheduler.min_headroom == GIB
    assert scheduler.autoload is False
    assert scheduler.default_keep_alive == 600.0
    assert scheduler.min_residency == 0.5
    coder = config.models["coder"]
    assert (coder.id, coder.path, coder.role) == ("coder", gguf, "coding")
    assert (coder.ctx, coder.parallel, coder.gpu_layers, coder.priority) == (8192, 2, 2, 3)
    assert coder.keep_alive == 3600.0
    assert coder.args == ("--flash-attn", "on")
    assert coder.memory == int(1.5 * GIB)
    assert (coder.preload, coder.embedding, coder.pinned) == (True, False, False)
    embed = config.models["embed"]
    assert embed.gpu_layers is None  # "auto": the planner decides
    assert (embed.pinned, embed.embedding) == (True, True)
    assert embed.keep_alive == -1.0  # forever
    assert (embed.ctx, embed.parallel, embed.memory, embed.role) == (4096, 1, None, "")


def test_an_empty_file_gives_the_defaults(source: Path) -> None:
    config = parse_config("", source)
    assert config.models == {}
    assert config.daemon.max_prompt_bytes == MIB
    assert config.budget.gpu == config.budget.ram == "auto"
    assert config.scheduler.autoload is True


def test_relative_paths_resolve_against_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "etc"
    write_model(config_dir / "models" / "m.gguf")
    (config_dir / "mmd.toml").write_text(
        '[daemon]\nsocket = "run/mmd.sock"\nlog_dir = "logs"\n\n'
        '[models.m]\npath = "models/m.gguf"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(Path("../etc/mmd.toml"))
    assert config.models["m"].path == config_dir.resolve() / "models" / "m.gguf"
    assert config.daemon.socket == config_dir.resolve() / "run" / "mmd.sock"
    assert config.daemon.log_dir == config_dir.resolve() / "logs"


def test_home_in_a_model_path_is_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    write_model(tmp_path / "models" / "h.gguf")
    config = parse_config('[models.h]\npath = "~/models/h.gguf"\n', source)
    assert config.models["h"].path == tmp_path / "models" / "h.gguf"


# --- lookup order ------------------------------------------------------------------------


def _write(path: Path, socket_name: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[daemon]\nsocket = "/run/{socket_name}.sock"\n')
    return path


def test_lookup_order_flag_env_xdg_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_config_env: Path
) -> None:
    flag = _write(tmp_path / "flag.toml", "flag")
    env = _write(tmp_path / "env.toml", "env")
    xdg = _write(no_config_env / "mmd" / "mmd.toml", "xdg")
    system = _write(paths.SYSTEM_CONFIG, "system")
    monkeypatch.setenv(paths.CONFIG_ENV, str(env))
    assert load_config(flag).daemon.socket == Path("/run/flag.sock")
    assert load_config().daemon.socket == Path("/run/env.sock")
    monkeypatch.delenv(paths.CONFIG_ENV)
    assert find_config(None) == xdg
    assert load_config().daemon.socket == Path("/run/xdg.sock")
    xdg.unlink()
    assert find_config(None) == system
    assert load_config().daemon.socket == Path("/run/system.sock")


def test_no_config_anywhere_gives_an_empty_registry(no_config_env: Path) -> None:
    assert find_config(None) is None
    config = load_config()
    assert config.source is None
    assert config.models == {}


def test_mmd_config_naming_a_missing_file_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_config_env: Path
) -> None:
    # A typo in $MMD_CONFIG must not silently fall through to another file.
    _write(no_config_env / "mmd" / "mmd.toml", "xdg")
    missing = tmp_path / "typo.toml"
    monkeypatch.setenv(paths.CONFIG_ENV, str(missing))
    with pytest.raises(ConfigError, match=f"{missing}: config file does not exist"):
        load_config()


def test_config_flag_naming_a_missing_file_or_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=f"{tmp_path}: is a directory"):
        load_config(tmp_path)


@pytest.mark.skipif(IS_ROOT, reason="root reads files whatever their mode")
def test_unreadable_config_file(source: Path) -> None:
    source.write_text("")
    source.chmod(0)
    with pytest.raises(ConfigError, match="permission denied"):
        load_config(source)


def test_keep_alive_is_0_or_more_or_minus_1() -> None:
    assert [parse_keep_alive(v) for v in ("5m", 0, "0s", -1, "-1", "-1s", -1.0)] == [
        300.0,
        0.0,
        0.0,
        -1.0,
        -1.0,
        -1.0,
        -1.0,
    ]
    for negative in ("-2s", -5, "-0.5", "-1m"):
        with pytest.raises(ValueError, match="must be 0 or more, or -1 to never unload"):
            parse_keep_alive(negative)


# --- one error per mistake ----------------------------------------------------------------

# (name, TOML with {gguf} for a valid model path, fragments the message must contain)
BAD_CONFIGS = [
    ("unknown-top-level-key", "colour = 1\n", ["colour: unknown key", "known tables"]),
    ("unknown-daemon-key", '[daemon]\nsockett = "/x"\n', ["daemon.sockett: unknown key"]),
    ("unknown-budget-key", '[budget]\ngpus = "auto"\n', ["budget.gpus: unknown key"]),
    ("unknown-scheduler-key", "[scheduler]\nmax_conc = 2\n", ["scheduler.max_conc: unknown"]),
    ("unknown-model-key", "contxt = 4096\n", ["models.m.contxt: unknown key", "known: args"]),
    ("ctx-as-string", 'ctx = "4096"\n', ["models.m.ctx", "expected an integer", "'4096'"]),
    ("ctx-as-float", "ctx = 4096.0\n", ["models.m.ctx", "expected an integer"]),
    ("role-as-list", 'role = ["chat"]\n', ["models.m.role", "expected a string"]),
    ("embedding-as-string", 'embedding = "yes"\n', ["models.m.embedding", "true or false"]),
    ("args-as-string", 'args = "--flash-attn on"\n', ["models.m.args", "list of strings"]),
    ("args-with-number", "args = ['--threads', 4]\n", ["models.m.args", "list of strings"]),
    ("args-override-ctx", "args = ['--ctx-size', '8192']\n", ["models.m.args", "ctx key"]),
    ("args-override-host", "args = ['--host=0.0.0.0']\n", ["models.m.args", "--host is set"]),
    ("ctx-zero", "ctx = 0\n", ["models.m.ctx", "must be between 64", "got 0"]),
    ("parallel-zero", "parallel = 0\n", ["models.m.parallel", "must be between 1", "got 0"]),
    ("priority-negative", "priority = -1\n", ["models.m.priority", "between 0", "got -1"]),
    ("gpu-layers-negative", "gpu_layers = -1\n", ["models.m.gpu_layers", '"auto"']),
    ("gpu-layers-word", 'gpu_layers = "all"\n', ["models.m.gpu_layers", "'all'"]),
    ("keep-alive-word", 'keep_alive = "forever"\n', ["models.m.keep_alive", "not a duration"]),
    (
        "keep-alive-negative",
        'keep_alive = "-2s"\n',
        ["models.m.keep_alive: must be 0 or more, or -1 to never unload, got '-2s'"],
    ),
    (
        "default-keep-alive-negative",
        "[scheduler]\ndefault_keep_alive = -5\n",
        ["scheduler.default_keep_alive: must be 0 or more, or -1"],
    ),
    (
        "gpu-layers-beyond-the-model",
        "gpu_layers = 999\n",
        ["models.m.gpu_layers: 999, but tiny.gguf has only 2 layers"],
    ),
    ("memory-negative", "memory = -1\n", ["models.m.memory", "must not be negative"]),
    ("memory-negative-size", 'memory = "-1GiB"\n', ["models.m.memory", "must not be negative"]),
    ("memory-zero", "memory = 0\n", ["models.m.memory", "more than 0 bytes"]),
    ("memory-word", 'memory = "huge"\n', ["models.m.memory", "not a size"]),
    ("budget-percent-over", '[budget]\ngpu = "150%"\n', ["budget.gpu", "at most 100%"]),
    ("budget-negative", '[budget]\nram = "-1GiB"\n', ["budget.ram", "must not be negative"]),
    ("budget-word", '[budget]\nram = "lots"\n', ["budget.ram", "not a memory budget", "'lots'"]),
    ("budget-number", "[budget]\ngpu = 90\n", ["budget.gpu", "expected a string"]),
    ("reserve-negative", "[budget]\nreserve_ram = -5\n", ["budget.reserve_ram", "negative"]),
    ("alert-zero", "[budget]\nalert_percent = 0\n", ["budget.alert_percent", "between 0"]),
    ("concurrent-zero", "[scheduler]\nmax_concurrent = 0\n", ["scheduler.max_concurrent"]),
    ("queue-negative", "[scheduler]\nmax_queue = -1\n", ["scheduler.max_queue", "got -1"]),
    ("autoload-string", '[scheduler]\nautoload = "true"\n', ["scheduler.autoload", "true or"]),
    ("residency-negative", '[scheduler]\nmin_residency = "-1s"\n', ["min_residency", "negative"]),
    ("load-timeout-zero", '[daemon]\nload_timeout = "0s"\n', ["daemon.load_timeout", "positive"]),
    ("timeout-word", '[daemon]\nstop_grace = "soon"\n', ["daemon.stop_grace", "not a duration"]),
    ("prompt-limit-zero", "[daemon]\nmax_prompt_bytes = 0\n", ["daemon.max_prompt_bytes"]),
    ("interval-negative", '[daemon]\nstream_interval = "-5ms"\n', ["stream_interval", "negative"]),
    ("socket-number", "[daemon]\nsocket = 5\n", ["daemon.socket", "expected a string"]),
    ("socket-empty", '[daemon]\nsocket = ""\n', ["daemon.socket", "must not be empty"]),
    ("llama-server-empty", '[daemon]\nllama_server = ""\n', ["daemon.llama_server", "empty"]),
    ("daemon-not-a-table", "daemon = 3\n", ["[daemon] must be a table"]),
    ("models-not-a-table", "models = 5\n", ["[models] must be a table"]),
    ("model-not-a-table", "[models]\nm = 1\n", ["[models.m] must be a table"]),
    ("path-number", "[models.n]\npath = 5\n", ["models.n.path", "expected a string"]),
    ("path-empty", '[models.n]\npath = ""\n', ["models.n.path", "must not be empty"]),
    ("path-missing", '[models.n]\nrole = "chat"\n', ["models.n.path: missing"]),
    ("id-with-space", "[models.'a b']\npath = '{gguf}'\n", ["models.a b", "model id must be"]),
    ("id-leading-dash", "[models.'-x']\npath = '{gguf}'\n", ["models.-x", "model id must be"]),
    ("id-non-ascii", "[models.'modèle']\npath = '{gguf}'\n", ["models.modèle", "model id"]),
    ("id-too-long", f"[models.{'a' * 65}]\npath = '{{gguf}}'\n", ["model id must be 1-64"]),
    (
        "duplicate-table",
        "[models.x]\npath = '{gguf}'\n[models.x]\npath = '{gguf}'\n",
        ["invalid TOML", "Cannot declare ('models', 'x') twice", "duplicate model id"],
    ),
    (
        "duplicate-id-differing-in-case",
        "[models.Tiny]\npath = '{gguf}'\n[models.tiny]\npath = '{gguf}'\n",
        ["models.tiny: duplicate model id", "models.Tiny only in case"],
    ),
    ("malformed-toml", "[models.m\npath = 1\n", ["invalid TOML", "line 1"]),
    ("unterminated-string", '[daemon]\nsocket = "/x\n', ["invalid TOML", "line 2"]),
]


@pytest.mark.parametrize(
    ("snippet", "fragments"),
    [pytest.param(snippet, fragments, id=name) for name, snippet, fragments in BAD_CONFIGS],
)
def test_bad_config_is_one_clear_error(
    gguf: Path, source: Path, snippet: str, fragments: list[str]
) -> None:
    if snippet.startswith(("[", "colour", "daemon", "models")):
        text = snippet
    else:  # a key of one otherwise valid model
        text = f"[models.m]\npath = '{{gguf}}'\n{snippet}"
    message = config_error(text.replace("{gguf}", str(gguf)), source)
    for fragment in fragments:
        assert fragment in message, message


def test_socket_path_too_long_to_bind(source: Path) -> None:
    long_socket = "/run/" + "d" * paths.MAX_SOCKET_PATH_BYTES + "/mmd.sock"
    message = config_error(f'[daemon]\nsocket = "{long_socket}"\n', source)
    assert "daemon.socket" in message
    assert f"at most {paths.MAX_SOCKET_PATH_BYTES}" in message


# --- the model file itself -------------------------------------------------------------------


def model_file_error(path: Path, source: Path) -> str:
    message = config_error(f"[models.m]\npath = '{path}'\n", source)
    assert "models.m.path" in message
    assert str(path) in message
    return message


def test_model_path_that_does_not_exist(tmp_path: Path, source: Path) -> None:
    assert "does not exist" in model_file_error(tmp_path / "gone.gguf", source)


def test_model_path_that_is_a_directory(tmp_path: Path, source: Path) -> None:
    (tmp_path / "dir.gguf").mkdir()
    assert "is a directory" in model_file_error(tmp_path / "dir.gguf", source)


def test_model_path_that_is_a_symlink_to_nowhere(tmp_path: Path, source: Path) -> None:
    link = tmp_path / "link.gguf"
    link.symlink_to(tmp_path / "nowhere.gguf")
    assert "a symlink to nowhere" in model_file_error(link, source)


def test_model_path_through_a_good_symlink(gguf: Path, tmp_path: Path, source: Path) -> None:
    link = tmp_path / "link.gguf"
    link.symlink_to(gguf)
    assert parse_config(f"[models.m]\npath = '{link}'\n", source).models["m"].path == link


def test_model_file_that_is_not_gguf(tmp_path: Path, source: Path) -> None:
    text_file = tmp_path / "notes.gguf"
    text_file.write_text("these are not weights\n")
    assert "is not a GGUF file" in model_file_error(text_file, source)


def test_model_file_that_is_empty(tmp_path: Path, source: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.touch()
    assert "is empty" in model_file_error(empty, source)


def test_model_file_with_gguf_magic_and_garbage(tmp_path: Path, source: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    assert "unreadable GGUF file" in model_file_error(broken, source)


@pytest.mark.skipif(IS_ROOT, reason="root reads files whatever their mode")
def test_model_file_that_cannot_be_read(gguf: Path, tmp_path: Path, source: Path) -> None:
    private = tmp_path / "private.gguf"
    private.write_bytes(gguf.read_bytes())
    private.chmod(0)
    assert "cannot be read" in model_file_error(private, source)


# --- encoding and hostile files ------------------------------------------------------------


def test_config_that_is_not_utf8(source: Path) -> None:
    source.write_bytes(b'[models.m]\nrole = "caf\xe9"\n')
    with pytest.raises(ConfigError) as err:
        load_config(source)
    assert str(err.value) == f"{source}: not UTF-8 text (byte 0xe9 at offset 22)"


def test_deeply_nested_arrays_are_refused_not_a_crash(source: Path) -> None:
    depth = 100_000
    message = config_error("x = " + "[" * depth + "]" * depth + "\n", source)
    assert "nested too deeply" in message


def test_ten_megabyte_string_is_refused(source: Path) -> None:
    huge = 'role = "' + "x" * 10_000_000 + '"\n'
    source.write_text(huge)
    with pytest.raises(ConfigError, match="larger than 1048576 bytes; refused unread"):
        load_config(source)
    assert "the limit is" in config_error(huge, source)


# --- mmd --check-config ----------------------------------------------------------------------


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in (paths.CONFIG_ENV, paths.SOCKET_ENV)}
    return subprocess.run(
        [sys.executable, "-m", "mmd", "--check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_check_config_accepts_a_good_file(gguf: Path, source: Path) -> None:
    source.write_text(f"[models.a]\npath = '{gguf}'\n[models.b]\npath = '{gguf}'\nctx = 256\n")
    result = check_config(source)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{source}: ok (2 models), llama-server ")
    assert result.stderr == ""


def test_check_config_rejects_a_bad_file_with_one_line(gguf: Path, source: Path) -> None:
    source.write_text(f"[models.a]\npath = '{gguf}'\nctx = 0\n")
    result = check_config(source)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"mmd: {source}: models.a.ctx: must be between 64 and 4194304, got 0"
    ]


def test_check_config_on_hostile_nesting_exits_2_with_one_line(source: Path) -> None:
    source.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    result = check_config(source)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"mmd: {source}: invalid TOML: values nested too deeply"]


def test_check_config_on_a_missing_file(tmp_path: Path) -> None:
    result = check_config(tmp_path / "nope.toml")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"mmd: {tmp_path / 'nope.toml'}: config file does not exist"
    ]


def test_child_sockets_use_the_id_or_a_hash_that_fits(tmp_path: Path) -> None:
    system = paths.children_dir(Path("/run/mmd/mmd.sock"))
    assert system == Path("/run/mmd/mmd.sock.d")
    assert paths.child_socket(system, "coder") == Path("/run/mmd/mmd.sock.d/coder.sock")
    runtime = paths.children_dir(Path("/run/user/1000/" + "r" * 50) / "mmd.sock")
    long_a, long_b = "a" * 64, "b" * 64
    hashed = paths.child_socket(runtime, long_a)
    assert hashed.parent == runtime
    assert len(str(hashed)) <= paths.MAX_SOCKET_PATH_BYTES
    assert hashed == paths.child_socket(runtime, long_a)  # stable across loads
    assert hashed != paths.child_socket(runtime, long_b)


def daemon_table(tmp_path: Path, **keys: str) -> str:
    """A [daemon] table whose directories lie in tmp_path, with ``keys`` on top."""
    values = {
        "socket": str(tmp_path / "run" / "mmd.sock"),
        "log_dir": str(tmp_path / "logs"),
        "state_dir": str(tmp_path / "state"),
        **keys,
    }
    return "[daemon]\n" + "".join(f'{key} = "{value}"\n' for key, value in values.items())


def test_check_config_creates_nothing(gguf: Path, source: Path, tmp_path: Path) -> None:
    source.write_text(daemon_table(tmp_path) + f"[models.a]\npath = '{gguf}'\n")
    result = check_config(source)
    assert result.returncode == 0, result.stderr
    assert not [p.name for p in tmp_path.iterdir() if p != source]


def test_check_config_finds_a_missing_llama_server(source: Path, tmp_path: Path) -> None:
    missing = tmp_path / "bin" / "llama-server"
    source.write_text(daemon_table(tmp_path, llama_server=str(missing)))
    result = check_config(source)
    assert result.returncode == 4  # as the daemon's start
    assert result.stderr.splitlines() == [
        f"mmd: llama-server not found; tried config daemon.llama_server={missing} "
        "(not an executable file)"
    ]


def test_check_config_runs_the_llama_server_check(source: Path, tmp_path: Path) -> None:
    """/bin/sh is an executable, but no llama-server: the daemon would serve and fail
    every load; --check-config says so now."""
    source.write_text(daemon_table(tmp_path, llama_server="/bin/sh"))
    result = check_config(source)
    assert result.returncode == 4
    [line] = result.stderr.splitlines()
    assert line.startswith("mmd: llama-server /bin/sh cannot load a model: "), line
    assert result.stdout == ""


def test_check_config_refuses_gpu_layers_beyond_the_model(
    gguf: Path, source: Path, tmp_path: Path
) -> None:
    source.write_text(daemon_table(tmp_path) + f"[models.a]\npath = '{gguf}'\ngpu_layers = 999\n")
    result = check_config(source)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"mmd: {source}: models.a.gpu_layers: 999, but tiny.gguf has only 2 layers"
    ]


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        ('keep_alive = "-2s"', "models.a.keep_alive: must be 0 or more, or -1 to never unload"),
        ("keep_alive = -5", "models.a.keep_alive: must be 0 or more, or -1 to never unload"),
    ],
)
def test_check_config_refuses_negative_keep_alive(
    gguf: Path, source: Path, tmp_path: Path, snippet: str, message: str
) -> None:
    source.write_text(daemon_table(tmp_path) + f"[models.a]\npath = '{gguf}'\n{snippet}\n")
    result = check_config(source)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"mmd: {source}: {message}"), line


def test_check_config_refuses_directories_under_a_file(source: Path, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    sockets = tmp_path / "a-file" / "run"
    source.write_text(daemon_table(tmp_path, socket=str(sockets / "mmd.sock")))
    result = check_config(source)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"mmd: cannot create socket directory {sockets}: Not a directory"
    ]
    logs = tmp_path / "a-file" / "logs"
    source.write_text(daemon_table(tmp_path, log_dir=str(logs)))
    result = check_config(source)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"mmd: cannot create log directory {logs} (daemon.log_dir): Not a directory"
    ]


@pytest.mark.skipif(IS_ROOT, reason="root writes into any directory whatever its mode")
def test_check_config_refuses_an_unwritable_socket_directory(source: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        source.write_text(daemon_table(tmp_path, socket=str(locked / "mmd.sock")))
        result = check_config(source)
    finally:
        locked.chmod(0o700)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"mmd: socket directory {locked} is not writable"]
