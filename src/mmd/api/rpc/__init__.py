"""The gRPC API (package ``mmd.v1``): the servicers (``service``, ``admin``, ``watch``),
the domain-error to status-code mapping (``errors``) and the engine-state to proto
builders (``protos``).

Must not import: ``mmd.api.web`` or ``mmd.daemon``.
"""
