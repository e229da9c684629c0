"""What mmctl's commands share: option types and checks, and the client for --socket."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from mmctl.client import MmdClient

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
ModelId = Annotated[str, typer.Argument(metavar="ID", help="Model id from the registry.")]


def finite(value: float | None) -> float | None:
    """An option callback: click's float ranges let "nan" and "inf" through."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number.")
    return value


def socket_of(ctx: typer.Context) -> Path | None:
    """--socket or $MMD_SOCKET; None: MmdClient tries paths.socket_candidates()."""
    socket = ctx.find_root().obj
    return socket if isinstance(socket, Path) else None


def client_for(ctx: typer.Context) -> MmdClient:
    """A client for the daemon the command line names (use it in a 'with' block)."""
    return MmdClient(socket_of(ctx))
