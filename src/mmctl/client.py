"""A synchronous gRPC client for mmd, and its failures as mmctl's one-line errors."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import Message

from mmctl.errors import EXIT_UNREACHABLE, CliError, exit_code_for_status, one_line, report
from mmctl.sockets import choose_socket, unreachable_message
from mmd.core.errors import ERROR_KIND_KEY, WARNING_KEY
from mmd.host import paths
from mmd.v1 import mmd_pb2, mmd_pb2_grpc

# Short queries get a deadline so a wedged daemon cannot hang a script forever;
# loads, unloads and inference may legitimately take minutes and get none.
QUERY_TIMEOUT_S = 30.0

# Many long embeddings can exceed grpc's 4 MiB default.
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

Request = TypeVar("Request", bound=Message)
Response = TypeVar("Response", bound=Message)


def error_kind(err: grpc.RpcError) -> str | None:
    """The mmd error kind sent as trailing metadata, or None when there is none."""
    try:
        # Typed as objects in grpc-stubs; at run time they are (key, value) pairs.
        metadata: Any = err.trailing_metadata()
    except Exception:  # not every RpcError carries call details
        return None
    for key, value in metadata or ():
        if key == ERROR_KIND_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def _status_code(err: grpc.RpcError) -> grpc.StatusCode | None:
    try:
        return err.code()
    except Exception:
        return None


def exit_code_for(err: grpc.RpcError) -> int:
    """The exit code for a failed call (mmctl.errors.exit_code_for_status)."""
    code = _status_code(err)
    return exit_code_for_status(code.name if code is not None else None, error_kind(err))


def cli_error_for(err: grpc.RpcError, socket_path: Path) -> CliError:
    """Turn a failed call into the CliError mmctl reports."""
    exit_code = exit_code_for(err)
    if exit_code == EXIT_UNREACHABLE:
        return CliError(unreachable_message(socket_path), exit_code)
    code = _status_code(err)
    details = (_safe_details(err) or "").strip()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return CliError(f"mmd did not answer in time ({details or 'deadline exceeded'})", exit_code)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return CliError(f"this mmd does not support the call ({details})", exit_code)
    if not details:
        details = f"request failed ({code.name if code else 'unknown status'})"
    return CliError(one_line(details), exit_code)


def _safe_details(err: grpc.RpcError) -> str | None:
    try:
        return err.details()
    except Exception:
        return None


def _show_warnings(call: Any, shown: set[str] | None) -> None:
    """The daemon's warnings about a call it serves (see mmd.core.errors.WARNING_KEY), each one
    line on stderr before the output; those already in ``shown`` (a chat session's earlier
    turns) are not repeated."""
    try:
        metadata: Any = call.initial_metadata()
    except Exception:  # not every call carries it
        return
    for key, value in metadata or ():
        if key == WARNING_KEY:
            text = value.decode() if isinstance(value, bytes) else str(value)
            if shown is not None:
                if text in shown:
                    continue
                shown.add(text)
            report(f"warning: {text}")


class Stream(Generic[Response]):
    """A server stream's messages, read once: the daemon's warnings on stderr before the
    first message, failures as CliError, and the call cancelled when the reader stops early.

    Cancelling matters: an interrupted `mmctl infer` must stop generation in the daemon
    rather than leave it running for nobody. ``endless`` names a stream that ends only when
    the daemon shuts down (events, a followed log): its end is an error. ``cancel`` may be
    called from another thread while one reads (`mmctl top` stops its reader so); the
    stream then just ends.
    """

    def __init__(
        self,
        call: grpc.CallIterator[Response],
        socket_path: Path,
        endless: str = "",
        shown_warnings: set[str] | None = None,
    ):
        self._call = call
        self._socket_path = socket_path
        self._endless = endless
        self._shown_warnings = shown_warnings
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()  # type: ignore[no-untyped-call]

    def __iter__(self) -> Iterator[Response]:
        finished = False
        received = False
        try:
            for message in self._call:
                if not received:
                    received = True
                    _show_warnings(self._call, self._shown_warnings)
                yield message
            finished = True
        except grpc.RpcError as err:
            finished = True
            if self._cancelled and _status_code(err) == grpc.StatusCode.CANCELLED:
                return  # we cancelled it
            error = cli_error_for(err, self._socket_path)
            if received and error.exit_code == EXIT_UNREACHABLE:
                # It answered, so it was there: "no mmd daemon at" would mislead.
                details = one_line(_safe_details(err) or "no reason given")
                error.message = f"lost the connection to mmd at {self._socket_path} ({details})"
            raise error from None
        finally:
            if not finished:
                self._call.cancel()  # type: ignore[no-untyped-call]
        if self._endless:
            raise CliError(f"mmd ended the {self._endless} (it is shutting down)", EXIT_UNREACHABLE)


class MmdClient:
    """A connection to the daemon's socket; use as a context manager.

    ``socket_path`` is the one given (--socket, $MMD_SOCKET); without one, the first of
    paths.socket_candidates() that exists: the user's own daemon, then the system's.
    ``query_timeout`` is the deadline of the short queries (health, lists, plans, reload).
    """

    def __init__(
        self, socket_path: Path | None = None, *, query_timeout: float = QUERY_TIMEOUT_S
    ) -> None:
        self._candidates = [socket_path] if socket_path else paths.socket_candidates()
        self.socket_path = Path(os.path.abspath(self._candidates[0]))
        self.query_timeout = query_timeout
        self._channel: grpc.Channel | None = None
        self._stub: mmd_pb2_grpc.ModelManagerStub | None = None

    def __enter__(self) -> MmdClient:
        # grpc's own messages for a missing or forbidden socket are long and say nothing
        # about mmd.
        self.socket_path = choose_socket(self._candidates)
        self._channel = grpc.insecure_channel(
            f"unix:{self.socket_path}",
            options=[
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ],
        )
        self._stub = mmd_pb2_grpc.ModelManagerStub(self._channel)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._stub = None

    @property
    def stub(self) -> mmd_pb2_grpc.ModelManagerStub:
        if self._stub is None:
            raise RuntimeError("MmdClient used outside its 'with' block")
        return self._stub

    # Unary calls ----------------------------------------------------------

    def _call(
        self,
        method: grpc.UnaryUnaryMultiCallable[Request, Response],
        request: Request,
        *,
        query: bool,
    ) -> Response:
        """One unary call; a query gets the query deadline, the others none."""
        try:
            response: Response = method(request, timeout=self.query_timeout if query else None)
        except grpc.RpcError as err:
            raise cli_error_for(err, self.socket_path) from None
        return response

    def list_models(self) -> list[mmd_pb2.Model]:
        return list(self.registry().models)

    def registry(self) -> mmd_pb2.ListModelsResponse:
        """The models, and the daemon's notes on the files its model discovery skipped."""
        request = mmd_pb2.ListModelsRequest()
        return self._call(self.stub.ListModels, request, query=True)

    def unload_model(
        self, model_id: str, *, force: bool, timeout_seconds: float
    ) -> mmd_pb2.UnloadModelResponse:
        request = mmd_pb2.UnloadModelRequest(
            model_id=model_id, force=force, timeout_seconds=timeout_seconds
        )
        return self._call(self.stub.UnloadModel, request, query=False)

    def embed(
        self, model_id: str, inputs: list[str], *, keep_alive_seconds: float | None = None
    ) -> mmd_pb2.EmbedResponse:
        request = mmd_pb2.EmbedRequest(model_id=model_id, input=inputs)
        if keep_alive_seconds is not None:
            request.keep_alive_seconds = keep_alive_seconds
        return self._call(self.stub.Embed, request, query=False)

    def get_health(self) -> mmd_pb2.Health:
        return self._call(self.stub.GetHealth, mmd_pb2.GetHealthRequest(), query=True)

    def plan_load(self, model_id: str, *, gpu_layers: int | None = None) -> mmd_pb2.LoadPlan:
        request = mmd_pb2.PlanLoadRequest(model_id=model_id)
        if gpu_layers is not None:
            request.gpu_layers = gpu_layers
        return self._call(self.stub.PlanLoad, request, query=True)

    def reload(self) -> mmd_pb2.ReloadResponse:
        return self._call(self.stub.Reload, mmd_pb2.ReloadRequest(), query=True)

    # Streaming calls ------------------------------------------------------

    def load_model(
        self, model_id: str, *, gpu_layers: int | None = None
    ) -> Stream[mmd_pb2.LoadProgress]:
        request = mmd_pb2.LoadModelRequest(model_id=model_id)
        if gpu_layers is not None:
            request.gpu_layers = gpu_layers
        return self._stream(self.stub.LoadModel, request)

    def infer(
        self, request: mmd_pb2.InferRequest, *, shown_warnings: set[str] | None = None
    ) -> Stream[mmd_pb2.InferChunk]:
        """The answer's pieces; a warning already in ``shown_warnings`` is not shown again."""
        return self._stream(self.stub.Infer, request, shown_warnings=shown_warnings)

    def watch(self, interval: float = 1.0) -> Stream[mmd_pb2.Event]:
        """The daemon's events until it shuts down: a snapshot first, then changes."""
        request = mmd_pb2.WatchRequest(memory_interval_seconds=interval)
        return self._stream(self.stub.Watch, request, endless="event stream")

    def logs(self, model_id: str, *, lines: int, follow: bool) -> Stream[mmd_pb2.LogLines]:
        request = mmd_pb2.LogsRequest(model_id=model_id, lines=lines, follow=follow)
        return self._stream(self.stub.Logs, request, endless="log" if follow else "")

    def _stream(
        self,
        method: grpc.UnaryStreamMultiCallable[Request, Response],
        request: Request,
        endless: str = "",
        shown_warnings: set[str] | None = None,
    ) -> Stream[Response]:
        try:
            call: grpc.CallIterator[Response] = method(request)
        except grpc.RpcError as err:
            raise cli_error_for(err, self.socket_path) from None
        return Stream(call, self.socket_path, endless, shown_warnings)
