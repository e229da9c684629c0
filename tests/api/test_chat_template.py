"""A chat (--system, messages) to a model whose GGUF file has no chat template gets one
warning line: llama-server then formats it as ChatML, which such a model may not know (the
Gemma demo model answered with ChatML's markers, and nothing said why)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon

from mmd.runtime.gguf import has_chat_template
from mmd.runtime.synthetic import write_model

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


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
    warning = (
        "mmctl: warning: model 'plain' has no chat template in its GGUF file (no "
        "tokenizer.chat_template): llama-server formats the chat as ChatML, which the model "
        "may not follow; a plain prompt (no --system) is sent as it is"
    )
    for _ in range(2):
        result = daemon.mmctl("infer", "plain", "hi", "--system", "Be brief.", "--max-tokens", "4")
        assert result.returncode == 0, result.stderr
        assert result.stderr.decode().splitlines() == [warning]
        assert result.stdout.strip()
    plain = daemon.mmctl("infer", "plain", "hi", "--max-tokens", "4")
    assert (plain.returncode, plain.stderr) == (0, b"")
    templated = daemon.mmctl("infer", "chat", "hi", "--system", "Be brief.", "--max-tokens", "4")
    assert (templated.returncode, templated.stderr) == (0, b"")
    # The daemon's log says it once per model.
    assert daemon.log_path.read_text().count("has no chat template") == 1
