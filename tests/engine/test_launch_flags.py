"""The options mmd adds to a child's argv so that memory is accounted on every device:
``--device none`` for a CPU placement, ``--verbosity 4`` for the buffer-size lines."""

from __future__ import annotations

from pathlib import Path

from mmd.engine.children import RUNTIME_LOG_VERBOSITY, launch_flags
from mmd.runtime.server import LaunchSpec, build_argv, probe_binary, resolve_llama_server

BOTH = frozenset({"--device", "--verbosity", "--fit"})


def spec(**kw: object) -> LaunchSpec:
    base: dict[str, object] = {
        "model_id": "m",
        "model_path": Path("/models/m.gguf"),
        "socket": Path("/run/mmd/children/m.sock"),
        "log_path": Path("/var/log/mmd/m.log"),
        "ctx": 2048,
        "parallel": 1,
        "gpu_layers": 0,
    }
    return LaunchSpec(**{**base, **kw})  # type: ignore[arg-type]


def test_a_cpu_placement_gets_no_gpu_device() -> None:
    assert launch_flags(BOTH, 0) == (True, RUNTIME_LOG_VERBOSITY)
    # Any offload needs the GPU backends.
    assert launch_flags(BOTH, 1) == (False, RUNTIME_LOG_VERBOSITY)


def test_options_the_binary_does_not_list_are_not_passed() -> None:
    assert launch_flags(frozenset({"--fit"}), 0) == (False, None)
    argv = build_argv(Path("/bin/llama-server"), spec())
    assert "--device" not in argv
    assert "--verbosity" not in argv


def test_argv_carries_the_flags_before_the_models_own_args() -> None:
    argv = build_argv(
        Path("/bin/llama-server"),
        spec(no_devices=True, log_verbosity=4, extra_args=("--device", "Vulkan0")),
    )
    assert argv[-2:] == ["--device", "Vulkan0"]  # the registry's args come last and win
    mmd_part = argv[:-2]
    at = mmd_part.index("--device")
    assert mmd_part[at : at + 2] == ["--device", "none"]
    at = mmd_part.index("--verbosity")
    assert mmd_part[at : at + 2] == ["--verbosity", "4"]


def test_the_bundled_llama_server_lists_both_options() -> None:
    _, options = probe_binary(resolve_llama_server(None))
    assert launch_flags(options, 0) == (True, RUNTIME_LOG_VERBOSITY)


def test_the_host_prompt_cache_is_off_unless_the_model_asks_for_it() -> None:
    """llama-server's prompt cache (up to 8 GiB of host memory by default) is outside mmd's
    plan; a model's own args may turn it back on."""
    argv = build_argv(Path("/bin/llama-server"), spec(supports_cache_ram=True))
    at = argv.index("--cache-ram")
    assert argv[at : at + 2] == ["--cache-ram", "0"]
    assert "--cache-ram" not in build_argv(Path("/bin/llama-server"), spec())
    own = build_argv(
        Path("/bin/llama-server"),
        spec(supports_cache_ram=True, extra_args=("--cache-ram", "512")),
    )
    assert own[-2:] == ["--cache-ram", "512"]
    _, options = probe_binary(resolve_llama_server(None))
    assert "--cache-ram" in options  # so the bundled build runs with it off
