"""The pure core: every decision mmd makes, as plain functions and data.

The scheduler and its registry, the model states and the effects they return, the
placement planner, the budget and alert rules, the footprint arithmetic, units, errors and
request validation. Given the same inputs it gives the same answer: no I/O, no clock, no
event loop, no processes.

Must not import: any other mmd package, nor anything that does I/O (asyncio, subprocess,
socket, threading, grpc, aiohttp, httpx, psutil, pynvml). The import-linter contracts in
pyproject.toml keep it so.
"""
