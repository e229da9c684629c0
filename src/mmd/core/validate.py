"""Request checks shared by every front door (gRPC, HTTP): plain values in, plain values
or InvalidRequest out, so that both refuse the same things with the same words."""

from __future__ import annotations

import math
from collections.abc import Iterable

from mmd.core.errors import InvalidRequest

MAX_KEEP_ALIVE_S = 365 * 24 * 3600.0
MAX_TEMPERATURE = 5.0
CHAT_ROLES = ("system", "user", "assistant")


def model_id(value: str) -> str:
    if not value:
        raise InvalidRequest("model_id is empty")
    return value


def keep_alive(seconds: float | None) -> float | None:
    """A request's own keep-alive: None when unset, -1 for forever (any negative)."""
    if seconds is None:
        return None
    if math.isnan(seconds) or seconds == math.inf or seconds > MAX_KEEP_ALIVE_S:
        raise InvalidRequest(f"keep_alive_seconds must be at most {MAX_KEEP_ALIVE_S:g}")
    return -1.0 if seconds < 0 else seconds


def size(what: str, num_bytes: int, limit: int) -> None:
    if num_bytes > limit:
        raise InvalidRequest(
            f"{what} is {num_bytes} bytes; the limit is {limit} (max_prompt_bytes)"
        )


def text_bytes(texts: Iterable[str]) -> int:
    return sum(len(text.encode()) for text in texts)


def max_tokens(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise InvalidRequest(f"max_tokens must be >= 1, got {value}")
    return value


def temperature(value: float | None) -> float | None:
    if value is not None and not 0.0 <= value <= MAX_TEMPERATURE:
        raise InvalidRequest(f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {value}")
    return value


def gpu_layers(value: int | None) -> int | None:
    if value is not None and value < 0:
        raise InvalidRequest(f"gpu_layers must be >= 0, got {value}")
    return value


def unload_timeout(seconds: float) -> float:
    if not 0 <= seconds < math.inf:
        raise InvalidRequest("timeout_seconds must be a finite number >= 0")
    return seconds
