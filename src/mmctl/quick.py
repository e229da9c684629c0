"""mmctl's quick commands: `ps`, a one-shot `infer`, `models --json` and `health --json`,
over the daemon's JSON Lines socket (``<socket>.json``, see mmd.api.lines) instead of
gRPC.

Importing grpc, protobuf and Typer takes ~10 times as long as starting Python; a
script that runs ``mmctl infer`` once per prompt, or polls ``mmctl ps`` or
``mmctl health --json``, would pay that
on every call. This path needs only the standard library.

It serves a command line only when it understands all of it, and does what the full
CLI would, with the same output, errors and exit codes. Anything else (help, other
commands, an option or value it does not know, a value the full CLI would refuse, a
daemon it cannot reach or that has no JSON Lines socket) goes to the full CLI
(``run`` returns None), which then says what is wrong in its own words.
"""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmctl.answers import StreamedText
from mmctl.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_UNREACHABLE,
    CliError,
    exit_code_for_status,
    one_line,
    report,
)
from mmctl.prompts import read_input
from mmctl.sockets import choose_socket, unreachable_message
from mmd.core.units import parse_keep_alive
from mmd.core.validate import MAX_TEMPERATURE
from mmd.host import paths

# As the gRPC client's queries (mmctl.client.QUERY_TIMEOUT_S): a wedged daemon cannot
# hang a script's `mmctl ps` forever. Inference gets no deadline.
_QUERY_TIMEOUT_S = 30.0
_INFER_VALUE_OPTIONS = frozenset({"--system", "--max-tokens", "--temperature", "--keep-alive"})
_INFER_FLAGS = frozenset({"--raw", "--json"})
# States `mmctl ps` leaves out: the registry's models that are not loaded.
_NOT_LISTED = frozenset({"unloaded", "unspecified"})


class _Command:
    """A quick command line, parsed. (A plain class: dataclasses would import inspect,
    a tenth of this path's start-up.)"""

    __slots__ = ("json_out", "name", "prompt", "request", "socket")

    def __init__(
        self,
        name: str,
        socket: str | None,
        json_out: bool,
        request: dict[str, Any],
        prompt: str | None = None,
    ) -> None:
        self.name = name  # "ps", "infer", "models" or "health"
        self.socket = socket
        self.json_out = json_out
        self.request = request  # for infer: the request, less the prompt
        self.prompt = prompt  # the PROMPT argument; None or "-": stdin


def run(args: list[str]) -> int | None:
    """The exit code of ``mmctl ARGS`` when the quick path serves it; None when the full
    CLI must (nothing has been read or written then)."""
    command = parse(args)
    if command is None:
        return None
    try:
        connection = _connect(command.socket)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    if connection is None:
        return None
    conn, sock = connection
    try:
        with conn:
            if command.name == "infer":
                return _infer(conn, sock, command)
            return _query(conn, sock, command)
    except CliError as err:
        report(err.message)
        return err.exit_code
    except KeyboardInterrupt:  # closing the connection cancels the request in mmd
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_BROKEN_PIPE


# --- the command line ----------------------------------------------------------------


def parse(args: list[str]) -> _Command | None:
    """The command ``args`` name, when it is a quick one given in full and with values
    the full CLI would take; else None."""
    socket_arg: str | None = None
    rest: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            return None
        if arg == "--socket" or arg.startswith("--socket="):
            if socket_arg is not None:
                return None
            if arg == "--socket":
                if index + 1 >= len(args):
                    return None
                socket_arg = args[index + 1]
                index += 2
                continue
            socket_arg = arg.removeprefix("--socket=")
        else:
            rest.append(arg)
        index += 1
    if socket_arg == "" or not rest:
        return None
    if rest[0] == "ps":
        if rest[1:] not in ([], ["--json"]):
            return None
        return _Command("ps", socket_arg, rest[1:] == ["--json"], {})
    if rest[0] in ("models", "health"):
        # Their JSON only: the text views draw protobuf messages (mmctl.render).
        if rest[1:] != ["--json"]:
            return None
        return _Command(rest[0], socket_arg, True, {})
    if rest[0] == "infer":
        return _parse_infer(rest[1:], socket_arg)
    return None


def _parse_infer(args: list[str], socket_arg: str | None) -> _Command | None:
    positional: list[str] = []
    options: dict[str, str] = {}
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "-" or not arg.startswith("-"):
            positional.append(arg)
            continue
        name, equals, value = arg.partition("=")
        if name in options:
            return None  # given twice: the full CLI decides what that means
        if name in _INFER_FLAGS and not equals:
            options[name] = ""
        elif name in _INFER_VALUE_OPTIONS:
            if not equals:
                if index >= len(args):
                    return None
                value = args[index]
                index += 1
            if value.startswith("-") and value != "-":
                return None  # an option or a negative number: the full CLI judges it
            options[name] = value
        else:
            return None
    if len(positional) not in (1, 2):
        return None
    request = _infer_request(positional[0], options)
    if request is None:
        return None
    prompt = positional[1] if len(positional) == 2 else None
    return _Command("infer", socket_arg, "--json" in options, request, prompt)


def _infer_request(model_id: str, options: dict[str, str]) -> dict[str, Any] | None:
    """The request, prompt aside; None when a value is one the full CLI refuses."""
    request: dict[str, Any] = {"call": "infer", "model": model_id, "raw": "--raw" in options}
    if "--system" in options:
        if "--raw" in options:
            return None
        request["system"] = options["--system"]
    try:
        if "--max-tokens" in options:
            request["max_tokens"] = int(options["--max-tokens"])
            if request["max_tokens"] < 1:
                return None
        if "--temperature" in options:
            temperature = float(options["--temperature"])
            if not math.isfinite(temperature) or not 0.0 <= temperature <= MAX_TEMPERATURE:
                return None
            request["temperature"] = temperature
        if "--keep-alive" in options:
            request["keep_alive_seconds"] = parse_keep_alive(options["--keep-alive"])
    except ValueError:
        return None
    return request


# --- the daemon -----------------------------------------------------------------------


def _connect(socket_arg: str | None) -> tuple[socket.socket, Path] | None:
    """A connection to the JSON Lines socket beside the daemon's socket, and that
    socket's path; None when there is none to use (the full CLI reports why)."""
    candidates = [Path(socket_arg)] if socket_arg else paths.socket_candidates()
    try:
        sock = choose_socket(candidates)
    except CliError:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(paths.json_socket(sock)))
    except OSError:
        conn.close()
        return None
    return conn, sock


def _lines(conn: socket.socket, sock: Path, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Send ``request``; the daemon's answer, a JSON object a line. An error line becomes
    CliError, as the gRPC client's failures do; so does a daemon that goes away."""
    received = False
    try:
        conn.sendall(json.dumps(request, ensure_ascii=False).encode() + b"\n")
        with conn.makefile("rb") as answer:
            for line in answer:
                try:
                    message = json.loads(line)
                except ValueError:
                    message = None
                if not isinstance(message, dict):
                    raise CliError("mmd sent an answer mmctl cannot read", EXIT_ERROR)
                error = message.get("error")
                if isinstance(error, dict):
                    raise CliError(
                        one_line(str(error.get("message") or "request failed")),
                        exit_code_for_status(error.get("status"), error.get("kind")),
                    )
                received = True
                yield message
    except TimeoutError:
        raise CliError("mmd did not answer in time (Deadline Exceeded)", EXIT_ERROR) from None
    except OSError as err:
        if isinstance(err, BrokenPipeError) and not received:
            raise CliError(unreachable_message(sock), EXIT_UNREACHABLE) from None
        raise CliError(
            f"lost the connection to mmd at {sock} ({err.strerror or err})", EXIT_UNREACHABLE
        ) from None


def probe(sock: Path, timeout: float) -> str | None:
    """Why the JSON Lines socket beside the daemon's ``sock`` cannot serve the quick
    commands; None when it can (it answered a models call)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(str(paths.json_socket(sock)))
        for message in _lines(conn, sock, {"call": "models"}):
            if isinstance(message.get("models"), list):
                return None
        return "it ended the answer without the models"
    except OSError as err:
        return err.strerror or str(err)
    except CliError as err:
        return err.message
    finally:
        conn.close()


def _query(conn: socket.socket, sock: Path, command: _Command) -> int:
    """`ps`, `models --json`, `health --json`: one answer, printed as the full CLI does."""
    conn.settimeout(_QUERY_TIMEOUT_S)
    call = "health" if command.name == "health" else "models"
    answer: dict[str, Any] | None = None
    for message in _lines(conn, sock, {"call": call}):
        answer = message
    from mmctl import tables  # after the answer: nothing to draw sooner

    if call == "health":
        health = None if answer is None else answer.get("health")
        if not isinstance(health, dict):
            raise _ended_early(sock)
        tables.print_json(health)
        return 0
    models = None if answer is None else answer.get("models")
    if not isinstance(models, list):
        raise _ended_early(sock)
    if command.name == "models":
        tables.print_json(models)
        notes = answer.get("notes") if answer is not None else None
        tables.print_notes([str(note) for note in notes or ()])
        return 0
    loaded = [model for model in models if model.get("state") not in _NOT_LISTED]
    if command.json_out:
        tables.print_json(loaded)
    else:
        tables.print_ps(loaded)
    return 0


def _infer(conn: socket.socket, sock: Path, command: _Command) -> int:
    prompt = read_input(command.prompt, "prompt")
    request = dict(command.request)
    if "system" in request:
        request["messages"] = [{"role": "user", "content": prompt}]
    else:
        request["prompt"] = prompt
    text = StreamedText(echo=not command.json_out)
    done: dict[str, Any] | None = None
    # Shown once the answer begins, as the gRPC client shows its warning metadata: a
    # request that fails instead says so in its one error line, and nothing else.
    warning: str | None = None
    try:
        for message in _lines(conn, sock, request):
            if "warning" in message:
                warning = one_line(str(message["warning"]))
                continue
            if warning is not None:
                report(f"warning: {warning}")
                warning = None
            if "text" in message:
                text.add(str(message["text"]))
            elif isinstance(message.get("done"), dict):
                done = message["done"]
    finally:
        text.end(complete=done is not None)
    if done is None:
        raise _ended_early(sock)
    if command.json_out:
        from mmctl import tables

        tables.print_json({"model": request["model"], "text": "".join(text.pieces), **done})
    return 0


def _ended_early(sock: Path) -> CliError:
    """mmd closed the connection without an answer: it is stopping, or it died."""
    return CliError(
        f"lost the connection to mmd at {sock} (it closed the connection)", EXIT_UNREACHABLE
    )
