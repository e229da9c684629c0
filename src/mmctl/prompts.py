"""Prompts from the command line or stdin: strict UTF-8, never empty.

Standard library only: the quick commands (mmctl.quick) read prompts without grpc.
"""

from __future__ import annotations

import sys

from mmctl.errors import EXIT_USAGE, CliError


def read_input(value: str | None, what: str) -> str:
    """The argument, or stdin when it is omitted or '-'; strict UTF-8; never empty."""
    if value is None or value == "-":
        if sys.stdin.isatty():
            sys.stderr.write(f"mmctl: reading the {what} from stdin (end with Ctrl-D)\n")
            sys.stderr.flush()
        text = decoded(sys.stdin.buffer.read(), f"the {what} on stdin")
    else:
        text = value
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise CliError(f"the {what} argument is not valid UTF-8", EXIT_USAGE) from None
    if not text.strip():
        raise CliError(f"empty {what}", EXIT_USAGE)
    return text


def decoded(data: bytes, subject: str) -> str:
    """``data`` as strict UTF-8; else a usage error naming ``subject`` and the bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CliError(
            f"{subject} is not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start})",
            EXIT_USAGE,
        ) from None
