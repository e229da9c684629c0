"""The front doors: the gRPC servicers and their one error mapping (``rpc``), the HTTP
server with the OpenAI-compatible API, the admin API and the dashboard (``web``),
Prometheus metrics, the JSON shapes of the proto messages (``protojson``, shared with
mmctl) and stream coalescing.

Each door translates and delegates to the engine. Must not import: ``mmd.daemon`` (the
composition root wires the doors to the engine), nor ``Engine.core``: the doors use the
engine's own methods.
"""
