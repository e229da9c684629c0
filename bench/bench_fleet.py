"""The fleet: three mmd nodes in network namespaces behind HAProxy (tests/fleet.py),
with deploy/haproxy/mmd.cfg (consistent hashing on the model, bounded load) against
the same config balancing round robin, the naive alternative.

The same requests go to each (fresh nodes each time): requests per second, and how
many loads each model cost across the fleet. Round robin sends each model to every
node in turn, so every node loads every model; hashing loads each model about once.
Needs root, haproxy and ip (like the fleet test).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from fleet import Fleet, fleet_unavailable, traffic
from harness import Figure, Runtime, Spread

from mmd.runtime.synthetic import write_model

MODELS = 6
CLIENTS = 3
# Models are loaded on demand: the first pass over them loads, the rest is steady.
ROUNDS = 8


def _registry(work: Path) -> str:
    text = ""
    for i in range(MODELS):
        path = write_model(work / "models" / f"fleet{i}.gguf", seed=60 + i)
        text += f'[models.f{i}]\npath = "{path}"\nctx = 1024\nparallel = 2\n\n'
    return text


def _run(work: Path, registry: str, balance: str, plan: list[str]) -> dict[str, Any]:
    (work / balance).mkdir(parents=True)
    fleet = Fleet(work / balance, registry, balance=balance)
    fleet.start()
    try:
        began = time.perf_counter()
        answers = traffic(fleet, plan, clients=CLIENTS, max_tokens=16)
        seconds = time.perf_counter() - began
        loads = {f"f{i}": sum(fleet.loads(f"f{i}").values()) for i in range(MODELS)}
    finally:
        fleet.close()
    failed = [a for a in answers if not a.ok]
    if failed:
        raise RuntimeError(f"{balance}: {len(failed)} requests failed, e.g. {failed[0]}")
    return {
        "requests": len(answers),
        "seconds": seconds,
        "requests_per_s": len(answers) / seconds,
        "loads": loads,
        "loads_per_model": sum(loads.values()) / MODELS,
    }


def fleet_balance(work: Path, runtime: Runtime, sizes: Any) -> tuple[list[Figure], dict[str, Any]]:
    why = fleet_unavailable()
    if why is not None:
        raise RuntimeError(f"the fleet cannot run here: {why}")
    registry = _registry(work)
    # Requests for the models in a shuffled order (the same for both): in model order,
    # round robin would send each model to the same node every time by accident.
    plan = [f"f{i % MODELS}" for i in range(MODELS * ROUNDS)]
    random.Random(1).shuffle(plan)
    hashed = _run(work, registry, "hash", plan)
    naive = _run(work, registry, "roundrobin", plan)
    raw = {"hash": hashed, "roundrobin": naive, "clients": CLIENTS}
    figures = [
        Figure(
            "fleet",
            f"{len(plan)} requests, {MODELS} models, 3 nodes: requests/s (vs round robin)",
            "req/s",
            Spread.of([hashed["requests_per_s"]]),
            Spread.of([naive["requests_per_s"]]),
            "-",
            None,  # one run each, on a machine whose load varies: information
            digits=1,
            better="",  # round robin is the alternative, not a bound
            floor_kind="the same nodes behind HAProxy balancing round robin",
        ),
        Figure(
            "fleet",
            "loads per model (vs round robin)",
            "loads",
            Spread.of([hashed["loads_per_model"]]),
            Spread.of([naive["loads_per_model"]]),
            "< round robin",
            hashed["loads_per_model"] < naive["loads_per_model"],
            digits=2,
            better="",
            floor_kind="the same nodes behind HAProxy balancing round robin",
        ),
    ]
    return figures, raw
