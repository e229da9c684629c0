"""Property-based fuzz of the gRPC request messages against a real daemon.

Whatever the fields hold, the daemon answers with a defined status and keeps serving.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import Daemon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmd.v1 import mmd_pb2 as pb

# Statuses a request may end with; anything else (INTERNAL, UNKNOWN) is a bug.
DEFINED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
}

model_ids = st.one_of(st.sampled_from(["tiny", "embed", ""]), st.text(max_size=80))
texts = st.one_of(st.text(max_size=300), st.sampled_from(["", " ", "\x00", "hi", "\n\n"]))
numbers = st.floats(allow_nan=True, allow_infinity=True)
int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
roles = st.one_of(st.sampled_from(["system", "user", "assistant"]), st.text(max_size=10))


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.InferRequest:
    request = pb.InferRequest(
        model_id=draw(model_ids),
        prompt=draw(texts),
        system=draw(st.one_of(st.just(""), texts)),
        messages=[
            pb.ChatMessage(role=draw(roles), content=draw(texts))
            for _ in range(draw(st.integers(0, 3)))
        ],
    )
    if draw(st.booleans()):
        # Small counts: the fuzz exercises validation, not long generations.
        request.max_tokens = draw(st.one_of(int32, st.integers(1, 8)))
    if request.HasField("max_tokens") and request.max_tokens > 8:
        request.max_tokens = 8
    if draw(st.booleans()):
        request.temperature = draw(st.floats(width=32))
    if draw(st.booleans()):
        request.keep_alive_seconds = draw(numbers)
    return request


@st.composite
def other_requests(draw: st.DrawFn) -> tuple[str, Any]:
    kind = draw(st.sampled_from(["embed", "plan", "load", "unload"]))
    model_id = draw(model_ids)
    if kind == "embed":
        request = pb.EmbedRequest(model_id=model_id, input=draw(st.lists(texts, max_size=3)))
        if draw(st.booleans()):
            request.keep_alive_seconds = draw(numbers)
        return kind, request
    if kind == "unload":
        return kind, pb.UnloadModelRequest(
            model_id=model_id, force=draw(st.booleans()), timeout_seconds=draw(numbers)
        )
    layers = draw(st.one_of(st.none(), int32))
    if kind == "plan":
        plan = pb.PlanLoadRequest(model_id=model_id)
        if layers is not None:
            plan.gpu_layers = layers
        return kind, plan
    load = pb.LoadModelRequest(model_id=model_id)
    if layers is not None:
        load.gpu_layers = layers
    return kind, load


@pytest.fixture(scope="module")
def fuzz_daemon(
    tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]
) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("fuzz")
    config = f"""
    [scheduler]
    max_queue = 16
    [models.tiny]
    path = "{model_files["tiny"]}"
    ctx = 256
    parallel = 2
    [models.embed]
    path = "{model_files["embed"]}"
    ctx = 128
    embedding = true
    """
    daemon = Daemon(root, config)
    daemon.start()
    yield daemon
    daemon.stop()
    assert not daemon.children()


def call(daemon: Daemon, kind: str, request: Any) -> grpc.StatusCode:
    stub = daemon.stub
    try:
        if kind == "infer":
            list(stub.Infer(request, timeout=30))
        elif kind == "embed":
            stub.Embed(request, timeout=30)
        elif kind == "plan":
            stub.PlanLoad(request, timeout=30)
        elif kind == "load":
            list(stub.LoadModel(request, timeout=30))
        else:
            stub.UnloadModel(request, timeout=30)
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def assert_serves(daemon: Daemon) -> None:
    assert daemon.process is not None
    assert daemon.process.poll() is None, "mmd died"
    chunks = list(daemon.stub.Infer(pb.InferRequest(model_id="tiny", prompt="ok", max_tokens=2)))
    assert chunks[-1].done.completion_tokens == 2


fuzz_settings = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@fuzz_settings
@given(request=infer_requests())
def test_infer_requests_get_a_defined_status(fuzz_daemon: Daemon, request: pb.InferRequest) -> None:
    code = call(fuzz_daemon, "infer", request)
    assert code in DEFINED, (code, request)


@fuzz_settings
@given(item=other_requests())
def test_other_requests_get_a_defined_status(fuzz_daemon: Daemon, item: tuple[str, Any]) -> None:
    kind, request = item
    code = call(fuzz_daemon, kind, request)
    assert code in DEFINED, (code, kind, request)


def test_daemon_still_serves_after_the_fuzz(fuzz_daemon: Daemon) -> None:
    assert_serves(fuzz_daemon)
