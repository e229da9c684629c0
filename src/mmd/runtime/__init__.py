"""One llama-server: its binary, argv, process and logs (``server``), the check that it can
run a model here before it is trusted (``check``), the HTTP client that talks to it
(``upstream``), its buffer lines (``buffers``), the CPU features it needs (``cpu``), GGUF
headers (``gguf``) and tiny synthetic models (``synthetic``).

Knows nothing of the scheduler or of other children. Must not import: ``mmd.engine``,
``mmd.api``, ``mmd.config`` or ``mmd.daemon``.
"""
