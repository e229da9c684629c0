"""The engine: carries out the core's decisions with real children, memory readings,
futures and timers, on the event-loop thread.

``engine`` holds the scheduler and executes its effects; its parts (``children``,
``monitor``, ``reload``, ``preload``, ``accounting``, ``events``) each get what they need
through a narrow protocol, never the whole ``Engine``. Only modules of this package touch
``Engine.core``.

Must not import: ``mmd.api`` or ``mmd.daemon`` (the front doors and the composition root
sit above it).
"""
