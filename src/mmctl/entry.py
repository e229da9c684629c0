"""The `mmctl` command's entry point.

A quick command (`ps`, a one-shot `infer`: mmctl.quick) runs without loading the full
CLI. Anything else runs through the full CLI, imported with the garbage collector off:
importing grpc, protobuf and typer allocates enough objects to set off several
collections that free nothing; a command that runs for a tenth of a second starts
~5-10 ms sooner without them. The collector is back on before the command runs.
"""

from __future__ import annotations

import gc
import sys


def main() -> None:
    from mmctl import quick
    from mmctl.errors import finish

    code = quick.run(sys.argv[1:])
    if code is not None:
        finish(code)
    gc.disable()
    try:
        from mmctl.cli import main as run
    finally:
        gc.enable()
    run()
