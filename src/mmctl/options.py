"""Checks shared by mmctl's command-line options."""

from __future__ import annotations

import math

import typer


def finite(value: float | None) -> float | None:
    """An option callback: click's float ranges let "nan" and "inf" through."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number.")
    return value
