"""Benchmarks of the daemon itself: its memory, the footprint estimates, and scale."""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import estimate_accuracy
import grpc
import psutil
from harness import PROMPT, Daemon, Figure, Runtime, Spread, infer_via_stub, python_bin, timed_run

from mmd.core.units import MIB
from mmd.runtime.synthetic import write_model
from mmd.v1 import mmd_pb2 as pb
from mmd.v1 import mmd_pb2_grpc

Raw = dict[str, Any]
BENCH_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ScaleSizes:
    models: int = 1000
    queued: int = 10_000
    start_runs: int = 3
    cli_runs: int = 5
    estimate_runs: int = 3

    @classmethod
    def quick(cls) -> ScaleSizes:
        return cls(models=1000, queued=2000, start_runs=1, cli_runs=3, estimate_runs=1)


# ---------------------------------------------------------------- 5. daemon footprint


def _rss_samples(read: Any, count: int = 5, every: float = 0.2) -> list[float]:
    values = []
    for _ in range(count):
        values.append(read() / MIB)
        time.sleep(every)
    return values


def daemon_footprint(work: Path, runtime: Runtime, sizes: ScaleSizes) -> tuple[list[Figure], Raw]:
    del runtime, sizes
    tables = "".join(
        f'[models.fp{i}]\npath = "{write_model(work / "models" / f"fp{i}.gguf", seed=30 + i)}"\n'
        f"ctx = 512\nkeep_alive = -1\n"
        for i in range(3)
    )
    bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    daemon = Daemon(work / "footprint", tables).start()
    try:
        time.sleep(1.0)
        bare_mib = _rss_samples(lambda: psutil.Process(bare.pid).memory_info().rss, 3)
        idle = _rss_samples(daemon.rss_bytes)
        for i in range(3):
            daemon.load(f"fp{i}")
            for _ in range(5):
                infer_via_stub(daemon.stub, f"fp{i}", 8)
        daemon.health()
        time.sleep(1.0)  # a few memory samples and event publications
        loaded = _rss_samples(daemon.rss_bytes)
    finally:
        daemon.stop()
        bare.kill()
        bare.wait()
    floor = Spread.of(bare_mib)
    figures = [
        Figure("footprint", "mmd RSS, idle", "MiB", Spread.of(idle), floor, "< 80 MB", None),
        Figure(
            "footprint",
            "mmd RSS, 3 models loaded",
            "MiB",
            Spread.of(loaded),
            floor,
            "< 80 MB",
            None,
        ),
    ]
    for figure in figures:
        figure.passed = figure.mmd.median * MIB < 80e6
    raw = {"idle_rss_mib": idle, "loaded_rss_mib": loaded, "bare_python_rss_mib": bare_mib}
    return figures, raw


# ---------------------------------------------------------------- 6. estimate accuracy

# The models and settings the other benchmarks run: (name, embedding, blocks, ctx, parallel).
ESTIMATED = (
    ("tiny 64x2", 64, 2, 512, 1),
    ("256x4", 256, 4, 2048, 8),
    ("512x4", 512, 4, 2048, 1),
)


def estimate_error(work: Path, runtime: Runtime, sizes: ScaleSizes) -> tuple[list[Figure], Raw]:
    workdir = work / "estimate"
    workdir.mkdir(parents=True, exist_ok=True)
    figures: list[Figure] = []
    raw: Raw = {}
    for name, embedding, blocks, ctx, parallel in ESTIMATED:
        path = write_model(
            workdir / f"e{embedding}x{blocks}.gguf", embedding=embedding, blocks=blocks
        )
        rows = [
            estimate_accuracy.measure(runtime.binary.path, path, ctx, parallel, workdir)
            for _ in range(sizes.estimate_runs)
        ]
        measured = [row.rss_mib for row in rows if row.rss_mib is not None]
        if not measured:
            raw[name] = {"status": rows[0].status}
            continue
        estimate = rows[0].estimate_mib
        error = 100 * (estimate - Spread.of(measured).median) / Spread.of(measured).median
        figures.append(
            Figure(
                "estimate",
                f"{name}, ctx {ctx}, np {parallel}: estimate vs RSS",
                "MiB",
                Spread.of([estimate]),
                Spread.of(measured),
                "within 10%",
                abs(error) <= 10,
                note=f"error {error:+.1f}%",
                better="",  # an estimate may err either way: its measurement is no bound
                floor_kind="llama-server's RSS, measured",
            )
        )
        raw[name] = {
            "estimate_mib": estimate,
            "rss_mib": measured,
            "error_pct": error,
            "rows": [vars(row) for row in rows],
        }
    return figures, raw


# ---------------------------------------------------------------- 7. scale


def _registry(model: Path, count: int) -> str:
    return "".join(
        f'[models.m{i}]\npath = "{model}"\nctx = 512\nparallel = 1\nkeep_alive = -1\n'
        for i in range(count)
    )


async def _flood(socket: Path, count: int, marks: dict[str, float]) -> Raw:
    """Queue ``count`` Infer calls, hold them, cancel them all, wait for the daemon to settle."""
    outcomes: collections.Counter[str] = collections.Counter()
    details: dict[str, str] = {}  # one message per status
    async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
        stub = mmd_pb2_grpc.ModelManagerStub(channel)

        async def consume(call: Any) -> None:
            try:
                async for _chunk in call:
                    pass
                outcomes["ok"] += 1
            except asyncio.CancelledError:
                outcomes["cancelled"] += 1
            except grpc.RpcError as err:
                outcomes[err.code().name] += 1
                details[err.code().name] = str(err.details())

        request = pb.InferRequest(model_id="m0", prompt=PROMPT, max_tokens=4, raw=True)
        marks["submit"] = time.monotonic()
        calls = [stub.Infer(request) for _ in range(count)]
        tasks = [asyncio.create_task(consume(call)) for call in calls]
        peak = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            health = await stub.GetHealth(pb.GetHealthRequest(), timeout=30)
            peak = max(peak, health.queued_requests)
            if health.queued_requests + health.active_inferences + sum(outcomes.values()) >= count:
                break
            await asyncio.sleep(0.05)
        marks["queued"] = time.monotonic()
        before_cancel = dict(outcomes)
        await asyncio.sleep(3.0)  # the daemon serves one at a time with the queue full
        marks["cancel"] = time.monotonic()
        for call in calls:
            call.cancel()
        await asyncio.gather(*tasks)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            health = await stub.GetHealth(pb.GetHealthRequest(), timeout=30)
            if health.queued_requests == 0 and health.active_inferences == 0:
                break
            await asyncio.sleep(0.02)
        marks["settled"] = time.monotonic()
        return {
            "peak_queued": peak,
            "outcomes_before_cancel": before_cancel,
            "outcomes": dict(outcomes),
            "outcome_details": details,
            "final_active": health.active_inferences,
            "final_queued": health.queued_requests,
        }


def _between(samples: list[list[float]], start: float, end: float) -> list[float]:
    return [latency for sent, latency in samples if start <= sent < end]


def scale(work: Path, runtime: Runtime, sizes: ScaleSizes) -> tuple[list[Figure], Raw]:
    del runtime
    model = write_model(work / "models" / "scale.gguf", seed=40)
    settings = "[scheduler]\nmax_concurrent = 1\nmax_queue = 20000\n"
    small = Daemon(work / "scale-1", _registry(model, 1), settings)
    big = Daemon(work / "scale-n", _registry(model, sizes.models), settings)
    start_ms: dict[str, list[float]] = {"1": [], "n": []}
    for _ in range(sizes.start_runs):
        for key, daemon in (("1", small), ("n", big)):
            daemon.start()
            start_ms[key].append(daemon.start_ms)
            daemon.stop()
    models_ms: dict[str, list[float]] = {"1": [], "n": []}
    small.start()
    big.start()
    try:
        mmctl_models = [*python_bin("mmctl"), "models"]
        for _ in range(sizes.cli_runs):
            for key, daemon in (("1", small), ("n", big)):
                models_ms[key].append(timed_run(mmctl_models, daemon.env())[0])
        small.stop()
        big.load("m0")
        out = work / "scale-probe.json"
        prober = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / "probe.py"), str(big.socket), str(out)],
            stdout=subprocess.PIPE,
        )
        assert prober.stdout is not None
        prober.stdout.readline()  # "ready"
        marks = {"idle": time.monotonic()}
        time.sleep(3.0)
        flood = asyncio.run(_flood(big.socket, sizes.queued, marks))
        time.sleep(0.5)
        prober.send_signal(signal.SIGTERM)
        prober.wait(30)
        samples: list[list[float]] = json.loads(out.read_text())
    finally:
        small.stop()
        big.stop()
    idle = _between(samples, marks["idle"], marks["submit"])
    loaded = _between(samples, marks["submit"], marks["settled"])
    queued_s = marks["queued"] - marks["submit"]
    settle_s = marks["settled"] - marks["cancel"]
    n = sizes.queued
    leftover = flood["final_active"] + flood["final_queued"]
    figures = [
        Figure("scale", f"daemon start, {sizes.models} models", "ms",
               Spread.of(start_ms["n"]), Spread.of(start_ms["1"]), "-", None, digits=0),
        Figure("scale", f"mmctl models, {sizes.models} models", "ms",
               Spread.of(models_ms["n"]), Spread.of(models_ms["1"]), "-", None, digits=0),
        Figure("scale", f"GetHealth worst, {n} queued", "ms",
               Spread.of([max(loaded)]), Spread.of([max(idle)]), "-", None),
        Figure("scale", f"GetHealth latency, {n} queued", "ms",
               Spread.of(loaded), Spread.of(idle), "-", None, digits=2),
        Figure("scale", f"time to queue {n} requests", "s",
               Spread.of([queued_s]), None, "-", None, digits=2),
        Figure("scale", f"settle after cancelling {n}", "s",
               Spread.of([settle_s]), None, "-", None, digits=2),
        Figure("scale", "active + queued after cancel", "",
               Spread.of([float(leftover)]), None, "= 0", leftover == 0, digits=0),
    ]  # fmt: skip
    raw = {
        "models": sizes.models,
        "queued": n,
        "start_ms": start_ms,
        "mmctl_models_ms": models_ms,
        "probe_interval_ms": 10,
        "probe_idle_ms": idle,
        "probe_loaded_ms": loaded,
        "probe_samples_s_ms": [(sent - marks["idle"], ms) for sent, ms in samples],
        "phases_s": {k: v - marks["idle"] for k, v in marks.items()},
        **flood,
    }
    return figures, raw
