"""Benchmarks of the request path: per-request overhead, throughput, swaps, CLI latency."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
from harness import (
    CPU_ONLY_ENV,
    PROMPT,
    Daemon,
    DirectServer,
    Figure,
    Runtime,
    Spread,
    child_argv_matches,
    completion_body,
    infer_direct,
    infer_via_lines,
    infer_via_stub,
    percentile,
    python_bin,
    share_of,
    timed_run,
)
from rawhttp import busy_rate, completion_async, request_bytes

from mmd.host import paths
from mmd.runtime.synthetic import write_model
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
    # The real-model benchmarks (cores, router): a few seconds a request on 2 cores.
    core_solo_runs: int = 2
    core_together_runs: int = 2
    # Every real-model request is cut after this long: on a machine whose cores are
    # oversubscribed a 64-token answer can take minutes (under 1 token/s).
    core_window_s: float = 12.0
    peer_requests: int = 40
    peer_swaps: int = 10
    peer_rounds: int = 3

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            overhead_requests=40,
            overhead_cli=8,
            throughput_rounds=1,
            swaps=3,
            cli_runs=6,
            core_solo_runs=1,
            core_together_runs=1,
            core_window_s=6.0,
            peer_requests=12,
            peer_swaps=4,
            peer_rounds=1,
        )


Raw = dict[str, Any]
# What the request floors are: the same request to the same llama-server, read
# by a client that costs less per token than mmd's path (bench/rawhttp.py).
DIRECT_CLIENT = "llama-server, raw-socket client"


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
                cores=share_of(loaded),
            ),
        ).start()
        same_argv = child_argv_matches(loaded.pid, direct.argv)
        stub = daemon.stub
        messages = message_count(stub, "tiny", max_tokens)
        grpc_floor = GrpcFloor.start(work / "overhead" / "grpc-floor.sock", messages - 1)
        mmctl = [
            *python_bin("mmctl"),
            "infer",
            "tiny",
            PROMPT,
            "--raw",
            "--max-tokens",
            str(max_tokens),
        ]
        lines = paths.json_socket(daemon.socket)
        stub_ms: list[float] = []
        direct_ms: list[float] = []
        grpc_ms: list[float] = []
        lines_ms: list[float] = []
        cli_ms: list[float] = []
        with direct.client() as client:
            for _ in range(20):  # warm-up: connections, prompt cache, allocator
                infer_via_stub(stub, "tiny", max_tokens)
                infer_direct(client, max_tokens)
                infer_via_stub(grpc_floor.stub, "tiny", max_tokens)
                infer_via_lines(lines, "tiny", max_tokens)
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
                lines_ms.append(infer_via_lines(lines, "tiny", max_tokens)[0])
                if i % cli_every == 0:
                    cli_ms.append(timed_run(mmctl, daemon.env())[0])
        # The servers' own CPU per request, which a busy machine cannot blur as it does
        # wall time: mmd's (admission, the child's stream, gRPC) and gRPC's alone.
        cpu_ms = {
            "mmd": server_cpu_ms(daemon_pid(daemon), lambda: infer_via_stub(stub, "tiny", 4)),
            "mmd_json_lines": server_cpu_ms(
                daemon_pid(daemon), lambda: infer_via_lines(lines, "tiny", 4)
            ),
            "grpc_floor": server_cpu_ms(
                grpc_floor.process.pid, lambda: infer_via_stub(grpc_floor.stub, "tiny", 4)
            ),
        }
    finally:
        if grpc_floor:
            grpc_floor.stop()
        if direct:
            direct.stop()
        daemon.stop()
    stub_s, direct_s, cli_s = Spread.of(stub_ms), Spread.of(direct_ms), Spread.of(cli_ms)
    grpc_s, lines_s = Spread.of(grpc_ms), Spread.of(lines_ms)
    added_p50 = stub_s.median - direct_s.median
    lines_added_p50 = lines_s.median - direct_s.median
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
            floor_kind=DIRECT_CLIENT,
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
            added=True,
            floor_kind=DIRECT_CLIENT,
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
            added=True,
            floor_kind=DIRECT_CLIENT,
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
            added=True,
            floor_kind="direct client + gRPC alone",
        ),
        Figure(
            "overhead",
            "server CPU per request: mmd vs gRPC alone",
            "ms",
            Spread.of([cpu_ms["mmd"]]),
            Spread.of([cpu_ms["grpc_floor"]]),
            "-",
            None,
            digits=2,
            better="",
            floor_kind="grpc.aio with nothing behind it",
        ),
        Figure(
            "overhead",
            "added latency via the JSON Lines socket, p50",
            "ms",
            Spread.of([lines_added_p50]),
            None,
            "-",
            None,
            digits=2,
            added=True,
            floor_kind=DIRECT_CLIENT,
        ),
        Figure(
            "overhead",
            "server CPU per request: mmd over JSON Lines vs over gRPC",
            "ms",
            Spread.of([cpu_ms["mmd_json_lines"]]),
            Spread.of([cpu_ms["mmd"]]),
            "-",
            None,
            digits=2,
            better="",
            floor_kind="mmd over gRPC",
        ),
        Figure(
            "overhead",
            "latency via mmctl infer, p50",
            "ms",
            cli_s,
            direct_s,
            "-",
            None,
            floor_kind=DIRECT_CLIENT,
        ),
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
        "json_lines_ms": lines_ms,
        "json_lines_added_p50_ms": lines_added_p50,
        "added_beyond_grpc_floor_p50_ms": beyond_grpc_p50,
        "server_cpu_ms_per_request": cpu_ms,
    }
    return figures, raw


CPU_SAMPLE_REQUESTS = 200


def daemon_pid(daemon: Daemon) -> int:
    assert daemon.process is not None
    return daemon.process.pid


def cpu_seconds(process: psutil.Process) -> float:
    """The CPU time (user + system, s) ``process`` has spent so far."""
    times = process.cpu_times()
    return times.user + times.system


def server_cpu_ms(pid: int, request: Callable[[], object]) -> float:
    """The CPU time (ms) process ``pid`` spends per ``request()``, over
    CPU_SAMPLE_REQUESTS of them in a row."""
    process = psutil.Process(pid)
    before = cpu_seconds(process)
    for _ in range(CPU_SAMPLE_REQUESTS):
        request()
    return (cpu_seconds(process) - before) * 1000 / CPU_SAMPLE_REQUESTS


def message_count(stub: mmd_pb2_grpc.ModelManagerStub, model_id: str, max_tokens: int) -> int:
    """How many messages mmd sends for the benchmark's request (text pieces and the last)."""
    request = pb.InferRequest(model_id=model_id, prompt=PROMPT, max_tokens=max_tokens, raw=True)
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
                request = pb.InferRequest(model_id=model_id, prompt=PROMPT, max_tokens=n, raw=True)
                async for chunk in stub.Infer(request):
                    if chunk.HasField("done"):
                        total += chunk.done.completion_tokens

        await asyncio.gather(*(worker() for _ in range(clients)))
        return total


async def _direct_tokens(
    socket: Path, clients: int, requests: int, n: int
) -> tuple[int, list[tuple[float, float, int]]]:
    """(tokens, (end, busy s, tokens) per request by llama-server's timings) of one round."""
    request = request_bytes("POST", "/completion", completion_body(n))
    remaining = requests
    total = 0
    spans: list[tuple[float, float, int]] = []

    async def worker() -> None:
        nonlocal remaining, total
        while remaining > 0:
            remaining -= 1
            done = await completion_async(socket, request)
            total += done.tokens
            busy_ms = done.timings.get("prompt_ms", 0.0) + done.timings.get("predicted_ms", 0.0)
            spans.append((done.end_at, busy_ms / 1000, done.tokens))

    await asyncio.gather(*(worker() for _ in range(clients)))
    return total, spans


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
    raw: Raw = {
        "model": "embedding 256, 4 blocks",
        "ctx": ctx,
        "parallel": parallel,
        "floor": "a raw-socket client of the same llama-server (bench/rawhttp.py); "
        "llama_server_busy: its tokens over the union of its own prompt_ms + predicted_ms",
    }
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
                cores=share_of(loaded),
            ),
        ).start()
        raw["argv_matches_mmd_child"] = child_argv_matches(loaded.pid, direct.argv)

        mmd_process = psutil.Process(daemon_pid(daemon))
        cpu_per_token: list[float] = []  # mmd's own CPU (µs) per token in the level's rounds

        def run_mmd(clients: int, requests: int) -> float:
            before = cpu_seconds(mmd_process)
            start = time.perf_counter()
            tokens = asyncio.run(_mmd_tokens(daemon.socket, "gen", clients, requests, max_tokens))
            elapsed = time.perf_counter() - start
            spent = cpu_seconds(mmd_process) - before
            cpu_per_token.append(spent * 1e6 / max(tokens, 1))
            return tokens / elapsed

        server_tps: list[float] = []  # llama-server's own rate in the current level's rounds

        def run_direct(clients: int, requests: int) -> float:
            assert direct is not None
            start = time.perf_counter()
            tokens, spans = asyncio.run(
                _direct_tokens(direct.spec.socket, clients, requests, max_tokens)
            )
            elapsed = time.perf_counter() - start
            server_tps.append(busy_rate(spans))
            return tokens / elapsed

        run_mmd(8, 8)  # warm-up
        run_direct(8, 8)
        for clients, requests in levels.items():
            mmd_tps: list[float] = []
            direct_tps: list[float] = []
            server_tps.clear()
            cpu_per_token.clear()
            for r in range(sizes.throughput_rounds):
                order = (run_mmd, run_direct) if r % 2 == 0 else (run_direct, run_mmd)
                for run in order:
                    value = run(clients, requests)
                    (mmd_tps if run is run_mmd else direct_tps).append(value)
            ratios = [m / d for m, d in zip(mmd_tps, direct_tps, strict=True)]
            of_server = [m / b for m, b in zip(mmd_tps, server_tps, strict=True) if b]
            label = f"tokens/s, {clients} client{'s' if clients > 1 else ''}"
            figures += [
                Figure(
                    "throughput",
                    label,
                    "tok/s",
                    Spread.of(mmd_tps),
                    Spread.of(direct_tps),
                    ">= 0.97",
                    Spread.of(ratios).median >= 0.97,
                    ratio=Spread.of(ratios).median,
                    digits=0,
                    better="higher",
                    floor_kind=DIRECT_CLIENT,
                ),
                Figure(
                    "throughput",
                    f"{label}, vs llama-server's timings",
                    "tok/s",
                    Spread.of(mmd_tps),
                    Spread.of(server_tps),
                    "-",
                    None,
                    ratio=Spread.of(of_server).median if of_server else None,
                    digits=0,
                    better="higher",
                    floor_kind="llama-server's own prompt_ms + predicted_ms, busy time only",
                ),
                # What mmd takes from the cores the child generates on, against what a
                # token costs the child: the share of the machine the relay competes for.
                Figure(
                    "throughput",
                    f"mmd's CPU per token vs the child's time per token, {clients} clients",
                    "us",
                    Spread.of(cpu_per_token),
                    Spread.of([1e6 / rate for rate in server_tps if rate]),
                    "-",
                    None,
                    digits=0,
                    better="",
                    floor_kind="1 / llama-server's busy rate",
                ),
            ]
            raw[f"clients_{clients}"] = {
                "mmd_cpu_us_per_token": list(cpu_per_token),
                "requests_per_round": requests,
                "mmd_tokens_per_s": mmd_tps,
                "direct_tokens_per_s": direct_tps,
                "ratios": ratios,
                "llama_server_busy_tokens_per_s": list(server_tps),
                "ratios_to_llama_server": of_server,
            }
    finally:
        if direct:
            direct.stop()
        daemon.stop()
    return figures, raw


# ---------------------------------------------------------------- 3. swap latency


SWAP_CTX = 2048


@dataclass(frozen=True)
class Held:
    """What mmd plans for swap_a, and counts once its child is measured, per device."""

    gpu_layers: int
    planned: dict[str, int]
    counted: dict[str, int]


def _held(root: Path, tables: str, settings: str, cpu_only: bool) -> Held:
    probe = Daemon(root, tables, settings, cpu_only=cpu_only).start()
    try:
        plan = probe.stub.PlanLoad(pb.PlanLoadRequest(model_id="swap_a"), timeout=30)
        infer_via_stub(probe.stub, "swap_a", 4)
        deadline = time.monotonic() + 10
        while not probe.model("swap_a").measured_bytes and time.monotonic() < deadline:
            time.sleep(0.05)
        return Held(
            probe.model("swap_a").placement.gpu_layers,
            {share.device: share.bytes for share in plan.placement.shares},
            {device.id: device.mmd_bytes for device in probe.health().devices},
        )
    finally:
        probe.stop()


def one_not_two(planned: int, counted: int) -> int:
    """A budget that holds one model but not two, given what mmd plans for a model
    and what it counts for a loaded one (after measuring; either may be larger).

    At least the larger, or a load is refused as larger than the whole budget (or
    does not fit after the eviction); less than one counted plus one planned, or
    the second load fits beside the first. Halfway between the two.
    """
    return (max(planned, counted) + planned + counted) // 2


@dataclass
class EventLog:
    """``mmctl events --json`` of a daemon, written by a process of its own to a file
    (a pipe left unread would fill, and a watcher that lags loses events)."""

    process: subprocess.Popen[bytes]
    path: Path

    @classmethod
    def start(cls, daemon: Daemon, path: Path) -> EventLog:
        argv = [*python_bin("mmctl"), "events", "--json", "--no-memory", "--interval", "3600"]
        with path.open("wb") as out:
            process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.DEVNULL, env=daemon.env()
            )
        log = cls(process, path)
        deadline = time.monotonic() + 30
        while not log.events():  # the snapshot: from here on, every event is seen
            if process.poll() is not None or time.monotonic() > deadline:
                log.stop()
                raise RuntimeError("mmctl events did not start")
            time.sleep(0.02)
        return log

    def events(self) -> list[dict[str, Any]]:
        lines = self.path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def evictions(self) -> list[dict[str, Any]]:
        """Models that ended unloaded by an eviction (their stopping state says so too)."""
        return [
            e
            for e in self.events()
            if e.get("type") == "model"
            and e.get("reason") == "evicted"
            and e.get("state") == "unloaded"
        ]

    def wait_for_evictions(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The evictions seen once ``count`` have arrived, or when ``timeout`` is up."""
        deadline = time.monotonic() + timeout
        while len(found := self.evictions()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(10)


def _swap_budget(held: Held, cpu: bool) -> str:
    """A [budget] under which the second model's load must evict the first.

    On the CPU run the GPU budget is 0, so that the placement is the same on
    every machine; on the GPU run only the GPU is limited, so that the RAM a GPU
    child holds besides cannot change the outcome.
    """
    if cpu:
        ram = one_not_two(held.planned.get("ram", 0), held.counted.get("ram", 0))
        return f'[budget]\ngpu = "0"\nram = "{ram}"\n'
    gpu = max(
        one_not_two(held.planned.get(device, 0), held.counted.get(device, 0))
        for device in {*held.planned, *held.counted}
        if device.startswith("gpu")
    )
    return f'[budget]\ngpu = "{gpu}"\n'


def swap_latency(work: Path, runtime: Runtime, sizes: Sizes) -> tuple[list[Figure], Raw]:
    models = {
        name: write_model(work / "models" / f"{name}.gguf", embedding=512, blocks=4, seed=seed)
        for name, seed in (("swap_a", 11), ("swap_b", 12))
    }
    tables = "".join(
        f'[models.{name}]\npath = "{path}"\nctx = {SWAP_CTX}\nparallel = 1\n'
        for name, path in models.items()
    )
    # Where a model goes on this machine without limits: a GPU run as well when it
    # would go to a GPU. The CPU run is on every machine, its GPUs hidden.
    runs = {"CPU": _held(work / "swap-probe-cpu", tables, '[budget]\ngpu = "0"\n', True)}
    on_gpu = _held(work / "swap-probe", tables, "", False)
    if on_gpu.gpu_layers > 0:
        runs["GPU"] = on_gpu
    figures: list[Figure] = []
    raw: Raw = {"model": "embedding 512, 4 blocks", "ctx": SWAP_CTX}
    for label, held in runs.items():
        found, raw[label] = _swap_run(work, runtime, sizes, models, tables, label, held)
        figures += found
    return figures, raw


def _swap_run(
    work: Path,
    runtime: Runtime,
    sizes: Sizes,
    models: dict[str, Path],
    tables: str,
    label: str,
    held: Held,
) -> tuple[list[Figure], Raw]:
    cpu = label == "CPU"
    max_tokens = 4
    budget = _swap_budget(held, cpu)
    root = work / f"swap-{label.lower()}"
    daemon = Daemon(root, tables, budget, cpu_only=cpu).start()
    swap_ms: list[float] = []
    floor_ms: list[float] = []  # start the target directly, request: the floor
    floor_ready_ms: list[float] = []
    floor_swap_ms: list[float] = []  # kill the other one directly first, then the same
    swaps = sizes.swaps + 1  # the first one warms the file cache and the code paths
    sent_unix: list[tuple[float, str, str]] = []  # (when, target, victim) of each measured swap
    events = None
    try:
        current = "swap_a"
        infer_via_stub(daemon.stub, current, max_tokens)
        gpu_layers = daemon.model(current).placement.gpu_layers
        cores = share_of(daemon.model(current))  # one model at a time: the whole budget
        events = EventLog.start(daemon, root / "events.jsonl")

        def direct(name: str) -> DirectServer:
            spec = runtime.spec(
                name,
                models[name],
                root,
                ctx=SWAP_CTX,
                parallel=1,
                layers=gpu_layers,
                cores=cores,
            )
            return DirectServer(runtime, spec, cpu_only=cpu)

        def first_token_ms(server: DirectServer, since: float) -> float:
            with server.client() as client:  # polls, then asks on the same connection
                server.wait_ready(client)
                done = client.completion(completion_body(max_tokens))
            return (done.first_at - since) * 1000

        for i in range(swaps):
            other = current
            target = "swap_b" if current == "swap_a" else "swap_a"
            sent = time.time()  # the daemon stamps its events with the same clock
            _total, first, _tokens = infer_via_stub(daemon.stub, target, max_tokens)
            if i:
                swap_ms.append(first)
                sent_unix.append((sent, target, other))
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
        evicted = events.wait_for_evictions(swaps)
        phases = swap_phases(events.events(), sent_unix, swap_ms)
        loaded = [m.id for m in daemon.health().models]
    finally:
        if events:
            events.stop()
        daemon.stop()
    problems = []
    if len(evicted) < swaps:
        problems.append(f"{len(evicted)} evictions in {swaps} swaps: the budget held both")
    if (gpu_layers > 0) == cpu:
        problems.append(f"mmd placed {gpu_layers} layers on a GPU in the {label} run")
    problem = "; ".join(problems)
    swap, floor = Spread.of(swap_ms), Spread.of(floor_ms)
    # Where mmd's swap goes, from its own events: each phase against the floor's share.
    phase_rows = [
        ("request to the old child stopped (kill, reap)", "stopped", None),
        ("old stopped to the new child started", "started", None),
        ("new child started to ready", "ready", floor_ready_ms),
        (
            "ready to first token",
            "first",
            [f - r for f, r in zip(floor_ms, floor_ready_ms, strict=True)],
        ),
    ]
    phase_figures = [
        Figure(
            "swap",
            f"phase, {label}: {text}",
            "ms",
            Spread.of(phases[key]),
            Spread.of(floor_part) if floor_part else None,
            "-",
            None,
            better="",
            floor_kind="the same phase of the direct floor",
        )
        for text, key, floor_part in phase_rows
        if phases[key]
    ]
    figures = [
        Figure(
            "swap",
            f"first token, evict one + load other, {label}",
            "ms",
            swap,
            floor,
            "ratio <= 1.05",
            swap.median / floor.median <= 1.05,
            problem=problem,
            floor_kind="llama-server started directly, first token",
        ),
        Figure(
            "swap",
            f"same, floor also kills the other, {label}",
            "ms",
            swap,
            Spread.of(floor_swap_ms),
            "-",
            None,
            problem=problem,
            floor_kind="llama-server killed, the other started directly, first token",
        ),
        *phase_figures,
    ]
    raw = {
        "budget": budget,
        "cpu_only_env": CPU_ONLY_ENV if cpu else {},
        "one_model_planned_bytes": held.planned,
        "one_model_counted_bytes": held.counted,
        "gpu_layers": gpu_layers,
        "swaps": swaps,
        "evictions": [
            {"model": e.get("model_id"), "for_model": e.get("for_model")} for e in evicted
        ],
        "loaded_at_end": loaded,
        "swap_first_token_ms": swap_ms,
        "floor_first_token_ms": floor_ms,
        "floor_ready_ms": floor_ready_ms,
        "floor_kill_other_then_start_ms": floor_swap_ms,
        "phases_ms": phases,
    }
    return figures, raw


def swap_phases(
    events: list[dict[str, Any]], sent: list[tuple[float, str, str]], first_ms: list[float]
) -> dict[str, list[float]]:
    """Each measured swap cut into phases by the daemon's model events (ms each): until the
    victim is unloaded, until the target is loading (its child spawned), until it is
    ready, and from ready to the first token the client saw."""
    phases: dict[str, list[float]] = {"stopped": [], "started": [], "ready": [], "first": []}
    for (at, target, victim), first in zip(sent, first_ms, strict=True):

        def when(model_id: str, state: str, at: float = at) -> float | None:
            times = [
                float(e["time"])
                for e in events
                if e.get("type") == "model"
                and e.get("model_id") == model_id
                and e.get("state") == state
                and float(e["time"]) >= at
            ]
            return min(times) if times else None

        stopped, started, ready = (
            when(victim, "unloaded"),
            when(target, "loading"),
            when(target, "ready"),
        )
        if stopped is None or started is None or ready is None:
            continue
        phases["stopped"].append((stopped - at) * 1000)
        phases["started"].append((started - stopped) * 1000)
        phases["ready"].append((ready - started) * 1000)
        phases["first"].append(first - (ready - at) * 1000)
    return phases


# ---------------------------------------------------------------- 4. CLI latency


EACH_LINE_PROMPTS = 20


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
    mmctl, options = python_bin("mmctl"), ["--raw", "--max-tokens", "4"]
    infer = [*mmctl, "infer", "cli0", PROMPT, *options]
    commands: dict[str, tuple[list[str], bool]] = {
        "mmctl ps": ([*mmctl, "ps"], False),
        "mmctl ps, on a terminal": ([*mmctl, "ps"], True),
        "mmctl infer, one-shot": (infer, False),
        # A command of the full CLI (Typer, gRPC), beside the quick ones above.
        "mmctl models": ([*mmctl, "models"], False),
        "python -c pass": ([sys.executable, "-c", "pass"], False),
        # The quick path's own imports (standard library only), and the full CLI's.
        "python -c 'import mmctl.quick'": ([sys.executable, "-c", "import mmctl.quick"], False),
        "python -c 'import mmctl.cli'": ([sys.executable, "-c", "import mmctl.cli"], False),
        # What any Python gRPC client pays before its first call: the floor under mmctl.
        "python -c 'import grpc'": (
            [sys.executable, "-c", "import grpc; from mmd.v1 import mmd_pb2_grpc"],
            False,
        ),
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
        # The same prompts in one mmctl: what a script with many prompts pays per prompt.
        each_line = [*mmctl, "infer", "cli0", "--each-line", *options]
        lines = "".join(f"{PROMPT} {i}\n" for i in range(EACH_LINE_PROMPTS)).encode()
        per_prompt: list[float] = []
        for _ in range(3):
            began = time.perf_counter()
            done = subprocess.run(each_line, input=lines, capture_output=True, env=env, check=True)
            per_prompt.append((time.perf_counter() - began) * 1000 / EACH_LINE_PROMPTS)
            if len(done.stdout.splitlines()) != EACH_LINE_PROMPTS:
                raise RuntimeError(f"mmctl infer --each-line answered: {done.stdout[-300:]!r}")
    finally:
        daemon.stop()
    spread = {name: Spread.of(values) for name, values in times.items()}
    bare = spread["python -c pass"]

    def wall(name: str, target: str = "< 150 ms", limit: float = 150) -> Figure:
        return Figure(
            "cli",
            f"{name} wall time",
            "ms",
            spread[name],
            bare,
            target,
            spread[name].median < limit if target != "-" else None,
            digits=0,
        )

    def start_up(name: str, judged: bool = True) -> Figure:
        """The start-up target: at most 6 interpreter starts (``python -c pass``)."""
        ratio = spread[name].median / bare.median
        return Figure(
            "cli",
            f"{name} / python -c pass",
            "x",
            Spread.of([ratio]),
            None,
            "<= 6x" if judged else "-",
            ratio <= 6 if judged else None,
            digits=1,
        )

    figures = [
        wall("mmctl ps"),
        wall("mmctl ps, on a terminal"),
        wall("mmctl infer, one-shot", "-"),
        start_up("mmctl ps"),
        start_up("mmctl infer, one-shot"),
        wall("mmctl models", "-"),
        start_up("mmctl models", judged=False),
        Figure(
            "cli",
            f"mmctl infer --each-line, per prompt of {EACH_LINE_PROMPTS}",
            "ms",
            Spread.of(per_prompt),
            spread["mmctl infer, one-shot"],
            "-",
            None,
            better="",
            floor_kind="one mmctl infer per prompt",
        ),
        wall("python -c 'import mmctl.quick'", "-"),
        wall("python -c 'import mmctl.cli'", "-"),
        wall("python -c 'import grpc'", "-"),
        start_up("python -c 'import grpc'", judged=False),
    ]
    return figures, {"wall_ms": times, "each_line_ms_per_prompt": per_prompt, "models_loaded": 3}
