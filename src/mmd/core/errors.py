"""Domain errors. Each carries the name of the gRPC status it maps to and a stable kind.

The service layer turns these into statuses in one place (mmd.api.rpc.errors); mmctl
turns statuses (and the kind, sent as trailing metadata) into exit codes. The status is
named, not a ``grpc.StatusCode``, so that the core imports no transport.
"""

from __future__ import annotations

# Trailing-metadata key that names the error kind, so clients can tell a
# crashed runtime (UNAVAILABLE from mmd) from an unreachable daemon.
ERROR_KIND_KEY = "mmd-error-kind"
# Initial metadata of a call that will be served, but maybe not as the client means it
# (a chat for a model without a chat template): one line for the client to show.
WARNING_KEY = "mmd-warning"


class MmdError(Exception):
    """Base of every error mmd reports to a client."""

    status: str = "INTERNAL"  # a grpc.StatusCode name
    kind: str = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownModel(MmdError):
    status = "NOT_FOUND"
    kind = "unknown_model"

    def __init__(self, model_id: str) -> None:
        super().__init__(f"unknown model {model_id!r} (see 'mmctl models')")
        self.model_id = model_id


class InvalidRequest(MmdError):
    status = "INVALID_ARGUMENT"
    kind = "invalid_request"


class InsufficientMemory(MmdError):
    status = "RESOURCE_EXHAUSTED"
    kind = "insufficient_memory"


class QueueFull(MmdError):
    status = "RESOURCE_EXHAUSTED"
    kind = "queue_full"


class FailedPrecondition(MmdError):
    """The request is valid but the model is not in a state to serve it."""

    status = "FAILED_PRECONDITION"
    kind = "failed_precondition"


class RuntimeFailed(MmdError):
    """The model's llama-server failed to start, crashed, or answered with an error."""

    status = "UNAVAILABLE"
    kind = "runtime_failed"


class RequestAborted(MmdError):
    """The request was aborted by an operator (forced unload) or a shutdown."""

    status = "ABORTED"
    kind = "aborted"


class ConfigError(Exception):
    """The configuration is invalid. The message names the file, the key and the problem."""


class InvalidConfig(MmdError):
    """A reload found the config file invalid; the old config stays in force."""

    status = "INVALID_ARGUMENT"
    kind = "invalid_config"


class StillBusy(MmdError):
    """An unload waited for running requests and they did not finish in time."""

    status = "DEADLINE_EXCEEDED"
    kind = "busy"
