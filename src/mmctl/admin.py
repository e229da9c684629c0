"""mmctl reload and mmctl doctor: operating the daemon and checking a machine's setup."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmctl import tables
from mmctl.errors import EXIT_ERROR
from mmctl.options import JsonFlag, client_for, socket_of
from mmd.api import protojson


def reload(ctx: typer.Context, json_out: JsonFlag = False) -> None:
    """Re-read the daemon's config file (like SIGHUP or `systemctl reload mmd`).

    Added models appear; removed ones are drained (running requests finish) and unloaded;
    changed settings apply at each model's next load. An invalid config is refused with
    the reason (exit 2) and the old one stays in force.
    """
    with client_for(ctx) as client:
        response = client.reload()
    if json_out:
        tables.print_json(protojson.message_to_dict(response))
        return
    typer.echo(f"reloaded {response.source or 'built-in defaults'}")
    for label, ids in (
        ("added", response.added),
        ("removed", response.removed),
        ("changed", response.changed),
    ):
        if ids:
            typer.echo(f"  {label}: {', '.join(ids)}")
    if not (response.added or response.removed or response.changed):
        typer.echo("  no changes")


def doctor(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            metavar="PATH",
            help="Config file to check [default: the daemon's lookup: $MMD_CONFIG, "
            "$XDG_CONFIG_HOME/mmd/mmd.toml, /etc/mmd/mmd.toml].",
            show_default=False,
        ),
    ] = None,
    json_out: JsonFlag = False,
) -> None:
    """Check the setup: llama-server, GPUs, config, model files, socket, daemon.

    Each check is ok, warn or fail with a hint; exits 1 when any check failed.
    """
    from mmctl import doctor as checks_module  # heavy: only for this command

    checks = checks_module.run_checks(config, socket_of(ctx))
    if json_out:
        tables.print_json(checks_module.as_json(checks))
    else:
        checks_module.print_checks(checks)
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(EXIT_ERROR)


def register(app: typer.Typer) -> None:
    """Attach the commands to mmctl's app."""
    app.command(name="reload")(reload)
    app.command(name="doctor")(doctor)
