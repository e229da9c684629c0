"""The JSON Lines socket, ``<socket>.json``: the door mmctl's quick commands use.

A client that must import grpc and protobuf spends ~10 times longer starting than
Python itself, more than the request it makes takes; a script that runs ``mmctl infer``
once per prompt pays that every time. Over this socket a client needs only ``json`` and
``socket``. One request per connection:

* the client sends one JSON object on one line: ``{"call": "models"}``,
  ``{"call": "health"}``, or ``{"call": "infer", ...}`` with the body of the HTTP API's
  ``POST /infer``;
* mmd answers with lines of JSON: ``{"models": [...], "notes": [...]}``,
  ``{"health": {...}}``; or for an inference an optional
  ``{"warning": "..."}``, then ``{"text": "..."}`` pieces, then ``{"done": {...}}``;
  or, at any point, ``{"error": {"status", "kind", "message"}}`` as the last line, with
  the gRPC status and the error kind the other doors send;
* the client closing its end cancels the request: queued, it leaves the queue; running,
  the generation stops.

Everything goes through the engine as gRPC does (autoload, queueing, slots,
keep-alive), with the same checks and the same JSON keys as ``mmctl --json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
from pathlib import Path
from typing import Any

from mmd.api import json_requests
from mmd.api.coalesce import coalesce_text
from mmd.api.protojson import message_to_dict
from mmd.api.rpc.errors import SHUTDOWN_MESSAGE, interrupt_calls
from mmd.api.rpc.protos import health_proto, registry_proto
from mmd.core.errors import InvalidRequest, MmdError, RequestAborted
from mmd.engine.engine import Engine
from mmd.host import rundir
from mmd.runtime.upstream import Final

log = logging.getLogger("mmd.lines")

CALLS = ("models", "health", "infer")
# The longest request line read: what the gRPC server takes in one message (64 MiB), so that
# a prompt over max_prompt_bytes is refused by the same check, in the same words, on either
# socket; more where max_prompt_bytes is set so high that a prompt escaped in JSON (a control
# character takes 6 bytes there) and the other fields need it.
_GRPC_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_LINE_OVERHEAD = 64 * 1024
# How often a connection whose client has sent all it will send is checked for a hang-up.
_HANGUP_POLL_S = 0.1


class _HungUp(Exception):
    """The client closed its end: nobody is left to answer."""


class JsonLinesServer:
    """The listener on ``path`` (0660, as the gRPC socket) and its running requests."""

    def __init__(self, engine: Engine, path: Path) -> None:
        self.engine = engine
        self.path = path
        self._server: asyncio.Server | None = None
        self._requests: set[asyncio.Task[Any]] = set()
        self._stopping = False
        prompt_limit = engine.config.daemon.max_prompt_bytes
        self._limit = max(_GRPC_MAX_MESSAGE_BYTES, prompt_limit * 6 + _LINE_OVERHEAD)

    async def start(self) -> None:
        """Listen (call it holding the daemon's lock: a socket left there is a dead
        daemon's). Anything at the path that is not a socket of this user's is left alone
        and the daemon serves without this door (rundir.SocketInTheWay, OSError)."""
        rundir.remove_dead_socket(self.path)
        old_umask = os.umask(0o117)  # rw for owner and group, as the gRPC socket
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, str(self.path), limit=self._limit
            )
        finally:
            os.umask(old_umask)

    def stop_accepting(self) -> None:
        """Shutdown's first step: no new connections; running requests go on."""
        if self._server is not None:
            self._server.close()

    async def interrupt(self) -> None:
        """End the requests still running once the drain is over: each tells its client
        ABORTED, "mmd is shutting down", as the gRPC door does."""
        self._stopping = True
        await interrupt_calls(dict.fromkeys(self._requests, "json-lines"))

    def remove(self) -> None:
        self.stop_accepting()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # --- one connection -----------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._requests.add(task)
        watcher: asyncio.Task[None] | None = None
        try:
            try:
                request = await _read_request(reader, self._limit)
            except InvalidRequest as err:
                await _send(writer, _error(err))
                return
            if request is None:
                return  # closed without asking anything
            watcher = asyncio.get_running_loop().create_task(
                _cancel_on_hangup(reader, writer, task)
            )
            await self._answer(request, writer)
        except _HungUp:
            pass
        except asyncio.CancelledError:
            if not self._stopping:
                return  # the client went away (see _cancel_on_hangup): nobody to tell
            with contextlib.suppress(Exception):
                await _send(writer, _error(RequestAborted(SHUTDOWN_MESSAGE)))
        finally:
            if watcher is not None:
                watcher.cancel()
            self._requests.discard(task)
            writer.close()

    async def _answer(self, request: Any, writer: asyncio.StreamWriter) -> None:
        """Run one request; its failure, whatever it is, as the last line."""
        try:
            if not isinstance(request, dict):
                raise InvalidRequest("the request must be a JSON object")
            call = request.get("call")
            if call == "models":
                # {"models": [...], "notes": [...]}: ListModels' answer as JSON.
                await _send(writer, message_to_dict(registry_proto(self.engine)))
            elif call == "health":
                await _send(writer, {"health": message_to_dict(health_proto(self.engine))})
            elif call == "infer":
                await self._infer(request, writer)
            else:
                raise InvalidRequest(f"unknown call {call!r} (this mmd answers {', '.join(CALLS)})")
        except MmdError as err:
            await _send(writer, _error(err))
        except _HungUp:
            raise  # nobody to tell (a cancellation is no Exception: it passes by itself)
        except Exception as err:
            log.exception("internal error")
            await _send(writer, _error(MmdError(f"internal error: {err}")))

    async def _infer(self, request: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        call = json_requests.infer_call(request, self.engine.config.daemon.max_prompt_bytes)
        params, warning = await self.engine.prompt_mode(call.model_id, call.params, call.raw)
        if warning:
            await _send(writer, {"warning": warning})
        interval = self.engine.config.daemon.stream_interval
        source = self.engine.infer(call.model_id, params, call.keep_alive)
        async with contextlib.aclosing(coalesce_text(source, interval)) as items:
            async for item in items:
                if isinstance(item, Final):
                    await _send(writer, {"done": json_requests.done_json(item, params.mode)})
                else:
                    await _send(writer, {"text": item})


async def _read_request(reader: asyncio.StreamReader, limit: int) -> Any:
    """The request line's JSON; None for a connection closed before one."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as err:
        if not err.partial.strip():
            return None
        line = err.partial
    except asyncio.LimitOverrunError:
        raise InvalidRequest(f"the request line is over {limit} bytes") from None
    try:
        return json.loads(line)
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidRequest(f"the request is not valid JSON: {err}") from None


async def _cancel_on_hangup(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: asyncio.Task[Any]
) -> None:
    """Cancel ``request`` once its client closes the connection. A client sends nothing
    after its request line; anything it does send is read and ignored.

    The end of what the client sends is not always the end of the client: a tool such as
    ``socat`` shuts its sending side down at the end of its input and goes on reading the
    answer. A Unix socket tells the two apart: POLLHUP comes only once both directions are
    shut, so after the end of the input the connection is watched for that.
    """
    with contextlib.suppress(OSError):
        while await reader.read(4096):
            pass
    sock = writer.get_extra_info("socket")
    if sock is not None:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLHUP)
        while not poller.poll(0):
            await asyncio.sleep(_HANGUP_POLL_S)
    request.cancel()


def _error(err: MmdError) -> dict[str, Any]:
    return {"error": {"status": err.status, "kind": err.kind, "message": err.message}}


async def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    if writer.is_closing():
        raise _HungUp
    writer.write(json.dumps(message, ensure_ascii=False).encode() + b"\n")
    try:
        await writer.drain()  # back-pressure: a slow reader slows its own generation
    except ConnectionError:  # a broken pipe, a reset
        raise _HungUp from None
