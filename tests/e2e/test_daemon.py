"""The trunk end to end: a real daemon, real llama-server children, gRPC and mmctl."""

from __future__ import annotations

import json
import signal
import stat
import time
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from conftest import Daemon, wait_until

from mmd.host import paths
from mmd.v1 import mmd_pb2 as pb


def registry(models: dict[str, Path], **extra: str) -> str:
    text = f"""
    [models.tiny]
    path = "{models["tiny"]}"
    role = "summarization"
    ctx = 512
    parallel = 2

    [models.embed]
    path = "{models["embed"]}"
    role = "embedding"
    ctx = 256
    embedding = true
    """
    for section, body in extra.items():
        text += f"\n[{section}]\n{body}\n"
    return text


@pytest.fixture
def daemon(make_daemon: Any, model_files: dict[str, Path]) -> Daemon:
    d: Daemon = make_daemon(registry(model_files))
    return d


def test_a_64_character_model_id_gets_a_socket_it_can_bind(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    long_id = "m" * 64
    daemon: Daemon = make_daemon(f'[models.{long_id}]\npath = "{model_files["tiny"]}"\nctx = 256\n')
    chunks = list(daemon.stub.Infer(pb.InferRequest(model_id=long_id, prompt="hi", max_tokens=2)))
    assert chunks[-1].done.completion_tokens == 2
    (child_socket,) = paths.children_dir(daemon.socket).iterdir()
    assert len(str(child_socket)) <= 107
    assert child_socket == paths.child_socket(paths.children_dir(daemon.socket), long_id)


def test_infer_streams_over_grpc_and_autoloads(daemon: Daemon) -> None:
    chunks = list(daemon.stub.Infer(pb.InferRequest(model_id="tiny", prompt="hi", max_tokens=6)))
    texts = [c.text for c in chunks if c.WhichOneof("kind") == "text"]
    done = chunks[-1].done
    assert chunks[-1].WhichOneof("kind") == "done"
    assert len(texts) >= 1
    assert done.completion_tokens == 6
    assert done.finish_reason == "length"
    assert done.prompt_tokens > 0
    assert done.timings.total_ms >= done.timings.first_token_ms > 0
    models = {m.id: m for m in daemon.stub.ListModels(pb.ListModelsRequest()).models}
    assert models["tiny"].state == pb.MODEL_STATE_READY
    assert models["tiny"].pid > 0
    assert models["embed"].state == pb.MODEL_STATE_UNLOADED
    assert len(daemon.children()) == 1


def test_stream_interval_holds_the_middle_of_a_stream_but_not_its_ends(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(
        f'[models.tiny]\npath = "{model_files["tiny"]}"\nctx = 256\n',
        daemon_extra='stream_interval = "30s"\n',
    )
    request = pb.InferRequest(model_id="tiny", prompt="hi", max_tokens=12)
    list(daemon.stub.Infer(request, timeout=60))  # load first: timings below are the stream's
    began = time.monotonic()
    chunks = list(daemon.stub.Infer(request, timeout=60))
    # The first piece at once; the rest held, then sent with the end: at most two pieces
    # (one, when the first read already held every token).
    kinds = [c.WhichOneof("kind") for c in chunks]
    assert kinds in (["text", "text", "done"], ["text", "done"])
    assert chunks[-1].done.completion_tokens == 12
    assert time.monotonic() - began < 10  # the end is not held for the interval


def test_chat_with_system_prompt_uses_chat_endpoint(daemon: Daemon) -> None:
    request = pb.InferRequest(
        model_id="tiny",
        system="be brief",
        messages=[pb.ChatMessage(role="user", content="hello")],
        max_tokens=4,
    )
    chunks = list(daemon.stub.Infer(request))
    assert chunks[-1].done.completion_tokens == 4
    # The chat template wraps the prompt: more prompt tokens than the bare words.
    assert chunks[-1].done.prompt_tokens > 10


def test_mmctl_infer_from_stdin_streams_text(daemon: Daemon) -> None:
    result = daemon.mmctl("infer", "tiny", "--max-tokens", "5", input=b"notes to summarize\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(b"\n")
    assert len(result.stdout.decode().strip("\n")) >= 1


def test_mmctl_infer_json(daemon: Daemon) -> None:
    result = daemon.mmctl("infer", "tiny", "say hi", "--max-tokens", "3", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["completion_tokens"] == 3
    assert payload["finish_reason"] == "length"
    assert isinstance(payload["text"], str)


def test_mmctl_infer_each_line_answers_a_file_of_prompts(daemon: Daemon) -> None:
    prompts = b"say hi\nname a colour\n\ncount to three\n"
    result = daemon.mmctl("infer", "tiny", "--each-line", "--max-tokens", "2", input=prompts)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["line"] for a in answers] == [1, 2, 4]
    assert [a["completion_tokens"] for a in answers] == [2, 2, 2]
    assert all(a["finish_reason"] == "length" for a in answers)


def test_embed_via_grpc_and_mmctl(daemon: Daemon) -> None:
    response = daemon.stub.Embed(pb.EmbedRequest(model_id="embed", input=["a", "b c"]))
    assert [len(e.values) for e in response.embeddings] == [128, 128]
    result = daemon.mmctl("embed", "embed", input=b"hello world")
    assert result.returncode == 0, result.stderr
    vector = json.loads(result.stdout)
    assert len(vector) == 128
    assert all(isinstance(x, float) for x in vector)
    result = daemon.mmctl("embed", "embed", "hello", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["model"] == "embed"
    assert [len(v) for v in payload["embeddings"]] == [128]
    assert payload["prompt_tokens"] > 0


def test_embed_on_a_generation_model_is_refused(daemon: Daemon) -> None:
    with pytest.raises(grpc.RpcError) as err:
        daemon.stub.Embed(pb.EmbedRequest(model_id="tiny", input=["x"]))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not an embedding model" in (err.value.details() or "")


def test_load_ps_health_unload(daemon: Daemon) -> None:
    result = daemon.mmctl("load", "tiny", "--json")
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert loaded["id"] == "tiny"
    assert loaded["state"] == "ready"
    assert loaded["pid"] > 0

    ps = json.loads(daemon.mmctl("ps", "--json").stdout)
    assert [m["id"] for m in ps] == ["tiny"]
    assert ps[0]["pid"] == loaded["pid"]

    models = json.loads(daemon.mmctl("models", "--json").stdout)
    assert {m["id"]: m["state"] for m in models} == {"tiny": "ready", "embed": "unloaded"}

    health = json.loads(daemon.mmctl("health", "--json").stdout)
    assert health["active_inferences"] == 0
    assert health["queued_requests"] == 0
    assert any(d["id"] == "ram" for d in health["devices"])

    result = daemon.mmctl("unload", "tiny")
    assert result.returncode == 0, result.stderr
    assert wait_until(lambda: not daemon.children(), timeout=10)
    models = json.loads(daemon.mmctl("models", "--json").stdout)
    assert {m["id"]: m["state"] for m in models}["tiny"] == "unloaded"


def test_health_protocol_and_reflection(daemon: Daemon) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    assert daemon.channel is not None
    health = health_pb2_grpc.HealthStub(daemon.channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="mmd.v1.ModelManager"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(daemon.channel)
    replies = reflect.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert "mmd.v1.ModelManager" in names


def test_socket_is_not_world_accessible(daemon: Daemon) -> None:
    assert daemon.socket.stat().st_mode & 0o007 == 0
    assert daemon.socket.parent.stat().st_mode & 0o007 == 0


def test_sigterm_stops_children_and_removes_socket(daemon: Daemon) -> None:
    list(daemon.stub.Infer(pb.InferRequest(model_id="tiny", prompt="x", max_tokens=2)))
    assert daemon.children()
    assert daemon.stop(signal.SIGTERM) == 0
    assert not daemon.socket.exists()
    assert wait_until(lambda: not daemon.children(), timeout=5)


def test_sigkill_of_daemon_takes_children_down(daemon: Daemon) -> None:
    list(daemon.stub.Infer(pb.InferRequest(model_id="tiny", prompt="x", max_tokens=2)))
    daemon.stub.Embed(pb.EmbedRequest(model_id="embed", input=["x"]))
    assert len(daemon.children()) == 2
    daemon.stop(signal.SIGKILL)
    assert wait_until(lambda: not daemon.children(), timeout=2)


def test_stale_socket_and_restart(daemon: Daemon) -> None:
    daemon.stop(signal.SIGKILL)
    assert daemon.socket.exists()  # left behind by the killed daemon
    daemon.start()
    chunks = list(daemon.stub.Infer(pb.InferRequest(model_id="tiny", prompt="x", max_tokens=2)))
    assert chunks[-1].done.completion_tokens == 2


def test_second_daemon_exits_and_first_keeps_serving(daemon: Daemon) -> None:
    second = Daemon(daemon.root, daemon.config_text)
    second.start(wait=False)
    assert second.process is not None
    assert second.process.wait(30) == 3
    assert "another mmd is already serving" in daemon.log_path.read_text()
    chunks = list(daemon.stub.Infer(pb.InferRequest(model_id="tiny", prompt="x", max_tokens=2)))
    assert chunks[-1].done.completion_tokens == 2


class _Neighbour(Daemon):
    """A second daemon with its socket beside the first one's, in the same directory."""

    @property
    def socket(self) -> Path:
        return self.root / "run" / "mmd2.sock"

    @property
    def config_path(self) -> Path:
        return self.root / "mmd2.toml"

    @property
    def log_path(self) -> Path:
        return self.root / "daemon2.log"


def _served_by(daemon: Daemon) -> int:
    """Infer with model a through mmctl; the pid of the child that daemon shows for a."""
    result = daemon.mmctl("infer", "a", "hi", "--max-tokens", "2")
    assert result.returncode == 0, result.stderr
    (model,) = json.loads(daemon.mmctl("ps", "--json").stdout)
    pid: int = model["pid"]
    return pid


def test_two_daemons_in_one_directory_each_use_their_own_children(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    config = f'[models.a]\npath = "{model_files["tiny"]}"\nctx = 256\n'
    first: Daemon = make_daemon(config)
    second = _Neighbour(first.root, config)
    try:
        second.start()
        pids = {}
        for daemon in (first, second):
            pid = _served_by(daemon)
            assert daemon.process is not None
            assert psutil.Process(pid).ppid() == daemon.process.pid
            argv = psutil.Process(pid).cmdline()
            listening = Path(argv[argv.index("--host") + 1])
            assert listening.parent == paths.children_dir(daemon.socket)
            assert stat.S_IMODE(listening.parent.stat().st_mode) == 0o700
            pids[daemon.socket.name] = pid
        assert pids["mmd.sock"] != pids["mmd2.sock"]
        assert second.stop() == 0
        # The first daemon's model still answers, from the same child.
        assert _served_by(first) == pids["mmd.sock"]
        assert not paths.children_dir(second.socket).exists()
    finally:
        second.stop()


def test_stale_children_are_cleared_at_start(daemon: Daemon) -> None:
    daemon.stop(signal.SIGKILL)
    children = paths.children_dir(daemon.socket)
    (children / "tiny.sock").write_text("left by a killed daemon")
    daemon.start()
    assert list(children.iterdir()) == []
    chunks = list(daemon.stub.Infer(pb.InferRequest(model_id="tiny", prompt="x", max_tokens=2)))
    assert chunks[-1].done.completion_tokens == 2
