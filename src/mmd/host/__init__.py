"""The machine mmd runs on: memory readings (NVML, psutil), default paths, the runtime
directories and their lock, systemd's notify protocol, and the learned footprints kept in
the state directory.

Must not import: ``mmd.runtime``, ``mmd.engine``, ``mmd.config``, ``mmd.api`` or
``mmd.daemon``; only ``mmd.core`` lies below it.
"""
