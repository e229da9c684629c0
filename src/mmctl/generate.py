"""mmctl's commands that run a model: infer (streamed text) and embed (vectors).

Prompts come from the argument or stdin (strict UTF-8, never empty).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated

import typer

from mmctl import tables
from mmctl.answers import StreamedText
from mmctl.client import MmdClient
from mmctl.errors import EXIT_INTERRUPTED, EXIT_UNREACHABLE, CliError
from mmctl.options import ModelId, client_for, finite
from mmctl.prompts import decoded, read_input
from mmd.api import protojson
from mmd.core.units import parse_keep_alive
from mmd.core.validate import MAX_TEMPERATURE
from mmd.v1 import mmd_pb2

Temperature = Annotated[
    float | None,
    typer.Option(
        "--temperature",
        metavar="T",
        min=0.0,
        max=MAX_TEMPERATURE,
        callback=finite,
        help="Sampling temperature.",
    ),
]
KeepAlive = Annotated[
    str | None,
    typer.Option(
        "--keep-alive",
        metavar="DUR",
        help="Keep the model loaded this long after the request ('30s', '5m', '1h'; -1: forever).",
    ),
]


def keep_alive_seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_keep_alive(value)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="'--keep-alive'") from None


def infer(
    ctx: typer.Context,
    model_id: ModelId,
    prompt: Annotated[
        str | None,
        typer.Argument(
            metavar="PROMPT",
            help="The prompt; read from stdin when omitted or '-'.",
            show_default=False,
        ),
    ] = None,
    system: Annotated[
        str | None,
        typer.Option("--system", metavar="S", help="A system prompt for the chat."),
    ] = None,
    raw: Annotated[
        bool,
        typer.Option(
            "--raw",
            help="Send the prompt as it is, for the model to continue, without its chat template.",
        ),
    ] = False,
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", metavar="N", min=1, help="Generate at most N tokens."),
    ] = None,
    temperature: Temperature = None,
    keep_alive: KeepAlive = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object with the text and totals.")
    ] = False,
    each_line: Annotated[
        bool,
        typer.Option(
            "--each-line",
            help="Answer every line of stdin as a prompt of its own, in order, and print one "
            "JSON object per line (JSON Lines): a script's many prompts in one mmctl.",
        ),
    ] = False,
) -> None:
    """Answer a prompt; the text streams to stdout as it arrives.

    The prompt is the user's turn of a chat, through the model's chat template, when its
    GGUF file has one; else (or with --raw) it is sent as it is, for the model to continue.

    Example: `cat notes.txt | mmctl infer summarizer --max-tokens 200`

    Many prompts, one a line: `mmctl infer summarizer --each-line < prompts.txt > answers.jsonl`
    """
    if raw and system is not None:
        raise typer.BadParameter("--raw sends the prompt as it is, without a chat: no --system")
    if each_line and prompt not in (None, "-"):
        raise typer.BadParameter("--each-line reads its prompts from stdin: no PROMPT argument")
    options = _Options(
        model_id, system, raw, max_tokens, temperature, keep_alive_seconds(keep_alive)
    )
    if each_line:
        _each_line(ctx, options)
        return
    text = read_input(prompt, "prompt")
    with client_for(ctx) as client:
        pieces, done = _answer(client, options.request(text), echo=not json_out)
    if json_out:
        tables.print_json(_answer_json(model_id, pieces, done))


@dataclass(frozen=True)
class _Options:
    """What every prompt of one ``mmctl infer`` is sent with."""

    model_id: str
    system: str | None
    raw: bool
    max_tokens: int | None
    temperature: float | None
    keep_alive_seconds: float | None

    def request(self, text: str) -> mmd_pb2.InferRequest:
        request = mmd_pb2.InferRequest(model_id=self.model_id, raw=self.raw)
        if self.system is not None:
            request.messages.append(mmd_pb2.ChatMessage(role="user", content=text))
            request.system = self.system
        else:
            request.prompt = text
        if self.max_tokens is not None:
            request.max_tokens = self.max_tokens
        if self.temperature is not None:
            request.temperature = self.temperature
        if self.keep_alive_seconds is not None:
            request.keep_alive_seconds = self.keep_alive_seconds
        return request


def _answer(
    client: MmdClient,
    request: mmd_pb2.InferRequest,
    *,
    echo: bool,
    shown_warnings: set[str] | None = None,
) -> tuple[list[str], mmd_pb2.InferDone]:
    """The answer's pieces and totals; with ``echo``, each piece written to stdout at once."""
    text = StreamedText(echo)
    done: mmd_pb2.InferDone | None = None
    try:
        for chunk in client.infer(request, shown_warnings=shown_warnings):
            kind = chunk.WhichOneof("kind")
            if kind == "text":
                text.add(chunk.text)
            elif kind == "done":
                done = chunk.done
    finally:
        text.end(complete=done is not None)
    if done is None:
        raise CliError(f"mmd ended the answer from {request.model_id!r} without its final totals")
    return text.pieces, done


def _answer_json(model_id: str, pieces: list[str], done: mmd_pb2.InferDone) -> dict[str, object]:
    return {
        "model": model_id,
        "text": "".join(pieces),
        "mode": done.mode,
        "finish_reason": done.finish_reason,
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "timings": protojson.message_to_dict(done.timings),
    }


# Failures after which the next line cannot fare better: the run stops there.
_STOPS_THE_RUN = frozenset({EXIT_UNREACHABLE, EXIT_INTERRUPTED})


def _each_line(ctx: typer.Context, options: _Options) -> None:
    """--each-line: each non-blank line of stdin is answered as it arrives, one JSON object
    out per line, with its line number ("line", from 1). A line that fails gets {"line",
    "error", "exit_code"} and the next one goes on; mmctl then exits with the first
    failure's code. An unreachable daemon or Ctrl-C ends the run at once."""
    if sys.stdin.isatty():
        sys.stderr.write("mmctl: reading prompts from stdin, one per line (end with Ctrl-D)\n")
        sys.stderr.flush()
    first_failure = 0
    shown_warnings: set[str] = set()  # a warning (the prompt mode) once, not once a line
    with client_for(ctx) as client:
        for number, data in enumerate(sys.stdin.buffer, start=1):
            try:
                text = decoded(data, f"line {number}").rstrip("\r\n")
                if not text.strip():
                    continue
                pieces, done = _answer(
                    client, options.request(text), echo=False, shown_warnings=shown_warnings
                )
            except CliError as failure:
                if failure.exit_code in _STOPS_THE_RUN:
                    raise
                first_failure = first_failure or failure.exit_code
                tables.print_json_line(_failed_line(number, failure))
                continue
            tables.print_json_line({"line": number, **_answer_json(options.model_id, pieces, done)})
    if first_failure:
        raise typer.Exit(first_failure)


def _failed_line(number: int, failure: CliError) -> dict[str, object]:
    return {"line": number, "error": failure.message, "exit_code": failure.exit_code}


def embed(
    ctx: typer.Context,
    model_id: ModelId,
    texts: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="TEXT",
            help="Text(s) to embed; read from stdin when omitted or '-'.",
            show_default=False,
        ),
    ] = None,
    keep_alive: KeepAlive = None,
    json_out: Annotated[
        bool,
        typer.Option(
            "--json", help='Print {"model", "embeddings", "prompt_tokens"} instead of vectors.'
        ),
    ] = False,
) -> None:
    """Print embedding vectors as JSON: a list of floats for one text, a list of lists for more."""
    seconds = keep_alive_seconds(keep_alive)
    if not texts or texts == ["-"]:
        inputs = [read_input(None, "text")]
    else:
        inputs = [read_input(text, "text") for text in texts]
    with client_for(ctx) as client:
        response = client.embed(model_id, inputs, keep_alive_seconds=seconds)
    vectors = [protojson.message_to_dict(embedding)["values"] for embedding in response.embeddings]
    if json_out:
        tables.print_json(
            {"model": model_id, "embeddings": vectors, "prompt_tokens": response.prompt_tokens}
        )
    else:
        import json

        typer.echo(json.dumps(vectors[0] if len(inputs) == 1 and vectors else vectors))
