"""An answer's text as it streams in, for both ways mmctl asks (mmctl.quick over JSON
Lines, mmctl.generate over gRPC): kept, and written to stdout as it arrives when echoed.

Standard library only: the quick path loads it without grpc.
"""

from __future__ import annotations

import sys


class StreamedText:
    """The pieces of one answer; with ``echo``, each on stdout at once, flushed."""

    def __init__(self, echo: bool) -> None:
        self.echo = echo
        self.pieces: list[str] = []

    def add(self, piece: str) -> None:
        self.pieces.append(piece)
        if self.echo:
            sys.stdout.write(piece)
            sys.stdout.flush()

    def end(self, complete: bool) -> None:
        """Keep the shell prompt (or an error line) off the end of an echoed text: a line
        break after it, when the answer is ``complete`` or some of it was written, unless
        it ends with one."""
        wrote = "".join(self.pieces)
        if self.echo and (complete or wrote) and not wrote.endswith("\n"):
            sys.stdout.write("\n")
            sys.stdout.flush()
