"""mmctl: the command line for the mmd daemon."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from typer.core import TyperGroup

from mmctl import chat, generate, observe, render, tables, top
from mmctl.client import exit_code_for
from mmctl.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_NO_ROOM,
    EXIT_USAGE,
    CliError,
    finish,
    report,
)
from mmctl.options import JsonFlag, ModelId, client_for, finite
from mmd.api import protojson
from mmd.host import paths
from mmd.v1 import mmd_pb2

EXIT_CODES_HELP = """\
Exit codes:

* 0: success

* 1: any other error (including an aborted request or a timeout)

* 2: invalid usage or argument (also when mmd rejects the request as invalid)

* 3: the daemon is unreachable (no socket, nothing listening, no permission)

* 4: unknown model

* 5: not enough memory for the model, or the request queue is full
(`plan` also exits 5 when the load would be refused)

* 6: the model's runtime (llama-server) failed

* 130: interrupted (Ctrl-C)

* 141: the output was closed early (`mmctl ... | head`), as when killed by SIGPIPE
"""


def run_guarded(call: Callable[[], Any]) -> int:
    """Run the command line, turning every expected failure into one stderr line and a code."""
    try:
        result = call()
    except CliError as err:
        report(err.message)
        return err.exit_code
    except typer.TyperException as err:  # usage errors, bad parameters
        if type(err).__name__ == "NoArgsIsHelpError":  # help was already printed
            return EXIT_USAGE
        ctx = getattr(err, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        report(err.format_message() + hint)
        return int(getattr(err, "exit_code", EXIT_USAGE))
    except typer.Abort:
        report("aborted")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # nobody is left to read a message
        return EXIT_BROKEN_PIPE
    except grpc.RpcError as err:  # the client maps these; this is a safety net
        report(err.details() or "request failed")
        return exit_code_for(err)
    return result if isinstance(result, int) else 0


def hoist_socket(args: list[str]) -> list[str]:
    """`mmctl ps --socket S` as `mmctl --socket S ps`: --socket belongs to mmctl itself, but
    it is as natural after the command. Nothing after `--` moves (that is an argument)."""
    front: list[str] = []
    rest: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            rest += args[index:]
            break
        if arg == "--socket" and index + 1 < len(args):
            front += args[index : index + 2]
            index += 2
            continue
        (front if arg.startswith("--socket=") else rest).append(arg)
        index += 1
    return front + rest


class MmctlGroup(TyperGroup):
    """The root command group: applies run_guarded around everything Typer does."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        args = hoist_socket(list(sys.argv[1:] if args is None else args))
        code = run_guarded(
            lambda: super(MmctlGroup, self).main(
                args,
                prog_name,
                complete_var,
                standalone_mode=False,
                windows_expand_args=windows_expand_args,
                **extra,
            )
        )
        if standalone_mode:
            sys.exit(code)
        return code

    # Help and --version are printed while parsing, commands (and their help) while invoking.
    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        with _broken_pipe_exits_141():
            return super().parse_args(ctx, args)

    def invoke(self, ctx: Any) -> Any:
        with _broken_pipe_exits_141():
            return super().invoke(ctx)


@contextlib.contextmanager
def _broken_pipe_exits_141() -> Iterator[None]:
    """Click ends a broken pipe with exit 1, and so does rich (which draws typer's help);
    scripts with `set -o pipefail` expect what a process killed by SIGPIPE gives, 141."""
    try:
        yield
    except BrokenPipeError:
        raise typer.Exit(EXIT_BROKEN_PIPE) from None
    except SystemExit as exit:
        # rich's Console.on_broken_pipe points stdout at /dev/null, then exits 1.
        if exit.code == 1 and _stdout_is_devnull():
            raise typer.Exit(EXIT_BROKEN_PIPE) from None
        raise


def _stdout_is_devnull() -> bool:
    try:
        out, null = os.fstat(sys.stdout.fileno()), os.stat(os.devnull)
    except (OSError, ValueError):
        return False
    return (out.st_dev, out.st_ino) == (null.st_dev, null.st_ino)


app = typer.Typer(
    name="mmctl",
    cls=MmctlGroup,
    help="Control mmd, the daemon that runs local LLMs (llama-server) within the machine's memory.",
    epilog=EXIT_CODES_HELP,
    rich_markup_mode="markdown",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

GpuLayers = Annotated[
    int | None,
    typer.Option(
        "--gpu-layers",
        metavar="N",
        help="Layers to offload to GPUs, overriding the registry for this load.",
    ),
]


def _version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"mmctl {version('mmd')}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    socket: Annotated[
        Path | None,
        typer.Option(
            "--socket",
            envvar=paths.SOCKET_ENV,
            metavar="PATH",
            help="The daemon's Unix socket [default: the user's own, "
            "$XDG_RUNTIME_DIR/mmd/mmd.sock (else /tmp/mmd-UID/mmd.sock), "
            "when it exists, else the system's, /run/mmd/mmd.sock].",
            show_default=False,
            # Access is checked when connecting, where it is reported as exit 3.
            readable=False,
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    ctx.obj = socket  # None: MmdClient tries paths.socket_candidates()


def _is_listed(model: mmd_pb2.Model) -> bool:
    return model.state not in (mmd_pb2.MODEL_STATE_UNLOADED, mmd_pb2.MODEL_STATE_UNSPECIFIED)


@app.command()
def models(ctx: typer.Context, json_out: JsonFlag = False) -> None:
    """List the registry's models with their state and where each came from."""
    with client_for(ctx) as client:
        registry = client.registry()
    if json_out:
        tables.print_json([protojson.model_to_dict(model) for model in registry.models])
        tables.print_notes(registry.notes)
    else:
        render.print_models(registry.models, registry.notes)


@app.command()
def ps(ctx: typer.Context, json_out: JsonFlag = False) -> None:
    """List the models that are loaded, loading, unloading or failed."""
    with client_for(ctx) as client:
        loaded = [model for model in client.list_models() if _is_listed(model)]
    if json_out:
        tables.print_json([protojson.model_to_dict(model) for model in loaded])
    else:
        tables.print_ps([protojson.model_to_dict(model) for model in loaded])


def _follow_load(progress: Iterable[mmd_pb2.LoadProgress]) -> mmd_pb2.Model | None:
    """Show load progress on stderr: a spinner on a terminal, else "stage: message" lines."""
    final: mmd_pb2.Model | None = None
    if sys.stderr.isatty():
        from rich.console import Console

        with Console(stderr=True).status("waiting for mmd") as status:
            for step in progress:
                if step.stage == "failed":
                    continue  # the error itself follows as mmctl's one error line
                status.update(f"{step.stage}: {step.message}" if step.message else step.stage)
                if step.HasField("model"):
                    final = step.model
    else:
        for step in progress:
            if step.stage == "failed":
                continue  # the error itself follows as mmctl's one error line
            line = f"{step.stage}: {step.message}" if step.message else step.stage
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            if step.HasField("model"):
                final = step.model
    return final


@app.command()
def load(
    ctx: typer.Context,
    model_id: ModelId,
    gpu_layers: GpuLayers = None,
    json_out: JsonFlag = False,
) -> None:
    """Load a model (evicting idle ones if needed) and wait until it is ready."""
    with client_for(ctx) as client:
        model = _follow_load(client.load_model(model_id, gpu_layers=gpu_layers))
    if model is None:
        raise CliError(f"mmd ended the load of {model_id!r} without reporting the model")
    if json_out:
        tables.print_json(protojson.model_to_dict(model))
    else:
        typer.echo(render.model_summary(model))


@app.command()
def unload(
    ctx: typer.Context,
    model_id: ModelId,
    force: Annotated[
        bool, typer.Option("--force", help="Abort in-flight requests instead of waiting.")
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            metavar="SECONDS",
            min=0.0,
            callback=finite,
            help="How long to wait for in-flight requests [default: the daemon's].",
        ),
    ] = None,
    json_out: JsonFlag = False,
) -> None:
    """Unload a model, waiting for its in-flight requests unless --force."""
    with client_for(ctx) as client:
        response = client.unload_model(model_id, force=force, timeout_seconds=timeout or 0.0)
    if json_out:
        out = protojson.model_to_dict(response.model)
        out["aborted_requests"] = response.aborted_requests
        tables.print_json(out)
        return
    line = render.model_summary(response.model)
    if response.aborted_requests:
        line += f" (aborted {response.aborted_requests} requests)"
    typer.echo(line)


# Commands that run a model (mmctl.generate), listed here to keep --help's order.
app.command()(generate.infer)
app.command()(chat.chat)
app.command()(generate.embed)


@app.command()
def health(ctx: typer.Context, json_out: JsonFlag = False) -> None:
    """Show memory per device, loaded models, active and queued requests, and notes."""
    with client_for(ctx) as client:
        report = client.get_health()
    if json_out:
        tables.print_json(protojson.message_to_dict(report))
    else:
        render.print_health(report)


@app.command()
def plan(
    ctx: typer.Context,
    model_id: ModelId,
    gpu_layers: GpuLayers = None,
    json_out: JsonFlag = False,
) -> None:
    """Show what loading a model would do now, without doing it.

    Exits 5 when the load would be refused.
    """
    with client_for(ctx) as client:
        result = client.plan_load(model_id, gpu_layers=gpu_layers)
    if json_out:
        tables.print_json(protojson.message_to_dict(result))
    else:
        typer.echo("\n".join(render.plan_lines(result)))
    if not result.feasible and not result.already_loaded:
        raise typer.Exit(EXIT_NO_ROOM)


app.command()(observe.events)
app.command()(observe.logs)
app.command()(top.top)


def main() -> None:
    """Console-script entry point of the full CLI (see mmctl.entry)."""
    code = app(standalone_mode=False)
    finish(code if isinstance(code, int) else 0)


# Commands defined in their own modules, attached to the same app.
from mmctl import admin  # noqa: E402

admin.register(app)
