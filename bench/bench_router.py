"""mmd beside llama.cpp's router mode, the peer in the same binary, on the demo models.

Same binary, same models (SmolLM2-135M-Instruct Q4_1, Gemma 3 270M Q4_K_M), ctx 2048,
the same streamed chat request (``ignore_eos``, greedy) from the same raw-socket client,
which keeps its connections (bench/rawhttp.py). mmd is read through its HTTP front door
on a Unix socket; the router (``llama-server --models-dir DIR --models-max N``) listens
on one too; llama-server started directly with mmd's argv is the floor where there is
one. Rows:

* hot latency of a 4-token chat (median), mmd and the router each against direct;
* a swap between two models when only one fits: the router with ``--models-max 1``,
  mmd with a RAM budget that holds one (first token of the other model's request);
* 8 clients on one model with 8 slots, one request each at once (tokens per second);
* overcommit: three models whose sum exceeds mmd's RAM budget, used in turn; the
  router loads by count (``--models-max 3``), mmd by memory. The peak of the children's
  resident memory (summed, sampled every 20 ms) against the budget, and what the client
  saw.

Each row's verdict is ahead, level or behind by mmd / router (bench/verdicts.py).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil
from bench_requests import Raw, Sizes
from harness import (
    PROMPT,
    Daemon,
    DirectServer,
    Figure,
    Runtime,
    Spread,
    child_argv_matches,
    share_of,
)
from peers import CTX, Router, RssSampler, chat_request, demo_models
from rawhttp import Address, RawClient, timeline_async

from mmd.v1 import mmd_pb2 as pb

LATENCY_TOKENS = 4
THROUGHPUT_TOKENS = 32
CLIENTS = 8
FILES = {"smol": "smollm2", "gemma": "gemma3", "smol2": "smollm2"}
ROUTER = "llama.cpp router mode"


def _tables(models: dict[str, Path], ids: list[str], parallel: int = 1) -> str:
    return "".join(
        f'[models.{i}]\npath = "{models[FILES[i]]}"\nctx = {CTX}\nparallel = {parallel}\n'
        "keep_alive = -1\n"
        for i in ids
    )


def _daemon(root: Path, tables: str, ram: int | None = None) -> tuple[Daemon, Path]:
    http_socket = root / "http.sock"
    budget = '[budget]\ngpu = "0"\n' + (f'ram = "{ram}"\n' if ram else "")
    settings = (
        f"{budget}[scheduler]\nmax_concurrent = 32\nmax_queue = 1024\n"
        f'[http]\nlisten = ["unix:{http_socket}"]\n'
    )
    return Daemon(root, tables, settings, cpu_only=True).start(), http_socket


def _mmd_pids(daemon: Daemon) -> list[int]:
    return [
        m.pid for m in daemon.stub.ListModels(pb.ListModelsRequest(), timeout=30).models if m.pid
    ]


def _router_files(models: dict[str, Path], ids: list[str]) -> dict[str, Path]:
    return {i: models[FILES[i]] for i in ids}


def router_peer(work: Path, runtime: Runtime, sizes: Sizes) -> tuple[list[Figure], Raw]:
    models, why = demo_models()
    if not models:
        raise RuntimeError(why)
    root = work / "router"
    raw: Raw = {
        "models": {i: str(models[f]) for i, f in FILES.items()},
        "ctx": CTX,
        "client": "bench/rawhttp.py, connections kept; mmd on its [http] Unix socket",
        "errors": {},
    }
    figures: list[Figure] = []
    parts: dict[str, Callable[[], tuple[list[Figure], Raw]]] = {
        "latency": lambda: _latency(root / "latency", runtime, models, sizes),
        "swap": lambda: _swap(root / "swap", runtime, models, sizes),
        "throughput": lambda: _throughput(root / "throughput", runtime, models, sizes),
        "overcommit": lambda: _overcommit(root / "overcommit", runtime, models),
    }
    for name, part in parts.items():
        print(f"  router: {name} ...", file=sys.stderr, flush=True)
        try:
            found, raw[name] = part()
            figures += found
        except Exception as err:  # reported as a row, not skipped
            raw["errors"][name] = f"{type(err).__name__}: {err}"
            figures.append(_failed(name, raw["errors"][name]))
    return figures, raw


def _failed(name: str, why: str) -> Figure:
    return Figure(
        "router", f"{name}: could not run", "", Spread.of([0.0]), None, "-", None, problem=why
    )


def _peer_row(
    metric: str, unit: str, ours: list[float], theirs: list[float], better: str, problem: str = ""
) -> Figure:
    return Figure(
        "router",
        metric,
        unit,
        Spread.of(ours),
        Spread.of(theirs) if theirs else None,
        "-",
        None,
        digits=1 if unit != "ms" else 2,
        better="higher" if better == "higher" else "lower",
        peer=True,
        problem=problem,
        floor_kind=ROUTER,
    )


# ---------------------------------------------------------------- hot latency


def _latency(
    root: Path, runtime: Runtime, models: dict[str, Path], sizes: Sizes
) -> tuple[list[Figure], Raw]:
    daemon, http_socket = _daemon(root / "mmd", _tables(models, ["smol"]))
    router = direct = None
    clients: dict[str, RawClient] = {}
    try:
        loaded = daemon.load("smol")
        spec = runtime.spec(
            "smol", models["smollm2"], root, ctx=CTX, parallel=1, cores=share_of(loaded)
        )
        direct = DirectServer(runtime, spec, cpu_only=True).start()
        router = Router(runtime, _router_files(models, ["smol"]), root / "r", 1).start()
        addresses: dict[str, Address] = {
            "mmd": http_socket,
            "router": router.socket,
            "direct": direct.spec.socket,
        }
        clients = {name: RawClient(a) for name, a in addresses.items()}
        request = chat_request("smol", LATENCY_TOKENS, PROMPT)
        times: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(5):  # warm-up: the router loads smol on the first
            for client in clients.values():
                client.send(request)
        order = list(clients)
        for i in range(sizes.peer_requests):
            # Rotate who goes first so that none always follows another.
            for name in order[i % 3 :] + order[: i % 3]:
                times[name].append(clients[name].send(request).total_ms)
        same_argv = child_argv_matches(loaded.pid, direct.argv)
    finally:
        for client in clients.values():
            client.close()
        for server in (router, direct):
            if server:
                server.stop()
        daemon.stop()
    p50 = {name: statistics.median(v) for name, v in times.items()}
    problem = "" if same_argv else "the direct llama-server runs another argv than mmd's child"
    figures = [
        _peer_row(
            f"hot chat, {LATENCY_TOKENS} tokens, p50 [min-max]",
            "ms",
            times["mmd"],
            times["router"],
            "lower",
        ),
        Figure(
            "router",
            "added over direct llama-server, p50: mmd",
            "ms",
            Spread.of([p50["mmd"] - p50["direct"]]),
            None,
            "-",
            None,
            digits=2,
            added=True,
            problem=problem,
            floor_kind="llama-server, raw-socket client",
        ),
        Figure(
            "router",
            "added over direct llama-server, p50: router",
            "ms",
            Spread.of([p50["router"] - p50["direct"]]),
            None,
            "-",
            None,
            digits=2,
            better="",
        ),
    ]
    return figures, {"total_ms": times, "p50_ms": p50, "argv_matches_mmd_child": same_argv}


# ---------------------------------------------------------------- sizes and budgets


def _needs(root: Path, models: dict[str, Path], ids: list[str]) -> dict[str, dict[str, int]]:
    """What mmd plans for each model in RAM, and what it counts once the model is measured
    (each alone), from a daemon without a budget."""
    daemon, _ = _daemon(root, _tables(models, ids))
    found: dict[str, dict[str, int]] = {}
    try:
        for model_id in ids:
            plan = daemon.stub.PlanLoad(pb.PlanLoadRequest(model_id=model_id), timeout=30)
            planned = sum(s.bytes for s in plan.placement.shares if s.device == "ram")
            daemon.load(model_id)
            with RawClient(root / "http.sock") as client:
                client.send(chat_request(model_id, LATENCY_TOKENS, PROMPT))
            deadline = time.monotonic() + 10
            while not daemon.model(model_id).measured_bytes and time.monotonic() < deadline:
                time.sleep(0.05)
            counted = sum(d.mmd_bytes for d in daemon.health().devices if d.id == "ram")
            found[model_id] = {"planned": planned, "counted": counted}
            daemon.stub.UnloadModel(pb.UnloadModelRequest(model_id=model_id), timeout=60)
    finally:
        daemon.stop()
    return found


def one_of_two(needs: dict[str, dict[str, int]]) -> int:
    """A RAM budget that holds either of two models but not both: at least the larger of
    each's planned and counted figure, less than one counted plus the other planned (in
    either order); halfway between."""
    na, nb = needs.values()
    largest = max(max(n.values()) for n in needs.values())
    both = min(na["counted"] + nb["planned"], nb["counted"] + na["planned"])
    return (largest + both) // 2


def two_of_three(needs: dict[str, dict[str, int]]) -> int:
    """A RAM budget that holds the two largest models but not all three: the two largest
    needs and half the smallest."""
    ordered = sorted(max(n.values()) for n in needs.values())
    return ordered[2] + ordered[1] + ordered[0] // 2


# ---------------------------------------------------------------- swap


def _swap(
    root: Path, runtime: Runtime, models: dict[str, Path], sizes: Sizes
) -> tuple[list[Figure], Raw]:
    ids = ["smol", "gemma"]
    needs = _needs(root / "probe", models, ids)
    budget = one_of_two(needs)
    daemon, http_socket = _daemon(root / "mmd", _tables(models, ids), budget)
    router = None
    first: dict[str, list[float]] = {"mmd": [], "router": []}
    loaded_after: dict[str, list[int]] = {"mmd": [], "router": []}
    try:
        router = Router(runtime, _router_files(models, ids), root / "r", 1).start()
        sides: dict[str, tuple[Address, Callable[[], int]]] = {
            "mmd": (http_socket, lambda: len(_mmd_pids(daemon))),
            "router": (router.socket, lambda: len(router.children()) if router else 0),
        }
        for name, (address, count) in sides.items():
            with RawClient(address) as client:
                for i in range(sizes.peer_swaps + 2):  # two to warm the file cache
                    model_id = ids[i % 2]
                    done = client.send(chat_request(model_id, LATENCY_TOKENS, PROMPT))
                    if i >= 2:
                        first[name].append(done.first_ms)
                        loaded_after[name].append(count())
    finally:
        if router:
            router.stop()
        daemon.stop()
    problems = [
        f"{name} held {max(n)} models after a swap: nothing was swapped out"
        for name, n in loaded_after.items()
        if n and max(n) > 1
    ]
    figure = _peer_row(
        "swap smol <-> gemma, one fits: first token",
        "ms",
        first["mmd"],
        first["router"],
        "lower",
        "; ".join(problems),
    )
    return [figure], {
        "budget_ram_bytes": budget,
        "needs_bytes": needs,
        "router_models_max": 1,
        "first_token_ms": first,
        "models_loaded_after_each_swap": loaded_after,
    }


# ---------------------------------------------------------------- throughput


async def _round(address: Address, request: bytes, window_s: float) -> float:
    """Tokens per second of one request from each client, all sent at once; cut after
    ``window_s``, as an oversubscribed machine can take minutes over them."""
    deadline = time.perf_counter() + window_s
    found = await asyncio.gather(
        *(timeline_async(address, request, deadline) for _ in range(CLIENTS))
    )
    elapsed = max(t.end_at for t in found) - min(t.sent_at for t in found)
    return sum(t.tokens for t in found) / elapsed if elapsed > 0 else 0.0


def _throughput(
    root: Path, runtime: Runtime, models: dict[str, Path], sizes: Sizes
) -> tuple[list[Figure], Raw]:
    daemon, http_socket = _daemon(root / "mmd", _tables(models, ["smol"], parallel=CLIENTS))
    router = direct = None
    rates: dict[str, list[float]] = {"mmd": [], "router": [], "direct": []}
    try:
        loaded = daemon.load("smol")
        spec = runtime.spec(
            "smol", models["smollm2"], root, ctx=CTX, parallel=CLIENTS, cores=share_of(loaded)
        )
        direct = DirectServer(runtime, spec, cpu_only=True).start()
        files = _router_files(models, ["smol"])
        router = Router(runtime, files, root / "r", 1, parallel=CLIENTS).start()
        addresses: dict[str, Address] = {
            "mmd": http_socket,
            "router": router.socket,
            "direct": direct.spec.socket,
        }
        request = chat_request("smol", THROUGHPUT_TOKENS, PROMPT)

        def run(name: str) -> float:
            return asyncio.run(_round(addresses[name], request, 2 * sizes.core_window_s))

        for name in addresses:  # warm-up (the router loads smol)
            run(name)
        order = list(addresses)
        for r in range(sizes.peer_rounds):
            for name in order[r % 3 :] + order[: r % 3]:
                rates[name].append(run(name))
    finally:
        for server in (router, direct):
            if server:
                server.stop()
        daemon.stop()
    figures = [
        _peer_row(
            f"{CLIENTS} clients, one model, {THROUGHPUT_TOKENS} tokens each",
            "tok/s",
            rates["mmd"],
            rates["router"],
            "higher",
        ),
        Figure(
            "router",
            f"{CLIENTS} clients: mmd vs direct llama-server",
            "tok/s",
            Spread.of(rates["mmd"]),
            Spread.of(rates["direct"]),
            "-",
            None,
            digits=1,
            better="higher",
            floor_kind="llama-server, raw-socket client",
        ),
    ]
    return figures, {
        "tokens_per_s": rates,
        "parallel": CLIENTS,
        "requests_per_round": CLIENTS,
    }


# ---------------------------------------------------------------- overcommit


def _overcommit(root: Path, runtime: Runtime, models: dict[str, Path]) -> tuple[list[Figure], Raw]:
    ids = ["smol", "gemma", "smol2"]
    needs = _needs(root / "probe", models, ids)
    budget = two_of_three(needs)
    sequence = ids * 2
    raw: Raw = {
        "budget_ram_bytes": budget,
        "needs_bytes": needs,
        "sum_of_needs_bytes": sum(max(n.values()) for n in needs.values()),
        "sequence": sequence,
        "router_models_max": 3,
    }
    peaks: dict[str, int] = {}
    daemon, http_socket = _daemon(root / "mmd", _tables(models, ids), budget)
    try:
        with RssSampler(daemon.children) as sampler:
            raw["mmd"] = _in_turn(http_socket, sequence, lambda: len(_mmd_pids(daemon)))
        peaks["mmd"] = sampler.peak
    finally:
        daemon.stop()
    router = Router(runtime, _router_files(models, ids), root / "r", 3)
    try:
        router.start()
        with RssSampler(router.children) as sampler:
            raw["router"] = _in_turn(router.socket, sequence, lambda: len(router.children()))
        peaks["router"] = sampler.peak
    finally:
        router.stop()
    for name, peak in peaks.items():
        raw[name]["peak_children_rss_bytes"] = peak
        raw[name]["peak_of_budget"] = peak / budget
    mib = 1024 * 1024
    figures = [
        Figure(
            "router",
            "overcommit: mmd's peak children RSS / its RAM budget",
            "",
            Spread.of([peaks["mmd"] / budget]),
            None,
            "<= 1.0",
            peaks["mmd"] <= budget,
            digits=3,
        ),
        _peer_row(
            f"overcommit: peak children RSS (budget {budget / mib:.0f} MiB)",
            "MiB",
            [peaks["mmd"] / mib],
            [peaks["router"] / mib],
            "lower",
        ),
        _peer_row(
            "overcommit: 3 models in turn, each request",
            "ms",
            [r["total_ms"] for r in raw["mmd"]["requests"] if r["ok"]],
            [r["total_ms"] for r in raw["router"]["requests"] if r["ok"]],
            "lower",
            _answered(raw),
        ),
    ]
    return figures, raw


def _in_turn(address: Address, sequence: list[str], count: Callable[[], int]) -> Raw:
    """Each model in turn, one 4-token chat each: what the client saw, and how many
    models were loaded after each answer."""
    requests: list[dict[str, Any]] = []
    with RawClient(address) as client:
        for model_id in sequence:
            began = time.perf_counter()
            entry: dict[str, Any] = {"model": model_id}
            try:
                done = client.send(chat_request(model_id, LATENCY_TOKENS, PROMPT))
                entry.update(ok=True, total_ms=done.total_ms, tokens=done.tokens)
            except Exception as err:
                entry.update(ok=False, error=f"{type(err).__name__}: {err}"[:300])
                entry["total_ms"] = (time.perf_counter() - began) * 1000
                client.close()
            with suppress(psutil.Error):
                entry["models_loaded_after"] = count()
            requests.append(entry)
    return {"requests": requests, "answered": sum(1 for r in requests if r["ok"])}


def _answered(raw: Raw) -> str:
    """Why the overcommit latencies do not compare: a side that failed requests."""
    failed = [
        f"{name} answered {raw[name]['answered']} of {len(raw['sequence'])}"
        for name in ("mmd", "router")
        if raw[name]["answered"] < len(raw["sequence"])
    ]
    return "; ".join(failed)
