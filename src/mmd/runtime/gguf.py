"""A model's shape read from its GGUF header, and the footprint estimated from it.

The header is memory-mapped and only its metadata and tensor infos are read (the tensor
data is never touched); :func:`mmd.core.footprint.estimate` turns the shape into bytes.
Kept apart from the arithmetic so that the core reads no file.
"""

from __future__ import annotations

import functools
import re
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import GGUFReader, GGUFValueType

from mmd.core.errors import ConfigError
from mmd.core.footprint import Footprint, ModelShape, estimate
from mmd.core.spec import ModelSpec

GGUF_MAGIC = b"GGUF"


# Architectures whose GGUF does not say which layers use the sliding window:
# llama.cpp uses it on every layer except each n-th one.
_SWA_PERIOD = {"gemma2": 2, "gemma3": 6, "cohere2": 4, "gpt-oss": 2}


_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.")


class GGUFError(ValueError):
    """A file that is not a readable GGUF model; the message names the path."""


class _HeaderReader(GGUFReader):
    """``GGUFReader`` that takes each array in one piece.

    The stock reader builds one numpy view per array element, which takes seconds for
    a vocabulary of 256k tokens; mmd reads only scalars, tensor infos and array
    lengths. Arrays of numbers become one view; arrays of strings are stepped over.
    """

    def _get_field_parts(
        self, orig_offs: int, raw_type: int
    ) -> tuple[int, list[npt.NDArray[Any]], list[int], list[GGUFValueType]]:
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        item_type = self._get(orig_offs, np.uint32)
        length = self._get(orig_offs + 4, np.uint64)
        start = orig_offs + 12
        gtype = GGUFValueType(int(item_type[0]))
        np_type = self.gguf_scalar_to_np.get(gtype)
        if np_type is not None:
            values = self._get(start, np_type, int(length[0]))
            if len(values) != int(length[0]):
                raise ValueError("array runs past the end of the file")
            size = 12 + int(values.nbytes)
            return size, [item_type, length, values], [2], [GGUFValueType.ARRAY, gtype]
        if gtype == GGUFValueType.STRING:
            end = self._skip_strings(start, int(length[0]))
            return end - orig_offs, [item_type, length], [], [GGUFValueType.ARRAY, gtype]
        return super()._get_field_parts(orig_offs, raw_type)

    def _skip_strings(self, offset: int, count: int) -> int:
        swapped = self.byte_order == "S"
        little = (sys.byteorder == "little") != swapped
        length_format = "<Q" if little else ">Q"
        data = self.data.data  # a memoryview over the mapped bytes
        for _ in range(count):
            (length,) = struct.unpack_from(length_format, data, offset)
            offset += 8 + length
        if offset > len(data):
            raise ValueError("string array runs past the end of the file")
        return offset


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic."""
    try:
        with path.open("rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_shape(path: Path) -> ModelShape:
    """Read a model's shape from its GGUF header (memory-mapped, tensor data untouched)."""
    if path.is_dir():
        raise GGUFError(f"{path}: is a directory, not a GGUF file")
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    if not is_gguf(path):
        raise GGUFError(f"{path}: not a GGUF file")
    info = path.stat()
    return _read_shape_cached(path.resolve(), info.st_size, info.st_mtime_ns)


def has_chat_template(path: Path) -> bool | None:
    """Whether the GGUF file at ``path`` carries a chat template; None when that cannot be
    told (missing, not GGUF, unreadable). Read with the shape, once per file version."""
    try:
        return read_shape(path).chat_template
    except GGUFError:
        return None


# Config validation, reloads and the daemon all ask for the same headers; a registry of a
# thousand models may name a few files. Keyed by size and mtime so that a file replaced
# on disk is read again.
@functools.lru_cache(maxsize=4096)
def _read_shape_cached(path: Path, size: int, mtime_ns: int) -> ModelShape:
    try:
        reader = _HeaderReader(path)
        return _shape_from(reader, path)
    except GGUFError:
        raise
    except (OSError, ValueError, KeyError, IndexError, struct.error) as exc:
        raise GGUFError(f"{path}: unreadable GGUF file ({exc})") from exc


def _field(reader: GGUFReader, key: str) -> Any:
    """A metadata value: str, int/float, a tuple for arrays, or None when absent."""
    field = reader.get_field(key)
    if field is None:
        return None
    main = field.types[0]
    if main == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8")
    if main == GGUFValueType.ARRAY:
        return tuple(field.parts[field.data[0]].tolist()) if field.data else ()
    return field.parts[-1].tolist()[0]


def _array_length(reader: GGUFReader, key: str) -> int:
    field = reader.get_field(key)
    if field is None or field.types[0] != GGUFValueType.ARRAY:
        return 0
    # parts: key length, key, value type, item type, item count, items...
    return int(field.parts[4][0])


def _shape_from(reader: GGUFReader, path: Path) -> ModelShape:
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str):
        raise GGUFError(f"{path}: missing key general.architecture")

    def number(name: str, default: int | None = None) -> int:
        value = _field(reader, f"{arch}.{name}")
        if isinstance(value, tuple):  # per-layer values: size for the largest
            value = max(value, default=default)
        if value is None:
            if default is None:
                raise GGUFError(f"{path}: missing key {arch}.{name}")
            return default
        return int(value)

    n_layers = number("block_count")
    n_embd = number("embedding_length")
    n_head = number("attention.head_count")
    n_head_kv = number("attention.head_count_kv", n_head)
    head_dim = n_embd // n_head if n_head else 0
    head_dim_k = number("attention.key_length", head_dim)
    head_dim_v = number("attention.value_length", head_dim)

    layer_bytes = [0] * n_layers
    other_bytes = 0
    names = set()
    token_embd_bytes = 0
    n_vocab = 0
    for tensor in reader.tensors:
        names.add(tensor.name)
        match = _BLOCK_NAME.match(tensor.name)
        if match and int(match.group(1)) < n_layers:
            layer_bytes[int(match.group(1))] += int(tensor.n_bytes)
            continue
        other_bytes += int(tensor.n_bytes)
        if tensor.name == "token_embd.weight":
            token_embd_bytes = int(tensor.n_bytes)
            n_vocab = int(tensor.shape[-1])
    n_vocab = _array_length(reader, "tokenizer.ggml.tokens") or n_vocab

    sliding_window = number("attention.sliding_window", 0)
    return ModelShape(
        chat_template="tokenizer.chat_template" in reader.fields,
        architecture=arch,
        n_layers=n_layers,
        layer_weight_bytes=tuple(layer_bytes),
        other_weight_bytes=other_bytes,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        context_train=number("context_length", 0),
        file_bytes=path.stat().st_size,
        n_ff=number("feed_forward_length", 0),
        n_vocab=n_vocab,
        n_merges=_array_length(reader, "tokenizer.ggml.merges"),
        token_embd_bytes=token_embd_bytes,
        tied_embeddings="output.weight" not in names,
        sliding_window=sliding_window,
        swa_layers=_swa_layers(reader, arch, n_layers) if sliding_window else (),
        pooling_type=number("pooling_type", -1),
    )


def _swa_layers(reader: GGUFReader, arch: str, n_layers: int) -> tuple[bool, ...]:
    pattern = _field(reader, f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, tuple) and len(pattern) == n_layers:
        return tuple(bool(v) for v in pattern)
    period = _SWA_PERIOD.get(arch)
    if period is None:
        return ()  # unknown: size every layer for the full context (never too small)
    return tuple(i % period < period - 1 for i in range(n_layers))


def footprint_for(spec: ModelSpec) -> Footprint:
    """The model's estimated footprint (or its ``memory`` override)."""
    try:
        shape = read_shape(spec.path)
    except ValueError as err:
        raise ConfigError(f"models.{spec.id}.path: {err}") from None
    footprint = estimate(shape, ctx=spec.ctx, parallel=spec.parallel)
    if spec.memory is not None:
        footprint = footprint.scaled_to(spec.memory)
    return footprint
