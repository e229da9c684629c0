"""A prompt goes through the model's chat template when its GGUF file has one (mode "chat"),
else as it is (mode "raw"), or as it is on request (--raw, "raw"). A request to a model
without a template gets one warning line: a chat is then formatted as ChatML, which such a
model may not know (the Gemma demo model answered with ChatML's markers), and a prompt is
sent for the model to continue."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from conftest import CHATML, Daemon
from test_http_api import http_base

from mmd.runtime.gguf import has_chat_template
from mmd.runtime.synthetic import write_model
from mmd.v1 import mmd_pb2 as pb

GREEDY = ("--max-tokens", "4", "--temperature", "0")  # the same answer every time


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("chat")
    return {
        "plain": write_model(base / "plain.gguf"),
        "chat": write_model(base / "chat.gguf", seed=1, chat_template=CHATML),
    }


def test_has_chat_template_reads_the_metadata(models: dict[str, Path], tmp_path: Path) -> None:
    assert has_chat_template(models["plain"]) is False
    assert has_chat_template(models["chat"]) is True
    assert has_chat_template(tmp_path / "missing.gguf") is None
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"nope" * 10)
    assert has_chat_template(not_gguf) is None
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(models["chat"].read_bytes()[:200])  # ends inside the metadata
    assert has_chat_template(cut) is None


def test_a_chat_without_a_template_warns_once_per_request(
    make_daemon: Any, models: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(
        f'[models.plain]\npath = "{models["plain"]}"\nctx = 256\n'
        f'[models.chat]\npath = "{models["chat"]}"\nctx = 256\n'
    )
    chat_warning = (
        "mmctl: warning: model 'plain' has no chat template in its GGUF file (no "
        "tokenizer.chat_template): llama-server formats the chat as ChatML, which the model "
        "may not follow; without --system (or messages) the prompt is sent as it is"
    )
    raw_warning = (
        "mmctl: warning: model 'plain' has no chat template in its GGUF file (no "
        "tokenizer.chat_template): the prompt is sent as it is, for the model to continue"
    )
    for _ in range(2):
        result = daemon.mmctl("infer", "plain", "hi", "--system", "Be brief.", "--max-tokens", "4")
        assert result.returncode == 0, result.stderr
        assert result.stderr.decode().splitlines() == [chat_warning]
        assert result.stdout.strip()
    plain = daemon.mmctl("infer", "plain", "hi", "--max-tokens", "4")
    assert plain.returncode == 0, plain.stderr
    assert plain.stderr.decode().splitlines() == [raw_warning]
    asked_raw = daemon.mmctl("infer", "plain", "hi", "--raw", "--max-tokens", "4")
    assert (asked_raw.returncode, asked_raw.stderr) == (0, b"")
    templated = daemon.mmctl("infer", "chat", "hi", "--system", "Be brief.", "--max-tokens", "4")
    assert (templated.returncode, templated.stderr) == (0, b"")
    # The daemon's log says each once per model.
    log = daemon.log_path.read_text()
    assert log.count("has no chat template") == 2
    assert log.count("llama-server formats the chat as ChatML") == 1


def infer_json(daemon: Daemon, *args: str) -> dict[str, Any]:
    result = daemon.mmctl("infer", *args, "--json")
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def test_a_prompt_goes_through_the_template_when_the_model_has_one(
    make_daemon: Any, models: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(
        f'[models.plain]\npath = "{models["plain"]}"\nctx = 256\n'
        f'[models.chat]\npath = "{models["chat"]}"\nctx = 256\n'
    )
    chat = infer_json(daemon, "chat", "hi", *GREEDY)
    raw = infer_json(daemon, "chat", "hi", "--raw", *GREEDY)
    assert (chat["mode"], raw["mode"]) == ("chat", "raw")
    # ChatML's markers around the turn are what the model read: many more tokens than
    # "hi" alone.
    assert chat["prompt_tokens"] > raw["prompt_tokens"] + 10
    assert infer_json(daemon, "chat", "hi", "--system", "Be brief.", *GREEDY)["mode"] == "chat"
    assert infer_json(daemon, "plain", "hi", *GREEDY)["mode"] == "raw"
    assert infer_json(daemon, "plain", "hi", "--system", "Be brief.", *GREEDY)["mode"] == "chat"
    # Piped, stdout is the answer and nothing else (greedy: the same answer as above).
    piped = daemon.mmctl("infer", "chat", "hi", *GREEDY)
    assert (piped.returncode, piped.stderr) == (0, b"")
    text = chat["text"]
    assert piped.stdout.decode() == text + ("" if text.endswith("\n") else "\n")
    # --raw sends no chat, so it cannot take a system prompt.
    both = daemon.mmctl("infer", "chat", "hi", "--raw", "--system", "Be brief.")
    assert both.returncode == 2
    assert both.stderr.decode().startswith("mmctl: Invalid value: --raw sends the prompt as it")
    assert both.stdout == b""


def test_grpc_and_http_choose_the_same_mode(make_daemon: Any, models: dict[str, Path]) -> None:
    daemon: Daemon = make_daemon(
        '[http]\nlisten = ["127.0.0.1:0"]\n'
        f'[models.plain]\npath = "{models["plain"]}"\nctx = 256\n'
        f'[models.chat]\npath = "{models["chat"]}"\nctx = 256\n'
    )
    base = http_base(daemon)
    for model, raw, mode in [
        ("chat", False, "chat"),
        ("chat", True, "raw"),
        ("plain", False, "raw"),
        ("plain", True, "raw"),
    ]:
        request = pb.InferRequest(model_id=model, prompt="hi", max_tokens=2, raw=raw)
        call = daemon.stub.Infer(request, timeout=60)
        chunks = list(call)
        assert chunks[-1].done.mode == mode
        grpc_warned = any(key == "mmd-warning" for key, _ in call.initial_metadata())
        body = {"model": model, "prompt": "hi", "max_tokens": 2, "raw": raw}
        answer = httpx.post(base + "/infer", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["mode"] == mode
        # The same warning both ways: only for a prompt to a model without a template
        # that did not ask for raw.
        warned = model == "plain" and not raw
        assert grpc_warned == warned
        assert ("X-Mmd-Warning" in answer.headers) == warned
    refused = daemon.stub.Infer(pb.InferRequest(model_id="chat", system="s", prompt="hi", raw=True))
    with pytest.raises(grpc.RpcError) as caught:
        list(refused)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    body = {"model": "chat", "prompt": "hi", "system": "s", "raw": True}
    answer = httpx.post(base + "/infer", json=body, timeout=60)
    assert answer.status_code == 400
    assert "raw sends the prompt as it is" in answer.json()["error"]["message"]
    bad = httpx.post(base + "/infer", json={"model": "chat", "prompt": "hi", "raw": "yes"})
    assert bad.status_code == 400
