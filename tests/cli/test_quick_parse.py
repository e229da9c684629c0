"""mmctl.quick.parse: the command lines the quick path serves itself, and every other one
left to the full CLI (None), which then judges it in its own words."""

from __future__ import annotations

import pytest

from mmctl import quick


def test_ps_with_the_socket_before_or_after_the_command() -> None:
    for args in (["ps"], ["--socket", "/s", "ps"], ["ps", "--socket=/s"], ["ps", "--json"]):
        command = quick.parse(args)
        assert command is not None, args
        assert command.name == "ps", args
    assert quick.parse(["--socket", "/s", "ps", "--json"]).json_out  # type: ignore[union-attr]
    assert quick.parse(["ps", "--socket", "/s"]).socket == "/s"  # type: ignore[union-attr]


def test_a_one_shot_infer_with_every_option_it_knows() -> None:
    command = quick.parse(
        [
            "infer",
            "coder",
            "write a haiku",
            "--system",
            "Be brief.",
            "--max-tokens=20",
            "--temperature",
            "0.5",
            "--keep-alive",
            "5m",
            "--json",
        ]
    )
    assert command is not None
    assert command.name == "infer"
    assert command.json_out
    assert command.prompt == "write a haiku"
    assert command.request == {
        "call": "infer",
        "model": "coder",
        "raw": False,
        "system": "Be brief.",
        "max_tokens": 20,
        "temperature": 0.5,
        "keep_alive_seconds": 300.0,
    }


def test_models_and_health_as_json_only() -> None:
    for name in ("models", "health"):
        command = quick.parse([name, "--json"])
        assert command is not None
        assert command.name == name
        assert quick.parse([name]) is None  # the text view draws protobuf messages
        assert quick.parse([name, "--json", "--json"]) is None


def test_the_prompt_from_stdin_when_omitted_or_dash() -> None:
    for args in (["infer", "m"], ["infer", "m", "-"], ["infer", "--raw", "m", "-"]):
        command = quick.parse(args)
        assert command is not None, args
        assert command.prompt in (None, "-"), args


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--help"],
        ["-h"],
        ["--version"],
        ["ps", "--help"],
        ["ps", "extra"],
        ["ps", "--json", "--json"],
        ["ps", "--json=1"],
        ["models"],
        ["load", "m"],
        ["--socket"],
        ["--socket", "", "ps"],
        ["--socket", "/a", "--socket", "/b", "ps"],
        ["infer"],  # no model
        ["infer", "m", "p", "extra"],
        ["infer", "m", "--each-line"],
        ["infer", "m", "--", "-p"],
        ["infer", "m", "-x"],
        ["infer", "m", "--raw", "--system", "S"],  # the full CLI refuses the pair
        ["infer", "m", "--max-tokens", "0"],
        ["infer", "m", "--max-tokens", "many"],
        ["infer", "m", "--max-tokens", "-3"],
        ["infer", "m", "--max-tokens"],
        ["infer", "m", "--max-tokens", "4", "--max-tokens", "5"],
        ["infer", "m", "--temperature", "nan"],
        ["infer", "m", "--temperature", "inf"],
        ["infer", "m", "--temperature", "9"],
        ["infer", "m", "--keep-alive", "soon"],
        ["infer", "m", "--json=yes"],
        ["infer", "m", "--system", "--raw"],
    ],
)
def test_everything_else_goes_to_the_full_cli(args: list[str]) -> None:
    assert quick.parse(args) is None
