"""`mmctl chat ID`: a conversation with a model, on a terminal or one turn per piped line.

The session keeps the history and sends it whole with each turn (the daemon and
llama-server keep no conversation; llama-server's prompt cache makes the repeated part
cheap). A failed turn is left out of the history, so the next one starts from the last
answer that arrived whole.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Annotated

import typer

from mmctl.client import MmdClient
from mmctl.errors import EXIT_UNKNOWN_MODEL, EXIT_UNREACHABLE, EXIT_USAGE, CliError
from mmctl.generate import KeepAlive, Temperature, keep_alive_seconds
from mmctl.options import ModelId, client_for
from mmd.v1 import mmd_pb2

PROMPT = ">>> "
HELP = """\
  /clear   forget the conversation
  /bye     end the chat (so does Ctrl-D)
  Ctrl-C   stop the answer being written"""
# Failures after which another turn cannot go better: the session ends with their code.
_FATAL = (EXIT_UNREACHABLE, EXIT_UNKNOWN_MODEL)
# llama-server's words for a prompt longer than the model's context (an HTTP 400, which
# mmd passes on as INVALID_ARGUMENT with them).
_CONTEXT_FULL = "exceeds the available context size"


def _say(line: str) -> None:
    """A line for the person at the terminal (stderr: stdout carries only answers)."""
    sys.stdout.flush()
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class Session:
    def __init__(
        self,
        client: MmdClient,
        model: mmd_pb2.Model,
        system: str | None,
        max_tokens: int | None,
        temperature: float | None,
        keep_alive: float | None,
    ) -> None:
        self.client = client
        self.model = model
        self.system = system
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.keep_alive = keep_alive
        self.history: list[mmd_pb2.ChatMessage] = []
        self.warnings: set[str] = set()  # shown once per session, not once per turn
        self.status = 0  # of the last turn that failed (piped input ends with it)

    def request(self, text: str) -> mmd_pb2.InferRequest:
        request = mmd_pb2.InferRequest(model_id=self.model.id, messages=self.history)
        request.messages.append(mmd_pb2.ChatMessage(role="user", content=text))
        if self.system is not None:
            request.system = self.system
        if self.max_tokens is not None:
            request.max_tokens = self.max_tokens
        if self.temperature is not None:
            request.temperature = self.temperature
        if self.keep_alive is not None:
            request.keep_alive_seconds = self.keep_alive
        return request

    def turn(self, text: str) -> None:
        """Send one user turn with the history; stream the answer to stdout. The turn joins
        the history once its answer arrived whole."""
        pieces: list[str] = []
        try:
            for chunk in self.client.infer(self.request(text), shown_warnings=self.warnings):
                if chunk.WhichOneof("kind") == "text":
                    pieces.append(chunk.text)
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            # Leaving the stream cancelled the call: the daemon stops generating.
            self._end_line(pieces)
            _say("(answer stopped; it is not kept in the conversation)")
            return
        except CliError as err:
            self._end_line(pieces)
            if err.exit_code in _FATAL:
                raise
            self.status = err.exit_code
            _say(f"mmctl: {self._explain(err)}")
            return
        self._end_line(pieces)
        answer = "".join(pieces)
        self.history.append(mmd_pb2.ChatMessage(role="user", content=text))
        self.history.append(mmd_pb2.ChatMessage(role="assistant", content=answer))

    def _explain(self, err: CliError) -> str:
        message = " ".join(err.message.split())
        if err.exit_code == EXIT_USAGE and _CONTEXT_FULL in message:
            return f"{message} (the conversation outgrew the model's context: /clear forgets it)"
        return message

    @staticmethod
    def _end_line(pieces: list[str]) -> None:
        if pieces and not pieces[-1].endswith("\n"):
            sys.stdout.write("\n")
            sys.stdout.flush()

    def command(self, line: str) -> bool:
        """Run a /command; False when it ends the session."""
        word = line.split()[0]
        if word in ("/bye", "/exit"):
            return False
        if word == "/clear":
            self.history.clear()
            _say("(conversation cleared)")
        elif word in ("/help", "/?"):
            _say(HELP)
        else:
            _say(f"mmctl: unknown command {word} (/help lists them)")
        return True

    def take(self, line: str) -> bool:
        """One line of input: a command or a turn; False when the session ends."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            return self.command(text)
        self.turn(line.rstrip("\r\n"))
        return True


def _terminal_lines() -> Iterator[str]:
    """Lines typed at the prompt, with line editing where stdout is a terminal too;
    Ctrl-C at the prompt clears the line, Ctrl-D ends."""
    if sys.stdout.isatty():
        import readline  # noqa: F401  (line editing and recall for input())
    while True:
        try:
            if sys.stdout.isatty():
                line = input(PROMPT)
            else:
                sys.stderr.write(PROMPT)
                sys.stderr.flush()
                line = input()
        except EOFError:
            sys.stderr.write("\n")
            return
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            _say("(Ctrl-D or /bye ends the chat)")
            continue
        yield line


def _piped_lines() -> Iterator[str]:
    for number, raw in enumerate(sys.stdin.buffer, start=1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise CliError(
                f"line {number} of stdin is not valid UTF-8 (byte 0x{raw[err.start]:02x})",
                EXIT_USAGE,
            ) from None


def _find_model(client: MmdClient, model_id: str) -> mmd_pb2.Model:
    """The model, asked for at once: an unknown id fails before the first question."""
    for model in client.list_models():
        if model.id == model_id:
            return model
    raise CliError(f"unknown model {model_id!r} (see 'mmctl models')", EXIT_UNKNOWN_MODEL)


def chat(
    ctx: typer.Context,
    model_id: ModelId,
    system: Annotated[
        str | None,
        typer.Option("--system", metavar="S", help="A system prompt for the whole chat."),
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", metavar="N", min=1, help="At most N tokens per answer."),
    ] = None,
    temperature: Temperature = None,
    keep_alive: KeepAlive = None,
) -> None:
    """Chat with a model: each answer streams, and the conversation is kept until the end.

    On a terminal: type a message and Enter; Ctrl-C stops an answer, /clear forgets the
    conversation, /bye or Ctrl-D ends the chat. With stdin piped, each line is one turn of
    the same conversation and stdout carries the answers alone.

    Example: `mmctl chat smol --system "Answer briefly."`
    """
    seconds = keep_alive_seconds(keep_alive)
    interactive = sys.stdin.isatty()
    with client_for(ctx) as client:
        model = _find_model(client, model_id)
        session = Session(client, model, system, max_tokens, temperature, seconds)
        if interactive:
            _say(f"chatting with {model.id} (/help lists the commands; /bye or Ctrl-D ends)")
        for line in _terminal_lines() if interactive else _piped_lines():
            if not session.take(line):
                break
    if not interactive and session.status:
        raise typer.Exit(session.status)
