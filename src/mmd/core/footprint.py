"""How many bytes a model holds once llama-server has loaded it, and where.

The estimate comes from the GGUF header alone (read by :mod:`mmd.runtime.gguf`): the
real byte size of every tensor, split into repeating layers (``blk.N.*``) and the
rest, plus the KV cache for the requested context, a compute buffer and the
llama-server process itself. The planner uses it to place a model (all layers on a
GPU, a GPU/CPU split by layers, or CPU only) before loading it.

The compute-buffer and overhead terms were fitted against the resident memory of a
real llama-server on CPU (see ``bench/estimate_accuracy.py``): within 3% of RSS, and
never below it, for models of 80 MB and more; a CUDA build holds more host memory
(its libraries), which ``estimate(overhead_bytes=...)`` takes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from mmd.core.units import MIB

# llama-server defaults that size the KV cache and the compute graph.
_UBATCH = 512  # -ub: tokens per micro-batch, the compute graph is reserved for it
_KV_PAD = 256  # context, slot shares and the sliding-window cache are padded to this

# The llama-server process beyond its buffers: binary and ggml libraries, heap, threads,
# server state, plus the tokenizer's tables, which grow with the vocabulary. Fitted on
# CPU as RSS minus the logged model, KV, compute and output buffers: 22-28 MiB with a
# 227-token vocabulary, 66-69 MiB with 262144 tokens.
BASE_OVERHEAD_BYTES = 28 * MIB
OVERHEAD_BYTES_PER_TOKEN = 165  # BPE merges are charged the same (not measured)


_BUFFER_LINE = re.compile(
    r"(?P<device>[\w.-]+)\s+(?P<kind>model|KV|RS|compute|output)\s+buffer size\s*=\s*"
    r"(?P<mib>[\d.]+)\s*MiB"
)


@dataclass(frozen=True)
class ModelShape:
    """What the GGUF header says about a model's size and attention geometry."""

    architecture: str
    n_layers: int
    layer_weight_bytes: tuple[int, ...]  # per repeating block
    other_weight_bytes: int  # everything outside blk.N
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    context_train: int
    file_bytes: int
    n_ff: int = 0
    n_vocab: int = 0
    n_merges: int = 0
    token_embd_bytes: int = 0  # part of other_weight_bytes that llama.cpp keeps on the host
    tied_embeddings: bool = False  # no output.weight: the token embedding is the output layer
    sliding_window: int = 0  # tokens a sliding-window layer attends to (0: none)
    swa_layers: tuple[bool, ...] = ()  # which layers use the sliding window
    chat_template: bool = False  # has tokenizer.chat_template (else llama-server uses ChatML)
    pooling_type: int = -1  # {arch}.pooling_type: 0 none, 1 mean, 2 cls, 3 last, 4 rank; -1 unset


@dataclass(frozen=True)
class LearnedBytes:
    """Bytes a loaded model held, as measured, with ``gpu_layers`` layers offloaded."""

    gpu_layers: int  # the planner's count (the output layer not counted)
    gpu_bytes: int  # all GPUs together (NVML, per process)
    ram_bytes: int  # RSS: shared pages in full, whatever else runs beside it


@dataclass(frozen=True)
class Footprint:
    """Bytes a loaded model holds, split so that a planner can place layers."""

    layer_bytes: tuple[int, ...]  # weights + KV cache of each repeating layer (moves with it)
    fixed_bytes: int  # non-layer weights + compute buffer: where the model's "main" device is
    overhead_bytes: int  # process overhead, always in host RAM
    weights_bytes: int  # for reporting
    kv_cache_bytes: int  # for reporting
    compute_bytes: int  # for reporting
    overridden: bool = False
    host_fixed_bytes: int = 0  # part of fixed_bytes that stays in RAM even when fully offloaded
    # GPU memory a process takes as soon as it uses a GPU at all (driver context,
    # runtime buffers): on top of ``total``, which counts the model's own bytes.
    gpu_overhead_bytes: int = 0
    # Host RAM the same process takes for its GPU runtime (libraries, driver state,
    # staging buffers), also on top of ``total``.
    gpu_host_bytes: int = 0
    # What earlier loads of this model (same file and settings) measured, per number of
    # offloaded layers. Not part of a footprint's identity: a reload compares footprints
    # to see whether a model's file or settings changed, and measuring changes neither.
    learned: tuple[LearnedBytes, ...] = field(default=(), compare=False)

    @property
    def total(self) -> int:
        return sum(self.layer_bytes) + self.fixed_bytes + self.overhead_bytes

    def split(self, gpu_layers: int) -> tuple[int, int]:
        """(bytes on GPU, bytes in RAM) when the last ``gpu_layers`` layers are offloaded.

        ``gpu_layers == 0`` -> ``(0, total)``. Any offload puts the compute buffer on the
        GPU (llama.cpp reserves its main compute buffer there even for a partial split),
        and the process's GPU context (``gpu_overhead_bytes``) and the GPU runtime's host
        memory (``gpu_host_bytes``) come on top of ``total``. In a split the layers left
        on the CPU get a compute buffer of their own in RAM. When all layers are
        offloaded the rest of the fixed part (output layer, norms) follows; RAM keeps
        the overhead and the token embedding (always on the host).
        """
        n_layers = len(self.layer_bytes)
        if not 0 <= gpu_layers <= n_layers:
            raise ValueError(f"gpu_layers must be in 0..{n_layers}, not {gpu_layers}")
        if gpu_layers == 0:
            return 0, self.total
        host_compute = 0
        gpu = sum(self.layer_bytes[n_layers - gpu_layers :]) + self.compute_bytes
        if gpu_layers == n_layers:
            gpu = sum(self.layer_bytes) + self.fixed_bytes - self.host_fixed_bytes
        else:
            host_compute = self.compute_bytes
        gpu = min(gpu, self.total - self.overhead_bytes)
        ram = self.total - gpu + host_compute + self.gpu_host_bytes
        return gpu + self.gpu_overhead_bytes, ram

    def learned_for(self, gpu_layers: int) -> LearnedBytes | None:
        """The measured bytes of an earlier load with ``gpu_layers`` offloaded, if any."""
        return next((m for m in self.learned if m.gpu_layers == gpu_layers), None)

    def scaled_to(self, total: int) -> Footprint:
        """The same shape scaled so that ``.total == total``, with ``overridden=True``."""
        if total <= 0:
            raise ValueError(f"a memory override must be positive, not {total}")
        factor = total / self.total if self.total else 0.0

        def scale(value: int) -> int:
            return math.floor(value * factor)

        layers = tuple(scale(b) for b in self.layer_bytes)
        overhead = scale(self.overhead_bytes)
        # Rounding leftovers go to the fixed part so that the total is exact.
        fixed = total - sum(layers) - overhead
        return replace(
            self,
            layer_bytes=layers,
            fixed_bytes=fixed,
            overhead_bytes=overhead,
            weights_bytes=scale(self.weights_bytes),
            kv_cache_bytes=scale(self.kv_cache_bytes),
            compute_bytes=min(scale(self.compute_bytes), fixed),
            host_fixed_bytes=min(scale(self.host_fixed_bytes), fixed),
            overridden=True,
        )


def cache_row_bytes(cache_type: str, n_elements: int) -> int:
    """Bytes of one KV-cache row of ``n_elements`` values in ``cache_type`` (f16, q8_0...)."""
    try:
        qtype = GGMLQuantizationType[cache_type.upper()]
    except KeyError:
        raise ValueError(f"unknown KV cache type {cache_type!r}") from None
    if qtype not in _CACHE_TYPES:
        raise ValueError(f"unknown KV cache type {cache_type!r}")
    block, type_size = GGML_QUANT_SIZES[qtype]
    return -(-n_elements // block) * type_size


# The types llama-server accepts for -ctk / -ctv.
_CACHE_TYPES = frozenset(
    GGMLQuantizationType[name]
    for name in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL")
)


def slot_cells(ctx: int, parallel: int) -> int:
    """KV cells each slot gets: llama.cpp pads the context and each slot's share to 256."""
    padded = _pad(ctx, _KV_PAD)
    return _pad(padded // parallel, _KV_PAD)


def kv_cells(shape: ModelShape, layer: int, *, ctx: int, parallel: int) -> int:
    """KV-cache cells llama-server allocates for ``layer`` (all slots together)."""
    per_slot = slot_cells(ctx, parallel)
    if shape.swa_layers and shape.swa_layers[layer]:
        # A sliding-window layer keeps only the window plus one micro-batch per slot.
        per_slot = min(per_slot, _pad(shape.sliding_window + _UBATCH, _KV_PAD))
    return parallel * per_slot


def _pad(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _compute_bytes(shape: ModelShape, *, ctx: int, parallel: int) -> int:
    """The compute buffer llama.cpp reserves for one micro-batch.

    Fitted on CPU with flash attention (llama-server's default there): f32 activations
    of a micro-batch (attention, feed-forward), the f16 attention mask over one slot's
    cells and one row of logits, plus the output buffer (logits of every slot).
    """
    q_width = shape.n_head * shape.head_dim_k
    activations = _UBATCH * 4 * (4 * q_width + shape.n_embd + 2 * shape.n_ff)
    mask = _UBATCH * 2 * slot_cells(ctx, parallel)
    logits = 4 * shape.n_vocab * (1 + parallel)
    return activations + mask + logits


def estimate(
    shape: ModelShape,
    *,
    ctx: int,
    parallel: int,
    cache_type: str = "f16",
    overhead_bytes: int | None = None,
) -> Footprint:
    """The footprint of ``llama-server -c ctx -np parallel -ctk/-ctv cache_type``.

    ``ctx`` is the whole context, shared among the ``parallel`` slots; 0 means the
    model's training context, as for llama-server. ``overhead_bytes`` replaces the
    default process overhead (see ``default_overhead``), e.g. one measured with
    ``measured_overhead`` on a build whose libraries hold more (CUDA).
    """
    if ctx == 0:
        ctx = shape.context_train
    if ctx <= 0 or parallel <= 0:
        raise ValueError(f"ctx and parallel must be positive (ctx={ctx}, parallel={parallel})")
    k_row = cache_row_bytes(cache_type, shape.n_head_kv * shape.head_dim_k)
    v_row = cache_row_bytes(cache_type, shape.n_head_kv * shape.head_dim_v)
    kv = [
        kv_cells(shape, i, ctx=ctx, parallel=parallel) * (k_row + v_row)
        for i in range(shape.n_layers)
    ]
    compute = _compute_bytes(shape, ctx=ctx, parallel=parallel)
    weights = sum(shape.layer_weight_bytes) + shape.other_weight_bytes
    # A tied embedding doubles as the output layer and moves to the GPU with it.
    host_fixed = 0 if shape.tied_embeddings else shape.token_embd_bytes
    if overhead_bytes is None:
        overhead_bytes = default_overhead(shape)
    return Footprint(
        layer_bytes=tuple(w + c for w, c in zip(shape.layer_weight_bytes, kv, strict=True)),
        fixed_bytes=shape.other_weight_bytes + compute,
        overhead_bytes=overhead_bytes,
        weights_bytes=weights,
        kv_cache_bytes=sum(kv),
        compute_bytes=compute,
        host_fixed_bytes=host_fixed,
        gpu_overhead_bytes=GPU_CONTEXT_BYTES,
        # The process itself is in the overhead already; the GPU runtime adds the rest.
        gpu_host_bytes=max(0, GPU_RUNTIME_HOST_BYTES - BASE_OVERHEAD_BYTES),
    )


# A CUDA context with cuBLAS holds a few hundred MiB of VRAM per process before any
# model buffer; counted whenever a model touches a GPU. Measured VRAM replaces it.
GPU_CONTEXT_BYTES = 320 * 1024 * 1024

# Host RAM of a llama-server that uses a GPU, beyond the model's own host buffers: the
# process (BASE_OVERHEAD_BYTES) plus the GPU runtime's libraries, driver state and
# staging buffers. Measured on an NVIDIA H200 with the bundled Vulkan build, a 337 MB
# F32 model fully offloaded (-ngl 99, ctx 2048): 122 MB RSS with --no-mmap; with mmap
# (the default) 215 MB, the rest being weight pages touched while loading (file-backed,
# reclaimable). The same model on the CPU with -dev none: 483 MB RSS.
GPU_RUNTIME_HOST_BYTES = 120 * MIB


def default_overhead(shape: ModelShape) -> int:
    """Host memory of a CPU llama-server process beyond the model's buffers."""
    return BASE_OVERHEAD_BYTES + OVERHEAD_BYTES_PER_TOKEN * (shape.n_vocab + shape.n_merges)


def measured_overhead(rss_bytes: int, footprint: Footprint) -> int:
    """The overhead a running server shows: its RSS minus the estimated buffers.

    Meaningful for a CPU-only load (everything is in the process's RSS).
    """
    return max(0, rss_bytes - (footprint.total - footprint.overhead_bytes))


def parse_buffer_sizes(log_text: str) -> dict[str, int]:
    """Buffer sizes llama-server logs at load (``-lv 4`` or ``--verbose``), in bytes.

    Keys are ``"{kind}.{device}"``: ``model.CPU_Mapped``, ``kv.CPU``, ``compute.CUDA0``,
    ``output.CPU``, ``rs.CPU``... Several lines of one key (a sliding-window model has
    two KV caches) are added up.
    """
    sizes: dict[str, int] = {}
    for match in _BUFFER_LINE.finditer(log_text):
        key = f"{match['kind'].lower()}.{match['device']}"
        sizes[key] = sizes.get(key, 0) + round(float(match["mib"]) * MIB)
    return sizes
