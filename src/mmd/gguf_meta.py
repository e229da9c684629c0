"""A GGUF file's metadata keys, read without its tensors: whether it has a chat template.

The footprint code reads a model's shape; this answers one question it does not ask, cheaply
enough for a request (the metadata is scanned once per file version, memory-mapped, with
string arrays such as a 256k-token vocabulary stepped over, never decoded).
"""

from __future__ import annotations

import functools
import mmap
import struct
from pathlib import Path

CHAT_TEMPLATE_KEY = b"tokenizer.chat_template"

_STRING = 8
_ARRAY = 9
# Value types of fixed size: uint8, int8, uint16, int16, uint32, int32, float32, bool,
# uint64, int64, float64.
_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def has_chat_template(path: Path) -> bool | None:
    """Whether the GGUF file at ``path`` carries ``tokenizer.chat_template``; None when that
    cannot be told (unreadable, not a little-endian GGUF file, malformed)."""
    try:
        info = path.stat()
        return _has_key(path.resolve(), info.st_size, info.st_mtime_ns, CHAT_TEMPLATE_KEY)
    except (OSError, ValueError, struct.error):
        return None


@functools.lru_cache(maxsize=256)
def _has_key(path: Path, size: int, mtime_ns: int, wanted: bytes) -> bool:
    """Keyed by size and mtime too: a file replaced on disk is read again."""
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise ValueError("not a GGUF file")
        (version,) = struct.unpack_from("<I", data, 4)
        if not 1 <= version <= 0xFFFF:
            raise ValueError("big-endian or unknown GGUF version")
        (count,) = struct.unpack_from("<Q", data, 16)
        offset = 24
        for _ in range(count):
            (length,) = struct.unpack_from("<Q", data, offset)
            key = data[offset + 8 : offset + 8 + length]
            (kind,) = struct.unpack_from("<I", data, offset + 8 + length)
            offset += 12 + length
            if key == wanted:
                return True
            offset = _skip_value(data, offset, kind)
    return False


def _skip_value(data: mmap.mmap, offset: int, kind: int) -> int:
    if kind in _FIXED_SIZES:
        return offset + _FIXED_SIZES[kind]
    if kind == _STRING:
        length: int = struct.unpack_from("<Q", data, offset)[0]
        return offset + 8 + length
    if kind == _ARRAY:
        item: int
        count: int
        item, count = struct.unpack_from("<IQ", data, offset)
        offset += 12
        if item in _FIXED_SIZES:
            return offset + _FIXED_SIZES[item] * count
        for _ in range(count):
            offset = _skip_value(data, offset, item)
            if offset > len(data):
                raise ValueError("array runs past the end of the file")
        return offset
    raise ValueError(f"unknown GGUF value type {kind}")
