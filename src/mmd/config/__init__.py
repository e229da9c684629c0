"""The TOML config: its tables as typed settings, parsed and checked with one clear error
per mistake (``settings``), and the ``[http]`` table's addresses and API keys (``http``).

Read by the engine (a reload), the front doors, the daemon and ``mmctl doctor``. Must not
import: ``mmd.engine``, ``mmd.api`` or ``mmd.daemon``.
"""
