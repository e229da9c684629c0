"""mmctl's exit codes, its one error type, the one mapping from a daemon's error (a gRPC
status name and mmd's error kind) to an exit code, whichever socket it came over, and how
mmctl says an error and ends, whichever path (mmctl.quick or the full CLI) ran the command.

Imports nothing but the standard library: the quick commands (mmctl.quick) load it
without grpc.
"""

from __future__ import annotations

import os
import sys

# Exit codes, documented in `mmctl --help`.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_UNKNOWN_MODEL = 4
EXIT_NO_ROOM = 5
EXIT_RUNTIME_FAILED = 6
EXIT_INTERRUPTED = 130
# The reader of mmctl's output went away (`mmctl ... | head`): what a process killed by
# SIGPIPE reports to a shell (128 + 13), so that `set -o pipefail` scripts see the usual code.
EXIT_BROKEN_PIPE = 141


_RUNTIME_FAILED_KIND = "runtime_failed"


class CliError(Exception):
    """An error mmctl reports as one line on stderr and an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def exit_code_for_status(status: str | None, kind: str | None) -> int:
    """The exit code for a call that failed with gRPC status ``status`` (its name, e.g.
    "NOT_FOUND") and mmd's error ``kind``.

    UNAVAILABLE means two different things: mmd says a model's runtime failed (it then
    names the kind), or the daemon could not be reached at all (no kind).
    """
    if status == "INVALID_ARGUMENT":
        return EXIT_USAGE
    if status == "NOT_FOUND":
        return EXIT_UNKNOWN_MODEL
    if status == "RESOURCE_EXHAUSTED":
        return EXIT_NO_ROOM
    if status == "UNAVAILABLE":
        if kind == _RUNTIME_FAILED_KIND:
            return EXIT_RUNTIME_FAILED
        if kind is None:
            return EXIT_UNREACHABLE
    return EXIT_ERROR


def one_line(text: str) -> str:
    """``text`` with every run of whitespace, line breaks included, as one space."""
    return " ".join(text.split())


def report(message: str) -> None:
    """An error as mmctl's one line on stderr, after what stdout already holds."""
    sys.stdout.flush()
    sys.stderr.write(f"mmctl: {one_line(message)}\n")
    sys.stderr.flush()


def finish(code: int) -> None:
    """Flush what is left and exit with ``code``; a reader gone before the last of the
    output makes it 141.

    Ends with os._exit: the interpreter's own teardown (finalising grpc, protobuf and
    every module) took ~30 ms of each call, which a script calling mmctl in a loop pays
    every time, for nothing the OS does not clean up anyway.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:  # the reader went away before the last of the output
            code = EXIT_BROKEN_PIPE
        except OSError:  # nothing left to say it on
            pass
    os._exit(code)
