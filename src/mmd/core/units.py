"""Byte sizes and durations as written in the config and on the command line."""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_DURATION_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

GIB = 1024**3
MIB = 1024**2


def parse_size(text: str | int) -> int:
    """``"20GiB"``, ``"300MiB"``, ``"512MB"``, ``"1000"`` or an int -> bytes."""
    if isinstance(text, bool):
        raise ValueError("expected a size such as '8GiB', not a boolean")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. '8GiB', '300MiB', '512MB')")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[(unit or "b").lower()])


def parse_duration(text: str | int | float) -> float:
    """``"5m"``, ``"30s"``, ``"1h"``, ``300``, ``0`` or ``-1`` (forever) -> seconds."""
    if isinstance(text, bool):
        raise ValueError("expected a duration such as '5m', not a boolean")
    if isinstance(text, int | float):
        return float(text)
    match = _DURATION_RE.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. '30s', '5m', '1h', 0 or -1)")
    number, unit = match.groups()
    return float(number) * _DURATION_UNITS[unit or "s"]


# A keep-alive of -1 keeps a model loaded for good; no other negative means anything.
KEEP_FOREVER = -1.0


def parse_keep_alive(text: str | int | float) -> float:
    """A keep-alive: a duration of 0 or more, or -1 (``-1``, ``"-1"``, ``"-1s"``) for never
    unloading. Any other negative is refused: ``"-2s"`` once silently meant forever."""
    seconds = parse_duration(text)
    if seconds < 0 and seconds != KEEP_FOREVER:
        raise ValueError(f"must be 0 or more, or -1 to never unload, got {text!r}")
    return seconds


def format_size(num_bytes: int | float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
