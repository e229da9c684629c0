"""Fault injection: children that hang at load or die at once, and what clients see."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from conftest import Daemon, wait_until
from gguf import GGUFWriter

from mmd.runtime.server import resolve_llama_server
from mmd.v1 import mmd_pb2 as pb

DELAYED = Path(__file__).parents[1] / "delayed_llama_server.sh"


def test_child_that_never_becomes_ready_hits_the_load_timeout(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    slow = model_files["tiny"].with_name("slow-hang.gguf")
    if not slow.exists():
        slow.symlink_to(model_files["tiny"])
    env = {
        "MMD_LLAMA_SERVER": str(DELAYED),
        "MMD_TEST_REAL_LLAMA_SERVER": str(resolve_llama_server(None).path),
        "MMD_TEST_LOAD_DELAY": "120",
    }
    config = f"""
    [models.hang]
    path = "{slow}"
    [models.ok]
    path = "{model_files["tiny2"]}"
    """
    daemon: Daemon = make_daemon(config, extra_env=env, daemon_extra='load_timeout = "2s"\n')
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(daemon.stub.Infer(pb.InferRequest(model_id="hang", prompt="x", max_tokens=2)))
    assert time.monotonic() - started < 20
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "not ready within 2s (load timeout)" in (err.value.details() or "")
    # The child (still sleeping before it would exec) and its process group are gone.
    assert wait_until(
        lambda: (
            not [
                p
                for p in psutil.process_iter(["cmdline"])
                if str(slow) in " ".join(p.info["cmdline"] or [])
            ]
        ),
        timeout=5,
    )
    models = {m["id"]: m for m in json.loads(daemon.mmctl("models", "--json").stdout)}
    assert models["hang"]["state"] == "failed"
    assert "load timeout" in models["hang"]["last_error"]
    chunks = list(daemon.stub.Infer(pb.InferRequest(model_id="ok", prompt="x", max_tokens=2)))
    assert chunks[-1].done.completion_tokens == 2


def test_child_that_exits_at_once_is_reported_with_its_log(
    make_daemon: Any, model_files: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.gguf"
    # A well-formed llama header with no tensors: llama-server exits during load.
    writer = GGUFWriter(str(broken), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = f"""
    [models.broken]
    path = "{broken}"
    """
    daemon: Daemon = make_daemon(config)
    result = daemon.mmctl("infer", "broken", "hello")
    assert result.returncode == 6
    message = result.stderr.decode()
    assert message.count("\n") == 1
    assert "exited with status" in message
    assert "during load" in message
    ps = json.loads(daemon.mmctl("ps", "--json").stdout)
    (model,) = ps
    assert model["state"] == "failed"
    assert model["log_tail"], "the failed model shows the last lines of its log"
    assert not daemon.children()
