"""A child's failure in one short line: its error messages, not a few hundred characters of
log tail joined with '|'."""

from __future__ import annotations

from mmd.runtime.server import failure_summary

# What the bundled llama-server logs when the model file is garbage (paths shortened).
BROKEN_MODEL_LOG = [
    "0.00.005.190 I llama_model_loader: loaded meta data with 3 key-value pairs",
    "0.00.005.195 E llama_model_load_from_file_impl: failed to load model",
    "0.00.005.197 E cmn  common_init_: failed to load model '/m/broken.gguf'",
    "0.00.005.199 E srv    load_model: failed to load model, '/m/broken.gguf'",
    "0.00.005.200 I srv    operator(): operator(): cleaning up before exit...",
    "0.00.005.447 E srv  llama_server: exiting due to model loading error",
]


def test_the_last_two_error_messages_without_time_level_or_function() -> None:
    assert failure_summary(BROKEN_MODEL_LOG) == (
        "failed to load model, '/m/broken.gguf'; exiting due to model loading error"
    )


def test_repeated_errors_count_once() -> None:
    lines = ["0.00.000.001 E main: out of memory"] * 3
    assert failure_summary(lines) == "out of memory"


def test_a_log_without_llama_errors_gives_its_last_lines() -> None:
    assert failure_summary(["", "/bin/sh: 0: Illegal option --", ""]) == (
        "/bin/sh: 0: Illegal option --"
    )
    assert failure_summary(["a", "b", "c"]) == "b; c"
    assert failure_summary([]) == "it logged nothing"


def test_long_messages_are_cut_to_one_short_line() -> None:
    summary = failure_summary([f"0.00.000.001 E srv  load: {'x' * 1000}"])
    assert len(summary) == 300
    assert summary.endswith("…")
