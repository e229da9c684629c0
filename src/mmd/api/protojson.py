"""Protos as JSON-ready dicts with stable snake_case keys: one shape for ``mmctl --json``
and the daemon's HTTP endpoints, so a script reads the same keys from either."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, cast

from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from mmd.v1 import mmd_pb2

_INTEGER_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def _enum_prefix(enum: EnumDescriptor) -> str:
    # ModelState -> "MODEL_STATE_", the prefix protobuf style puts on every value.
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


def enum_short_name(enum: EnumDescriptor, number: int) -> str:
    """MODEL_STATE_READY -> "ready"; an unknown number (a newer daemon) -> its number."""
    value = enum.values_by_number.get(number)
    if value is None:
        return str(number)
    return value.name.removeprefix(_enum_prefix(enum)).lower()


def state_name(state: int) -> str:
    """A ModelState as the short lowercase name used in JSON and tables."""
    return enum_short_name(mmd_pb2.ModelState.DESCRIPTOR, state)


def _scalar(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_to_dict(value)
    if field.type == FieldDescriptor.TYPE_ENUM and field.enum_type is not None:
        return enum_short_name(field.enum_type, value)
    if field.type in _INTEGER_TYPES:
        return int(value)
    if field.type == FieldDescriptor.TYPE_FLOAT:
        # Nine significant digits round-trip a float32 without printing its binary noise.
        return float(format(value, ".9g"))
    if field.type == FieldDescriptor.TYPE_BYTES:
        return value.hex()
    return value


def message_to_dict(message: Message) -> dict[str, Any]:
    """Every field under its proto name; enums as short lowercase names, 64-bit ints as ints.

    Fields with explicit presence (proto3 `optional`, oneof members) that are
    unset become None; all others are always present.
    """
    out: dict[str, Any] = {}
    for field in cast("Sequence[FieldDescriptor]", message.DESCRIPTOR.fields):
        value = getattr(message, field.name)
        if field.is_repeated:
            out[field.name] = [_scalar(field, item) for item in value]
        elif field.has_presence and field.type != FieldDescriptor.TYPE_MESSAGE:
            out[field.name] = _scalar(field, value) if message.HasField(field.name) else None
        else:
            out[field.name] = _scalar(field, value)
    return out


def model_to_dict(model: mmd_pb2.Model) -> dict[str, Any]:
    """A model as JSON: always has "id", "state" (short name) and "pid"."""
    return message_to_dict(model)


EVENT_TYPES = ("snapshot", "model", "request", "memory", "alert", "lagged")


def event_type(event: mmd_pb2.Event) -> str:
    return event.WhichOneof("kind") or "unknown"


def event_to_dict(event: mmd_pb2.Event) -> dict[str, Any]:
    """An event as ``mmctl events --json`` and the dashboard's stream show it: {"type": ...,
    "time": unix seconds, then the event's own fields}."""
    kind = event_type(event)
    out: dict[str, Any] = {"type": kind, "time": event.time_unix}
    if kind in EVENT_TYPES:
        out.update(message_to_dict(getattr(event, kind)))
    return out
