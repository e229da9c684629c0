"""Tiny synthetic GGUF models that a real llama-server loads and answers with.

Used by the test suite, the benchmarks and ``mmd-synth`` so that placement,
eviction and scheduling can be exercised with real processes and models of
chosen sizes on any machine. The weights are random, so the output is
gibberish; the mechanics (loading, streaming, memory) are real.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, PoolingType, TokenType

# SentencePiece word-boundary marker.
_SPACE_MARK = "\u2581"


def _vocabulary() -> tuple[list[bytes], list[int]]:
    tokens: list[bytes] = [b"<unk>", b"<s>", b"</s>"]
    types: list[int] = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    # ASCII byte tokens only: with 0x80..0xFF a random model emits invalid
    # UTF-8, and without any byte tokens the tokenizer fails on a newline.
    for byte in range(0x80):
        tokens.append(f"<0x{byte:02X}>".encode())
        types.append(TokenType.BYTE)
    for code in range(0x20, 0x7F):
        tokens.append(chr(code).encode())
        types.append(TokenType.NORMAL)
    tokens.append(_SPACE_MARK.encode())
    types.append(TokenType.NORMAL)
    return tokens, types


def write_model(
    path: Path,
    *,
    embedding: int = 64,
    blocks: int = 2,
    heads: int = 4,
    kv_heads: int = 4,
    feed_forward: int | None = None,
    context: int = 2048,
    seed: int = 0,
    chat_template: str | None = None,
    pooling_type: int | None = None,
) -> Path:
    """Write a llama-architecture GGUF file of F32 tensors to ``path`` (with
    ``tokenizer.chat_template`` when ``chat_template`` is given, and ``llama.pooling_type``,
    which makes an embedding model, when ``pooling_type`` is)."""
    if embedding % heads:
        raise ValueError("embedding must be a multiple of heads")
    ff = feed_forward if feed_forward is not None else embedding * 2
    head_dim = embedding // heads
    tokens, types = _vocabulary()
    vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def weights(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def no_write_to_dim0(rows: int, cols: int) -> np.ndarray:
        matrix = weights(rows, cols)
        matrix[0, :] = 0.0
        return matrix

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(path.stem)
    writer.add_context_length(context)
    writer.add_embedding_length(embedding)
    writer.add_block_count(blocks)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)  # all F32
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    if pooling_type is not None:
        writer.add_pooling_type(PoolingType(pooling_type))

    # Every token embedding carries a constant in dimension 0, no layer writes to that
    # dimension (row 0 of attn_output and ffn_down is zero), and the output row of the
    # end-of-sequence token weighs it strongly negative: the model never ends a
    # generation on its own, so a request for N tokens yields exactly N.
    token_embd = weights(vocab, embedding)
    token_embd[:, 0] = 1.0
    output = weights(vocab, embedding)
    output[:, 0] = 0.0
    output[2, 0] = -1000.0
    writer.add_tensor("token_embd.weight", token_embd)
    writer.add_tensor("output_norm.weight", np.ones(embedding, dtype=np.float32))
    writer.add_tensor("output.weight", output)
    kv_dim = head_dim * kv_heads
    for i in range(blocks):
        prefix = f"blk.{i}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(embedding, dtype=np.float32))
        writer.add_tensor(f"{prefix}.attn_q.weight", weights(embedding, embedding))
        writer.add_tensor(f"{prefix}.attn_k.weight", weights(kv_dim, embedding))
        writer.add_tensor(f"{prefix}.attn_v.weight", weights(kv_dim, embedding))
        writer.add_tensor(f"{prefix}.attn_output.weight", no_write_to_dim0(embedding, embedding))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(embedding, dtype=np.float32))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", weights(ff, embedding))
        writer.add_tensor(f"{prefix}.ffn_up.weight", weights(ff, embedding))
        writer.add_tensor(f"{prefix}.ffn_down.weight", no_write_to_dim0(embedding, ff))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main() -> None:
    """``mmd-synth PATH``: write a synthetic model (for demos and benchmarks)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("path", type=Path)
    parser.add_argument("--embedding", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=2048)
    args = parser.parse_args()
    write_model(
        args.path,
        embedding=args.embedding,
        blocks=args.blocks,
        heads=args.heads,
        context=args.context,
    )
    print(args.path)
