"""Benchmarks of the request path: per-request overhead, throughput, swaps, CLI latency."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
from harness import (
    PROMPT,
    Daemon,
    DirectServer,
    Figure,
    Runtime,
    Spread,
    child_argv_matches,
    completion_body,
    infer_direct,
    infer_via_stub,
    percentile,
    python_bin,
    read_stream,
    timed_run,
)

from mmd.synthetic import write_model
from mmd.v1 import mmd_pb2 as pb
from mmd.v1 import mmd_pb2_grpc


@dataclass(frozen=True)
class Sizes:
    """Repetitions; --quick shrinks them."""

    overhead_requests: int = 200
    overhead_cli: int = 40
    throughput_rounds: int = 7
    swaps: int = 20
    cli_runs: int = 20

    @classmethod
    def quick(cls) -> Sizes:
        return cls(overhead_requests=40, overhead_cli=8, throughput_rounds=1, swaps=3, cli_runs=6)


Raw = dict[str, Any]


# ---------------------------------------------------------------- 1. request overhead


def request_overhead(work: Path, runtime: Runtime, sizes: Sizes) -> tuple[list[Figure], Raw]:
    model = write_model(work / "models" / "tiny.gguf", embedding=64, blocks=2)
    ctx, parallel, max_tokens = 512, 1, 4
    daemon = Daemon(
        work / "overhead",
        f'[models.tiny]\npath = "{model}"\nctx = {ctx}\nparallel = {parallel}\nkeep_alive = -1\n',
    ).start()
    direct = None
    grpc_floor = None
    try:
        loaded = daemon.load("tiny")
        direct = DirectServer(
            runtime,
            runtime.spec(
                "tiny",
                model,
                work / "overhead",
                ctx=ctx,
                parallel=parallel,
                layers=loaded.placement.gpu_layers,
            ),
        ).start()
        same_argv = child_argv_matches(loaded.pid, direct.argv)
        stub = daemon.stub
        messages = message_count(stub, "tiny", max_tokens)
        grpc_floor = GrpcFloor.start(work / "overhead" / "grpc-floor.sock", messages - 1)
        mmctl = [*python_bin("mmctl"), "infer", "tiny", PROMPT, "--max-tokens", str(max_tokens)]
        stub_ms: list[float] = []
        direct_ms: list[float] = []
        grpc_ms: list[float] = []
        cli_ms: list[float] = []
        with direct.client() as client:
            for _ in range(20):  # warm-up: connections, prompt cache, allocator
                infer_via_stub(stub, "tiny", max_tokens)
                infer_direct(client, max_tokens)
                infer_via_stub(grpc_floor.stub, "tiny", max_tokens)
            timed_run(mmctl, daemon.env())
            cli_every = max(1, sizes.overhead_requests // sizes.overhead_cli)
            for i in range(sizes.overhead_requests):
                # Alternate which goes first so that neither always follows the other.
                if i % 2:
                    stub_ms.append(infer_via_stub(stub, "tiny", max_tokens)[0])
                    direct_ms.append(infer_direct(client, max_tokens)[0])
                else:
                    direct_ms.append(infer_direct(client, max_tokens)[0])
                    stub_ms.append(infer_via_stub(stub, "tiny", max_tokens)[0])
                grpc_ms.append(infer_via_stub(grpc_floor.stub, "tiny", max_tokens)[0])
                if i % cli_every == 0:
                    cli_ms.append(timed_run(mmctl, daemon.env())[0])
    finally:
        if grpc_floor:
            grpc_floor.stop()
        if direct:
            direct.stop()
        daemon.stop()
    stub_s, direct_s, cli_s = Spread.of(stub_ms), Spread.of(direct_ms), Spread.of(cli_ms)
    grpc_s = Spread.of(grpc_ms)
    added_p50 = stub_s.median - direct_s.median
    beyond_grpc_p50 = added_p50 - grpc_s.median
    added_p95 = percentile(stub_ms, 95) - percentile(direct_ms, 95)
    p95 = {k: percentile(v, 95) for k, v in (("stub", stub_ms), ("direct", direct_ms))}
    figures = [
        Figure(
            "overhead",
            "latency via stub, p50 [p5-p95]",
            "ms",
            stub_s,
            direct_s,
            "-",
            None,
            digits=2,
        ),
        Figure(
            "overhead",
            "added latency via stub, p50",
            "ms",
            Spread.of([added_p50]),
            None,
            "< 1 ms",
            added_p50 < 1.0,
            digits=2,
        ),
        Figure(
            "overhead",
            "added latency via stub, p95",
            "ms",
            Spread.of([added_p95]),
            None,
            "-",
            None,
            ratio=p95["stub"] / p95["direct"],
            digits=2,
        ),
        Figure(
            "overhead",
            f"gRPC alone: empty servicer, {messages} messages",
            "ms",
            grpc_s,
            None,
            "-",
            None,
            digits=2,
        ),
        Figure(
            "overhead",
            "added beyond the gRPC floor, p50",
            "ms",
            Spread.of([beyond_grpc_p50]),
            None,
            "-",
            None,
            digits=2,
        ),
        Figure("overhead", "latency via mmctl infer, p50", "ms", cli_s, direct_s, "-", None),
    ]
    raw = {
        "model": "embedding 64, 2 blocks",
        "ctx": ctx,
        "max_tokens": max_tokens,
        "argv_matches_mmd_child": same_argv,
        "stub_ms": stub_ms,
        "direct_ms": direct_ms,
        "mmctl_infer_ms": cli_ms,
        "added_p50_ms": added_p50,
        "added_p95_ms": added_p95,
        "messages_per_request": messages,
        "grpc_floor_ms": grpc_ms,
        "added_beyond_grpc_floor_p50_ms": beyond_grpc_p50,
    }
    return figures, raw


def message_count(stub: mmd_pb2_grpc.ModelManagerStub, model_id: str, max_tokens: int) -> int:
    """How many messages mmd sends for the benchmark's request (text pieces and the last)."""
    request = pb.InferRequest(model_id=model_id, prompt=PROMPT, max_tokens=max_tokens)
    return sum(1 for _ in stub.Infer(request, timeout=60))


@dataclass
class GrpcFloor:
    """bench/grpc_floor.py in a process of its own: gRPC with nothing behind it."""

    process: subprocess.Popen[bytes]
    channel: grpc.Channel
    stub: mmd_pb2_grpc.ModelManagerStub

    @classmethod
    def start(cls, socket: Path, text_messages: int) -> GrpcFloor:
        script = Path(__file__).resolve().parent / "grpc_floor.py"
        argv = [sys.executable, str(script), str(socket), "--messages", str(text_messages)]
        process = subprocess.Popen(argv)
        channel = grpc.insecure_channel(f"unix:{socket}")
        grpc.channel_ready_future(channel).result(timeout=30)
        return cls(process, channel, mmd_pb2_grpc.ModelManagerStub(channel))

    def stop(self) -> None:
        self.channel.close()
        self.process.kill()
        self.process.wait()


# ---------------------------------------------------------------- 2. throughput


async def _mmd_tokens(socket: Path, model_id: str, clients: int, requests: int, n: int) -> int:
    async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
        stub = mmd_pb2_grpc.ModelManagerStub(channel)
        remaining = requests
        total = 0

        async def worker() -> None:
            nonlocal remaining, total
            while remaining > 0:
                remaining -= 1
                request = pb.InferRequest(model_id=model_id, prompt=PROMPT, max_tokens=n)
                async for chunk in stub.Infer(request):
                    if chunk.HasField("done"):
                        total += chunk.done.completion_tokens

        await asyncio.gather(*(worker() for _ in range(clients)))
        return total


async def _direct_tokens(socket: Path, clients: int, requests: int, n: int) -> int:
    transport = httpx.AsyncHTTPTransport(uds=str(socket))
    limits = httpx.Limits(max_connections=256, keepalive_expiry=2.0)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://llama-server", timeout=120, limits=limits
    ) as client:
        remaining = requests
        total = 0
        body = completion_body(n)

        async def worker() -> None:
            nonlocal remaining, total
            while remaining > 0:
                remaining -= 1
                async with client.stream("POST", "/completion", json=body) as response:
                    async for line in response.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        event = json.loads(line[6:])
                        if event.get("stop"):
                            total += int(event.get("tokens_predicted", 0))
                            break

        await asyncio.gather(*(worker() for _ in range(clients)))
        return total


def throughput(work: Path, runtime: Runtime, sizes: Sizes) -> tuple[list[Figure], Raw]:
    model = write_model(work / "models" / "m256x4.gguf", embedding=256, blocks=4, seed=7)
    ctx, parallel, max_tokens = 2048, 8, 64
    levels = {1: 8, 8: 32, 32: 64}  # clients: requests per round
    daemon = Daemon(
        work / "throughput",
        f'[models.gen]\npath = "{model}"\nctx = {ctx}\nparallel = {parallel}\nkeep_alive = -1\n',
        "[scheduler]\nmax_concurrent = 32\nmax_queue = 1024\n",
    ).start()
    direct = None
    figures: list[Figure] = []
    raw: Raw = {"model": "embedding 256, 4 blocks", "ctx": ctx, "parallel": parallel}
    try:
        loaded = daemon.load("gen")
        direct = DirectServer(
            runtime,
            runtime.spec(
                "gen",
                model,
                work / "throughput",
                ctx=ctx,
                parallel=parallel,
                layers=loaded.placement.gpu_layers,
            ),
        ).start()
        raw["argv_matches_mmd_child"] = child_argv_matches(loaded.pid, direct.argv)

        def run_mmd(clients: int, requests: int) -> float:
            start = time.perf_counter()
            tokens = asyncio.run(_mmd_tokens(daemon.socket, "gen", clients, requests, max_tokens))
            return tokens / (time.perf_counter() - start)

        def run_direct(clients: int, requests: int) -> float:
            assert direct is not None
            start = time.perf_counter()
            tokens = asyncio.run(_direct_tokens(direct.spec.socket, clients, requests, max_tokens))
            return tokens / (time.perf_counter() - start)

        run_mmd(8, 8)  # warm-up
        run_direct(8, 8)
        for clients, requests in levels.items():
            mmd_tps: list[float] = []
            direct_tps: list[float] = []
            for r in range(sizes.throughput_rounds):
                order = (run_mmd, run_direct) if r % 2 == 0 else (run_direct, run_mmd)
                for run in order:
                    value = run(clients, requests)
                    (mmd_tps if run is run_mmd else direct_tps).append(value)
            ratios = [m / d for m, d in zip(mmd_tps, direct_tps, strict=True)]
            ratio = Spread.of(ratios)
            figures.append(
                Figure(
                    "throughput",
                    f"tokens/s, {clients} client{'s' if clients > 1 else ''}",
                    "tok/s",
                    Spread.of(mmd_tps),
                    Spread.of(direct_tps),
                    ">= 0.97",
                    ratio.median >= 0.97,
                    ratio=ratio.median,
                    digits=0,
                )
            )
            raw[f"clients_{clients}"] = {
                "requests_per_round": requests,
                "mmd_tokens_per_s": mmd_tps,
                "direct_tokens_per_s": direct_tps,
                "ratios": ratios,
            }
    finally:
        if direct:
            direct.stop()
        daemon.stop()
    return figures, raw


# ---------------------------------------------------------------- 3. swap latency


def swap_latency(work: Path, runtime: Runtime, sizes: Sizes) -> tuple[list[Figure], Raw]:
    models = {
        name: write_model(work / "models" / f"{name}.gguf", embedding=512, blocks=4, seed=seed)
        for name, seed in (("swap_a", 11), ("swap_b", 12))
    }
    ctx, max_tokens = 2048, 4
    tables = "".join(
        f'[models.{name}]\npath = "{path}"\nctx = {ctx}\nparallel = 1\n'
        for name, path in models.items()
    )
    # First find the footprint, then restart with a budget that holds one model only.
    probe = Daemon(work / "swap-plan", tables).start()
    try:
        plan = probe.stub.PlanLoad(pb.PlanLoadRequest(model_id="swap_a"), timeout=30)
    finally:
        probe.stop()
    footprint = plan.footprint.total_bytes
    budget = int(footprint * 1.5)
    daemon = Daemon(work / "swap", tables, f'[budget]\nram = "{budget}"\n').start()
    swap_ms: list[float] = []
    floor_ms: list[float] = []  # start the target directly, request: the floor
    floor_ready_ms: list[float] = []
    floor_swap_ms: list[float] = []  # kill the other one directly first, then the same
    try:
        current = "swap_a"
        infer_via_stub(daemon.stub, current, max_tokens)
        gpu_layers = daemon.model(current).placement.gpu_layers

        def direct(name: str) -> DirectServer:
            spec = runtime.spec(
                name, models[name], work / "swap", ctx=ctx, parallel=1, layers=gpu_layers
            )
            return DirectServer(runtime, spec)

        def first_token_ms(server: DirectServer, since: float) -> float:
            with server.client() as client:
                server.wait_ready(client)
                body = completion_body(max_tokens)
                with client.stream("POST", "/completion", json=body) as response:
                    first_at, _ = read_stream(response.iter_lines())
            return (first_at - since) * 1000

        for i in range(sizes.swaps + 1):
            other = current
            target = "swap_b" if current == "swap_a" else "swap_a"
            _total, first, _tokens = infer_via_stub(daemon.stub, target, max_tokens)
            if i:  # the first swap warms the file cache and the code paths
                swap_ms.append(first)
            current = target
            old, new = direct(other).start(), direct(target)
            try:
                with old.client() as client:  # as mmd's victim, it has served a request
                    infer_direct(client, max_tokens)
                began = time.perf_counter()
                old.kill()
                new.spawn()
                swapped = first_token_ms(new, began)
            finally:
                old.stop()
                new.stop()
            alone = direct(target)
            try:
                alone.spawn()
                started = first_token_ms(alone, alone.started_at)
            finally:
                alone.stop()
            if i:
                floor_ms.append(started)
                floor_ready_ms.append((alone.ready_at - alone.started_at) * 1000)
                floor_swap_ms.append(swapped)
        loaded = [m.id for m in daemon.health().models]
    finally:
        daemon.stop()
    swap, floor = Spread.of(swap_ms), Spread.of(floor_ms)
    figures = [
        Figure(
            "swap",
            "first token, evict one + load other",
            "ms",
            swap,
            floor,
            "ratio <= 1.05",
            swap.median / floor.median <= 1.05,
        ),
        Figure(
            "swap",
            "same, floor also kills the other",
            "ms",
            swap,
            Spread.of(floor_swap_ms),
            "-",
            None,
        ),
    ]
    raw = {
        "model": "embedding 512, 4 blocks",
        "footprint_bytes": footprint,
        "budget_ram_bytes": budget,
        "loaded_at_end": loaded,
        "swap_first_token_ms": swap_ms,
        "floor_first_token_ms": floor_ms,
        "floor_ready_ms": floor_ready_ms,
        "floor_kill_other_then_start_ms": floor_swap_ms,
    }
    return figures, raw


# ---------------------------------------------------------------- 4. CLI latency


def cli_latency(work: Path, runtime: Runtime, sizes: Sizes) -> tuple[list[Figure], Raw]:
    del runtime
    tables = "".join(
        f'[models.cli{i}]\npath = "{write_model(work / "models" / f"cli{i}.gguf", seed=20 + i)}"\n'
        f"ctx = 512\n"
        for i in range(3)
    )
    daemon = Daemon(work / "cli", tables).start()
    # As installed: with bytecode caches (an environment may turn writing them off).
    env = {k: v for k, v in daemon.env().items() if k != "PYTHONDONTWRITEBYTECODE"}
    commands: dict[str, tuple[list[str], bool]] = {
        "mmctl ps": ([*python_bin("mmctl"), "ps"], False),
        "mmctl ps, on a terminal": ([*python_bin("mmctl"), "ps"], True),
        "python -c pass": ([sys.executable, "-c", "pass"], False),
        "python -c 'import mmctl.cli'": ([sys.executable, "-c", "import mmctl.cli"], False),
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    try:
        for i in range(3):
            daemon.load(f"cli{i}")
        for argv, terminal in commands.values():
            timed_run(argv, env, terminal)
        for _ in range(sizes.cli_runs):
            for name, (argv, terminal) in commands.items():
                times[name].append(timed_run(argv, env, terminal)[0])
    finally:
        daemon.stop()
    ps, ps_terminal, bare, imported = (Spread.of(times[name]) for name in commands)
    figures = [
        Figure(
            "cli",
            "mmctl ps wall time, piped",
            "ms",
            ps,
            bare,
            "< 150 ms",
            ps.median < 150,
            digits=0,
        ),
        Figure(
            "cli",
            "mmctl ps wall time, terminal",
            "ms",
            ps_terminal,
            bare,
            "< 150 ms",
            ps_terminal.median < 150,
            digits=0,
        ),
        Figure("cli", "python -c 'import mmctl.cli'", "ms", imported, bare, "-", None, digits=0),
    ]
    return figures, {"wall_ms": times, "models_loaded": 3}
