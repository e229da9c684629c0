"""An in-process ModelManager server for testing mmctl's side of the API.

It answers with canned messages or aborts with a chosen status and error kind,
so the CLI's rendering and exit codes can be checked against real gRPC calls
over a real Unix socket. It does not manage models: that is the daemon's job,
tested with real llama-server children elsewhere.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import Message

from mmd.core.errors import ERROR_KIND_KEY
from mmd.v1 import mmd_pb2, mmd_pb2_grpc


@dataclass
class Failure:
    """A status to abort with; `kind` goes into the trailing metadata as mmd does."""

    code: grpc.StatusCode
    details: str
    kind: str | None = None


def _abort(context: grpc.ServicerContext, failure: Failure) -> None:
    if failure.kind is not None:
        context.set_trailing_metadata(((ERROR_KIND_KEY, failure.kind),))
    context.abort(failure.code, failure.details)


class FakeModelManager(mmd_pb2_grpc.ModelManagerServicer):
    """Canned answers; every request is kept in `requests` for the test to inspect."""

    def __init__(self) -> None:
        self.models: list[mmd_pb2.Model] = []
        self.registry_notes: list[str] = []  # ListModels' notes (model discovery)
        self.failure: Failure | None = None
        self.requests: list[Message] = []
        self.load_stages: list[tuple[str, str]] = [("planning", "fits"), ("loading", "")]
        self.infer_pieces: list[str] = []
        self.infer_done = mmd_pb2.InferDone(finish_reason="stop")
        # Fail the Infer stream after its pieces instead of sending the final chunk.
        self.infer_failure_after_pieces: Failure | None = None
        # When set, Infer waits for it after the first piece (to observe streaming).
        self.infer_gate: threading.Event | None = None
        self.infer_gate_timed_out = False
        # Set when an Infer call ends for any reason, cancellation included.
        self.infer_ended = threading.Event()
        self.aborted_requests = 0
        self.embeddings: list[list[float]] = []
        self.health = mmd_pb2.Health()
        self.plan = mmd_pb2.LoadPlan()

    def _receive(self, request: Message, context: grpc.ServicerContext) -> None:
        self.requests.append(request)
        if self.failure is not None:
            _abort(context, self.failure)

    def _model(self, model_id: str, context: grpc.ServicerContext) -> mmd_pb2.Model:
        for model in self.models:
            if model.id == model_id:
                return model
        _abort(context, Failure(grpc.StatusCode.NOT_FOUND, f"unknown model {model_id!r}"))
        raise AssertionError("unreachable")

    def ListModels(
        self, request: mmd_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> mmd_pb2.ListModelsResponse:
        self._receive(request, context)
        return mmd_pb2.ListModelsResponse(models=self.models, notes=self.registry_notes)

    def LoadModel(
        self, request: mmd_pb2.LoadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[mmd_pb2.LoadProgress]:
        self._receive(request, context)
        model = self._model(request.model_id, context)
        for stage, message in self.load_stages:
            yield mmd_pb2.LoadProgress(stage=stage, message=message)
        yield mmd_pb2.LoadProgress(stage="ready", message="", model=model)

    def UnloadModel(
        self, request: mmd_pb2.UnloadModelRequest, context: grpc.ServicerContext
    ) -> mmd_pb2.UnloadModelResponse:
        self._receive(request, context)
        model = mmd_pb2.Model()
        model.CopyFrom(self._model(request.model_id, context))
        model.state = mmd_pb2.MODEL_STATE_UNLOADED
        model.pid = 0
        return mmd_pb2.UnloadModelResponse(model=model, aborted_requests=self.aborted_requests)

    def Infer(
        self, request: mmd_pb2.InferRequest, context: grpc.ServicerContext
    ) -> Iterator[mmd_pb2.InferChunk]:
        context.add_callback(self.infer_ended.set)
        self._receive(request, context)
        self._model(request.model_id, context)
        for index, piece in enumerate(self.infer_pieces):
            yield mmd_pb2.InferChunk(text=piece)
            if index == 0 and self.infer_gate is not None:
                self.infer_gate_timed_out = not self.infer_gate.wait(timeout=20)
        if self.infer_failure_after_pieces is not None:
            _abort(context, self.infer_failure_after_pieces)
        yield mmd_pb2.InferChunk(done=self.infer_done)

    def Embed(
        self, request: mmd_pb2.EmbedRequest, context: grpc.ServicerContext
    ) -> mmd_pb2.EmbedResponse:
        self._receive(request, context)
        self._model(request.model_id, context)
        return mmd_pb2.EmbedResponse(
            embeddings=[mmd_pb2.Embedding(values=v) for v in self.embeddings],
            prompt_tokens=len(request.input),
        )

    def GetHealth(
        self, request: mmd_pb2.GetHealthRequest, context: grpc.ServicerContext
    ) -> mmd_pb2.Health:
        self._receive(request, context)
        return self.health

    def PlanLoad(
        self, request: mmd_pb2.PlanLoadRequest, context: grpc.ServicerContext
    ) -> mmd_pb2.LoadPlan:
        self._receive(request, context)
        self._model(request.model_id, context)
        return self.plan


@contextmanager
def serve(servicer: FakeModelManager, socket_path: Path | None = None) -> Iterator[Path]:
    """Serve `servicer` on a Unix socket (a fresh one unless given); yields its path."""
    # A short directory: Unix socket paths are limited to about 100 bytes.
    directory = Path(tempfile.mkdtemp(prefix="mmctl-"))
    socket_path = socket_path or directory / "mmd.sock"
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    mmd_pb2_grpc.add_ModelManagerServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{socket_path}")
    server.start()
    try:
        yield socket_path
    finally:
        if servicer.infer_gate is not None:
            servicer.infer_gate.set()
        server.stop(grace=None).wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)
