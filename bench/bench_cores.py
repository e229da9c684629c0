"""Models generating at once on the CPU: does each keep its speed, and the sum?

1, 2 and 3 real models (SmolLM2-135M-Instruct Q4_1, Gemma 3 270M Q4_K_M, and a second
SmolLM2 under another id), each asked for the same number of tokens (``ignore_eos``,
greedy) at the same moment, served three ways in one run:

* **mmd** as configured by default (no ``args``; a RAM budget that holds all three),
  read through its HTTP front door;
* **llama-server's defaults**: the argv mmd builds, less any thread and placement flags,
  one child per model, read directly;
* **llama.cpp's router mode**, ``--models-max N``, serving the same files.

Each model's rate is measured alone (only it loaded) and with the others. Together,
models end at different moments, and one that ends early leaves the cores to the rest:
so each model's rate together counts only the tokens it had when the first of them
ended (or the window closed), over the time since it was sent. Alone, the same formula
(tokens over the time from sending to the end, prompt included) makes the two
comparable. llama-server's own ``predicted_per_second`` goes to the JSON beside it.

Targets, for mmd: the aggregate at least 0.9 of the best model's rate alone; no model
below 1/(N+1) of its rate alone while N run; a model alone at least 0.95 of its rate
under llama-server's defaults. The peers' rows compare mmd with each (ahead, level,
behind). A CPU-quota case runs mmd on one core (as under ``taskset -c 0``) where the
machine has two or more.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench_requests import Raw, Sizes
from harness import PROMPT, Daemon, DirectServer, Figure, Runtime, Spread
from peers import CTX, Router, affinity, chat_request, demo_models, process_info
from rawhttp import Address, Timeline, timeline_async

from mmd.v1 import mmd_pb2 as pb

TOKENS = 64
WARM_TOKENS = 4
# The ids the three models go by everywhere; the third is SmolLM2 again, a process of its own.
FILES = {"smol": "smollm2", "gemma": "gemma3", "smol2": "smollm2"}
SETS = {1: ["smol"], 2: ["smol", "gemma"], 3: ["smol", "gemma", "smol2"]}
AGGREGATE_TARGET = 0.9
ALONE_TARGET = 0.95
WAYS = {
    "mmd": "mmd (default config)",
    "defaults": "llama-server defaults",
    "router": "router mode",
}


class Way(Protocol):
    """One way of serving the models: make exactly some loaded, and say where each is."""

    def serve(self, ids: list[str]) -> None: ...
    def address(self, model_id: str) -> Address: ...
    def pids(self) -> dict[str, int]: ...
    def close(self) -> None: ...


@dataclass
class MmdWay:
    daemon: Daemon
    http_socket: Path

    @classmethod
    def start(cls, root: Path, models: dict[str, Path], cpus: set[int] | None) -> MmdWay:
        tables = "".join(
            f'[models.{i}]\npath = "{models[f]}"\nctx = {CTX}\nparallel = 1\nkeep_alive = -1\n'
            for i, f in FILES.items()
        )
        http_socket = root / "http.sock"
        settings = f'[budget]\ngpu = "0"\n[http]\nlisten = ["unix:{http_socket}"]\n'
        with affinity(cpus):  # mmd and the children it starts inherit it
            daemon = Daemon(root, tables, settings, cpu_only=True).start()
        return cls(daemon, http_socket)

    def serve(self, ids: list[str]) -> None:
        for model_id in self.pids():
            if model_id not in ids:
                request = pb.UnloadModelRequest(model_id=model_id, timeout_seconds=30)
                self.daemon.stub.UnloadModel(request, timeout=60)
        for model_id in ids:
            self.daemon.load(model_id)

    def address(self, model_id: str) -> Address:
        return self.http_socket

    def pids(self) -> dict[str, int]:
        models = self.daemon.stub.ListModels(pb.ListModelsRequest(), timeout=30).models
        return {m.id: m.pid for m in models if m.pid}

    def close(self) -> None:
        self.daemon.stop()


@dataclass
class DefaultsWay:
    runtime: Runtime
    root: Path
    models: dict[str, Path]
    servers: dict[str, DirectServer] = field(default_factory=dict)

    def serve(self, ids: list[str]) -> None:
        for model_id in list(self.servers):
            if model_id not in ids:
                self.servers.pop(model_id).stop()
        for model_id in ids:
            if model_id not in self.servers:
                spec = self.runtime.spec(
                    model_id, self.models[FILES[model_id]], self.root, ctx=CTX, parallel=1
                )
                server = DirectServer(self.runtime, spec, cpu_only=True, cpu_defaults=True)
                self.servers[model_id] = server.start()

    def address(self, model_id: str) -> Address:
        return self.servers[model_id].spec.socket

    def pids(self) -> dict[str, int]:
        return {i: s.process.pid for i, s in self.servers.items() if s.process}

    def close(self) -> None:
        for server in self.servers.values():
            server.stop()


@dataclass
class RouterWay:
    """A router started afresh for each set, with ``--models-max`` its size: nothing is
    loaded until the warm-up requests load the set's models."""

    runtime: Runtime
    root: Path
    models: dict[str, Path]
    router: Router | None = None

    def serve(self, ids: list[str]) -> None:
        self.close()
        files = {i: self.models[f] for i, f in FILES.items()}
        self.router = Router(self.runtime, files, self.root, max_models=len(ids)).start()

    def address(self, model_id: str) -> Address:
        assert self.router is not None
        return self.router.socket

    def pids(self) -> dict[str, int]:
        found = {}
        for child in self.router.children() if self.router else []:
            try:
                argv = child.cmdline()
            except Exception:
                continue
            if "--alias" in argv:
                found[argv[argv.index("--alias") + 1]] = child.pid
        return found

    def close(self) -> None:
        if self.router is not None:
            self.router.stop()
            self.router = None


# ---------------------------------------------------------------- measuring


def at_once(way: Way, ids: list[str], tokens: int, window_s: float) -> dict[str, Timeline]:
    """One request per model, all sent in the same moment; cut after ``window_s``."""

    async def run() -> list[Timeline]:
        deadline = time.perf_counter() + window_s
        return await asyncio.gather(
            *(
                timeline_async(way.address(i), chat_request(i, tokens, PROMPT), deadline)
                for i in ids
            )
        )

    return dict(zip(ids, asyncio.run(run()), strict=True))


def rates_while_all_ran(found: dict[str, Timeline]) -> dict[str, float]:
    """Each stream's tokens by the moment the first of them ended, per second since it
    was sent: its rate while all of them ran (alone: its rate from sending to the end)."""
    first_end = min(t.end_at for t in found.values())
    return {
        model_id: t.tokens_by(first_end) / (first_end - t.sent_at) if first_end > t.sent_at else 0
        for model_id, t in found.items()
    }


def timeline_raw(t: Timeline) -> dict[str, Any]:
    return {
        "tokens": t.tokens,
        "seconds": round(t.end_at - t.sent_at, 4),
        "wall_tokens_per_s": t.wall_rate,
        "predicted_per_second": t.timings.get("predicted_per_second"),
        "cut": t.cut,
    }


def warm(way: Way, ids: list[str], window_s: float) -> None:
    """A short request to each in turn: loads it (the router loads on demand), and warms
    its pages and prompt path."""
    for model_id in ids:
        at_once(way, [model_id], WARM_TOKENS, max(window_s, 60.0))


def measure_way(way: Way, sizes: Sizes, sets: dict[int, list[str]]) -> Raw:
    """Alone for each model of the largest set, then each set at once."""
    alone: dict[str, list[float]] = {}
    raw: Raw = {"alone": {}, "sets": {}, "children": {}}
    for model_id in sets[max(sets)]:
        way.serve([model_id])
        warm(way, [model_id], sizes.core_window_s)
        runs = [
            at_once(way, [model_id], TOKENS, sizes.core_window_s)
            for _ in range(sizes.core_solo_runs)
        ]
        alone[model_id] = [rates_while_all_ran(r)[model_id] for r in runs]
        raw["alone"][model_id] = {
            "rates": alone[model_id],
            "runs": [timeline_raw(r[model_id]) for r in runs],
        }
        raw["children"][f"{model_id} alone"] = {i: process_info(p) for i, p in way.pids().items()}
    for n, ids in sets.items():
        if n == 1:
            continue
        way.serve(ids)
        warm(way, ids, sizes.core_window_s)
        raw["children"][f"{n} at once"] = {i: process_info(p) for i, p in way.pids().items()}
        runs = [
            at_once(way, ids, TOKENS, sizes.core_window_s) for _ in range(sizes.core_together_runs)
        ]
        per_run = [rates_while_all_ran(r) for r in runs]
        raw["sets"][str(n)] = {
            "models": ids,
            "rates": per_run,
            "aggregates": [sum(r.values()) for r in per_run],
            "runs": [{i: timeline_raw(t) for i, t in r.items()} for r in runs],
        }
    return summarise(raw, sets)


def summarise(raw: Raw, sets: dict[int, list[str]]) -> Raw:
    """Medians per model, kept fractions and aggregate ÷ best alone, per set."""
    alone = {i: statistics.median(v["rates"]) for i, v in raw["alone"].items()}
    raw["alone_median"] = alone
    summary: dict[str, Any] = {}
    for n, ids in sets.items():
        if n == 1:
            together = {ids[0]: alone[ids[0]]}
            aggregate = alone[ids[0]]
            cut = False
        else:
            found = raw["sets"][str(n)]
            together = {i: statistics.median(r[i] for r in found["rates"]) for i in ids}
            aggregate = statistics.median(found["aggregates"])
            cut = any(t["cut"] for run in found["runs"] for t in run.values())
        best = max(alone[i] for i in ids)
        kept = {i: together[i] / alone[i] if alone[i] else 0.0 for i in ids}
        summary[str(n)] = {
            "models": ids,
            "alone": {i: alone[i] for i in ids},
            "together": together,
            "kept": kept,
            "least_kept": min(kept.values()),
            "aggregate": aggregate,
            "best_alone": best,
            "aggregate_of_best_alone": aggregate / best if best else 0.0,
            "cut_at_window": cut,
        }
    raw["summary"] = summary
    return raw


# ---------------------------------------------------------------- the benchmark


def cores(work: Path, runtime: Runtime, sizes: Sizes) -> tuple[list[Figure], Raw]:
    models, why = demo_models()
    raw: Raw = {
        "tokens": TOKENS,
        "ctx": CTX,
        "window_s": sizes.core_window_s,
        "cpus": sorted(os.sched_getaffinity(0)),
        "rate": "tokens streamed by the moment the first model ended (or the window "
        "closed), per second since sent; alone: tokens / (end - sent)",
    }
    if not models:
        raise RuntimeError(why)
    raw["models"] = {i: str(models[f]) for i, f in FILES.items()}
    root = work / "cores"
    starts: dict[str, Any] = {
        "mmd": lambda: MmdWay.start(root / "mmd", models, None),
        "defaults": lambda: DefaultsWay(runtime, _mkdir(root / "defaults"), models),
        "router": lambda: RouterWay(runtime, _mkdir(root / "router"), models),
    }
    ways: dict[str, Raw] = {}
    errors: dict[str, str] = {}
    for name, start in starts.items():
        print(f"  cores: {WAYS[name]} ...", file=sys.stderr, flush=True)
        way = None
        try:
            way = start()
            ways[name] = measure_way(way, sizes, SETS)
        except Exception as err:  # a peer that cannot run is reported, not skipped
            errors[name] = f"{type(err).__name__}: {err}"
        finally:
            if way is not None:
                way.close()
    raw["ways"] = ways
    raw["errors"] = errors
    raw["quota"] = quota_case(root, models, sizes)
    raw["table"] = cores_table(ways, raw["quota"])
    print(raw["table"], file=sys.stderr, flush=True)
    return figures(ways, errors, raw["quota"]), raw


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def quota_case(root: Path, models: dict[str, Path], sizes: Sizes) -> Raw:
    """mmd started on one core, as under ``taskset -c 0``: two models at once on it.

    A cgroup v2 ``cpu.max`` would be the other way to give mmd less than the machine;
    the benchmark does not create cgroups, and says whether the file is there.
    """
    cpus = sorted(os.sched_getaffinity(0))
    cgroup = Path("/sys/fs/cgroup/cpu.max")
    raw: Raw = {
        "limit": f"taskset -c {cpus[0]} (mmd's affinity at start)",
        "cgroup_v2_cpu_max": cgroup.read_text().strip() if cgroup.exists() else None,
    }
    if len(cpus) < 2:
        raw["skipped"] = f"this process may use {len(cpus)} CPU: no smaller quota to test"
        return raw
    print(f"  cores: mmd on CPU {cpus[0]} ...", file=sys.stderr, flush=True)
    way = None
    try:
        way = MmdWay.start(root / "mmd-quota", models, {cpus[0]})
        raw.update(measure_way(way, sizes, {1: SETS[1], 2: SETS[2]}))
    except Exception as err:
        raw["skipped"] = f"{type(err).__name__}: {err}"
    finally:
        if way is not None:
            way.close()
    return raw


def figures(ways: dict[str, Raw], errors: dict[str, str], quota: Raw) -> list[Figure]:
    found: list[Figure] = []
    mmd, defaults = ways.get("mmd"), ways.get("defaults")
    if mmd and defaults:
        for model_id in SETS[3]:
            ours, theirs = mmd["alone"][model_id]["rates"], defaults["alone"][model_id]["rates"]
            ratio = statistics.median(ours) / statistics.median(theirs)
            found.append(
                Figure(
                    "cores",
                    f"{model_id} alone, tok/s",
                    "tok/s",
                    Spread.of(ours),
                    Spread.of(theirs),
                    f">= {ALONE_TARGET}",
                    ratio >= ALONE_TARGET,
                    digits=1,
                    # Not a bound: mmd's placement may make a child faster than
                    # llama-server's defaults (fewer threads fighting for the cores).
                    better="",
                    floor_kind="llama-server's defaults, alone",
                )
            )
    for label, summary in (("", mmd), (", mmd on 1 core", quota if "summary" in quota else None)):
        if summary is None:
            continue
        for n in ("2", "3"):
            if n not in summary["summary"]:
                continue
            s = summary["summary"][n]
            found += [
                Figure(
                    "cores",
                    f"{n} at once: aggregate / best alone{label}",
                    "",
                    Spread.of([s["aggregate_of_best_alone"]]),
                    None,
                    f">= {AGGREGATE_TARGET}",
                    s["aggregate_of_best_alone"] >= AGGREGATE_TARGET,
                    digits=3,
                ),
                Figure(
                    "cores",
                    f"{n} at once: least kept of alone{label}",
                    "",
                    Spread.of([s["least_kept"]]),
                    None,
                    f">= 1/{int(n) + 1}",
                    s["least_kept"] >= 1 / (int(n) + 1),
                    digits=3,
                ),
            ]
    for peer in ("defaults", "router"):
        theirs = ways.get(peer)
        for n in ("2", "3"):
            if mmd is None:
                break
            ours_s = mmd["sets"][n]["aggregates"]
            problem = "" if theirs else f"{WAYS[peer]} could not run: {errors.get(peer)}"
            theirs_s = theirs["sets"][n]["aggregates"] if theirs else None
            found.append(
                Figure(
                    "cores",
                    f"{n} at once: aggregate tok/s vs {WAYS[peer]}",
                    "tok/s",
                    Spread.of(ours_s),
                    Spread.of(theirs_s) if theirs_s else None,
                    "-",
                    None,
                    digits=1,
                    better="higher",
                    peer=True,
                    problem=problem,
                    floor_kind=WAYS[peer],
                )
            )
    return found


def cores_table(ways: dict[str, Raw], quota: Raw) -> str:
    """Rows: N models x way; per model alone -> together (kept), the aggregate and its
    ratio to the best model alone."""
    rows = [
        [
            "N",
            "served by",
            *[f"{i} alone -> together (kept)" for i in SETS[3]],
            "aggregate",
            "÷ best alone",
        ]
    ]
    named = {WAYS[k]: v for k, v in ways.items()}
    if "summary" in quota:
        named["mmd on 1 core"] = quota
    for n in ("1", "2", "3"):
        for name, raw in named.items():
            s = raw["summary"].get(n)
            if s is None:
                continue
            cells = []
            for model_id in SETS[3]:
                if model_id in s["models"]:
                    cells.append(
                        f"{s['alone'][model_id]:.1f} -> {s['together'][model_id]:.1f} "
                        f"({s['kept'][model_id]:.2f})"
                    )
                else:
                    cells.append("")
            cut = " (cut)" if s["cut_at_window"] else ""
            rows.append(
                [
                    n,
                    name,
                    *cells,
                    f"{s['aggregate']:.1f}{cut}",
                    f"{s['aggregate_of_best_alone']:.2f}",
                ]
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
