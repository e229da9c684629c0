"""Shared parts of the benchmarks: a real mmd daemon, a directly started llama-server
(the floor, with the argv mmd would use), direct requests, statistics and figures."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from rawhttp import RawClient
from verdicts import Better, Verdict, peer_verdict, verdict

# The daemon process is shared with the tests: tests/ holds its module.
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
import daemon_proc

from mmd.core.cores import CoreShare
from mmd.engine.children import launch_flags
from mmd.runtime.server import (
    LaunchSpec,
    LlamaBinary,
    build_argv,
    probe_binary,
    resolve_llama_server,
)
from mmd.runtime.upstream import InferParams, _completion_body
from mmd.v1 import mmd_pb2 as pb
from mmd.v1 import mmd_pb2_grpc

PROMPT = "The quick brown fox jumps over the lazy dog."
START_TIMEOUT_S = 60.0
# A benchmark that means CPU placement says so. CUDA_VISIBLE_DEVICES="" hides every
# NVIDIA GPU from mmd's budget and from CUDA children; a Vulkan llama-server (the
# bundled one) reads GGML_VK_VISIBLE_DEVICES instead, and without it a CPU child
# still opens a context on the GPU. Its config also sets [budget] gpu = "0".
CPU_ONLY_ENV = {"CUDA_VISIBLE_DEVICES": "", "GGML_VK_VISIBLE_DEVICES": ""}

# llama-server's flags for threads, placement, polling and priority: what a CPU-core
# policy in mmd sets, and what "llama-server's defaults" leaves out.
CPU_FLAGS_WITH_VALUE = frozenset(
    {
        "-t", "--threads", "-tb", "--threads-batch", "-C", "--cpu-mask", "-Cr", "--cpu-range",
        "--cpu-strict", "--prio", "--poll", "-Cb", "--cpu-mask-batch", "-Crb",
        "--cpu-range-batch", "--cpu-strict-batch", "--prio-batch", "--poll-batch",
    }
)  # fmt: skip


def without_cpu_flags(argv: list[str]) -> list[str]:
    """``argv`` less its thread, affinity, polling and priority flags (and their values)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in CPU_FLAGS_WITH_VALUE:
            skip = True
        elif arg.split("=", 1)[0] not in CPU_FLAGS_WITH_VALUE:
            out.append(arg)
    return out


# ---------------------------------------------------------------- statistics and figures


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Spread:
    """Median and spread of repeated measurements."""

    median: float
    low: float  # p5, or the minimum for few samples
    high: float  # p95, or the maximum
    n: int
    kind: str  # "p5-p95" or "min-max"

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if len(values) >= 20:
            return cls(
                percentile(values, 50),
                percentile(values, 5),
                percentile(values, 95),
                len(values),
                "p5-p95",
            )
        return cls(percentile(values, 50), min(values), max(values), len(values), "min-max")

    def text(self, digits: int = 1) -> str:
        if self.n == 1:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} [{self.low:.{digits}f}-{self.high:.{digits}f}]"


@dataclass
class Figure:
    """One row of the results table: a measurement of mmd against its floor."""

    benchmark: str
    metric: str
    unit: str
    mmd: Spread
    floor: Spread | None
    target: str
    passed: bool | None  # the target compared; None: informational
    ratio: float | None = None  # mmd / floor unless given
    digits: int = 1
    note: str = ""
    better: Better = "lower"  # which way the ratio should go ("": the floor is no bound)
    added: bool = False  # the mmd value is what mmd adds to its floor: never below 0
    problem: str = ""  # why the benchmark's floor did not hold, found by the benchmark
    floor_kind: str = ""  # what the floor is, where the metric does not say
    peer: bool = False  # the "floor" is a peer tool, not a bound: ahead / level / behind

    def __post_init__(self) -> None:
        if self.ratio is None and self.floor is not None and self.floor.median:
            self.ratio = self.mmd.median / self.floor.median

    def judged(self) -> tuple[Verdict, str]:
        """(met / missed / info / floor invalid, why the floor is invalid); against a peer,
        (ahead / level / behind, or info with why)."""
        if self.peer:
            return peer_verdict(self.ratio, self.better, problem=self.problem)
        return verdict(
            self.passed,
            ratio=self.ratio,
            better=self.better,
            added=self.mmd.median if self.added else None,
            problem=self.problem,
        )

    def as_dict(self) -> dict[str, Any]:
        judged, why = self.judged()
        return {
            "benchmark": self.benchmark,
            "metric": self.metric,
            "unit": self.unit,
            "mmd": vars(self.mmd),
            "floor": vars(self.floor) if self.floor else None,
            "floor_kind": self.floor_kind,
            "ratio": self.ratio,
            "target": self.target,
            "target_met": self.passed,
            "verdict": judged,
            "verdict_reason": why,
            "note": self.note,
        }


# ---------------------------------------------------------------- processes


def python_bin(name: str) -> list[str]:
    """argv for a console script installed next to this interpreter (else ``-m``)."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", name]


def timed_run(
    argv: list[str], env: dict[str, str] | None = None, terminal: bool = False
) -> tuple[float, str]:
    """Wall time (ms) of a command and its stdout; raises when it fails.

    With `terminal`, stdout is a pseudo-terminal, as when a person runs the command.
    """
    if terminal:
        elapsed, returncode, stdout, stderr = _run_on_a_terminal(argv, env)
    else:
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, env=env, timeout=120, check=False)
        elapsed = (time.perf_counter() - start) * 1000
        returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
    if returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} failed: {stderr.decode()[-500:]}")
    return elapsed, stdout.decode(errors="replace")


def _run_on_a_terminal(
    argv: list[str], env: dict[str, str] | None
) -> tuple[float, int, bytes, bytes]:
    """(wall ms, exit status, stdout, stderr) with stdout on a pseudo-terminal."""
    master, slave = pty.openpty()
    try:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=slave, stderr=subprocess.PIPE, env=env)
        os.close(slave)
        chunks = []
        with contextlib.suppress(OSError):  # EIO once the child has closed the terminal
            while chunk := os.read(master, 65536):
                chunks.append(chunk)
        returncode = proc.wait(timeout=120)
        elapsed = (time.perf_counter() - start) * 1000
        stderr = proc.stderr.read() if proc.stderr else b""
    finally:
        os.close(master)
    return elapsed, returncode, b"".join(chunks), stderr


class Daemon(daemon_proc.Daemon):
    """A real mmd process in a directory of its own (tests/daemon_proc.py, shared with the
    tests), with timeouts for a loaded machine: its config is ``settings_toml`` (tables
    other than [daemon] and [models]) and then ``models_toml``."""

    def __init__(
        self, root: Path, models_toml: str, settings_toml: str = "", *, cpu_only: bool = False
    ) -> None:
        super().__init__(
            root,
            settings_toml + "\n" + models_toml,
            # Hide GPUs (CPU_ONLY_ENV); the caller's config sets gpu = "0".
            extra_env=dict(CPU_ONLY_ENV) if cpu_only else {},
            load_timeout="60s",
            stop_grace="5s",
            drain_timeout="2s",
            start_timeout=START_TIMEOUT_S,
            poll_s=0.005,
            cpus=None,  # the benchmarks measure mmd's own CPU budget
        )


def infer_via_stub(
    stub: mmd_pb2_grpc.ModelManagerStub, model_id: str, max_tokens: int, prompt: str = PROMPT
) -> tuple[float, float, int]:
    """(total ms, first-token ms, completion tokens) of one Infer through mmd.

    raw: the prompt as it is, as the floor sends it to llama-server's /completion."""
    request = pb.InferRequest(model_id=model_id, prompt=prompt, max_tokens=max_tokens, raw=True)
    start = time.perf_counter()
    first = 0.0
    tokens = 0
    for chunk in stub.Infer(request, timeout=120):
        if chunk.HasField("done"):
            tokens = chunk.done.completion_tokens
        elif not first:
            first = time.perf_counter()
    end = time.perf_counter()
    return (end - start) * 1000, (first - start) * 1000 if first else 0.0, tokens


def infer_via_lines(
    lines_socket: Path, model_id: str, max_tokens: int, prompt: str = PROMPT
) -> tuple[float, float, int]:
    """(total ms, first-token ms, completion tokens) of one inference over mmd's JSON Lines
    socket: a connection of its own, as the protocol has it (and as mmctl does)."""
    request = {"call": "infer", "model": model_id, "prompt": prompt}
    request |= {"max_tokens": max_tokens, "raw": True}
    start = time.perf_counter()
    first = 0.0
    tokens = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(120)
        conn.connect(str(lines_socket))
        conn.sendall(json.dumps(request).encode() + b"\n")
        with conn.makefile("rb") as answer:
            for line in answer:
                message = json.loads(line)
                if "done" in message:
                    tokens = message["done"]["completion_tokens"]
                elif "error" in message:
                    raise RuntimeError(f"mmd answered: {message['error']}")
                elif "text" in message and not first:
                    first = time.perf_counter()
    end = time.perf_counter()
    return (end - start) * 1000, (first - start) * 1000 if first else 0.0, tokens


# ---------------------------------------------------------------- the floor: llama-server alone


def completion_body(max_tokens: int, prompt: str = PROMPT) -> dict[str, Any]:
    """The exact body mmd sends to llama-server for a plain prompt."""
    return _completion_body(InferParams(prompt=prompt, max_tokens=max_tokens))


def infer_direct(client: RawClient, max_tokens: int) -> tuple[float, float, int]:
    """(total ms, first-token ms, tokens) of the same request sent straight to llama-server."""
    done = client.completion(completion_body(max_tokens))
    return done.total_ms, done.first_ms, done.tokens


@dataclass
class Runtime:
    """The llama-server binary exactly as mmd resolves and probes it."""

    binary: LlamaBinary
    version: str
    options: frozenset[str]

    @classmethod
    def resolve(cls) -> Runtime:
        binary = resolve_llama_server(None)
        version, options = probe_binary(binary)
        return cls(binary, version, options)

    def spec(
        self,
        model_id: str,
        path: Path,
        workdir: Path,
        *,
        ctx: int,
        parallel: int,
        layers: int = 0,
        cores: CoreShare | None = None,
    ) -> LaunchSpec:
        no_devices, verbosity = launch_flags(self.options, layers)
        return LaunchSpec(
            model_id=model_id,
            model_path=path,
            socket=workdir / f"{model_id}-{time.monotonic_ns()}.sock",
            log_path=workdir / f"{model_id}.log",
            ctx=ctx,
            parallel=parallel,
            gpu_layers=layers,
            supports_fit="--fit" in self.options,
            supports_cache_ram="--cache-ram" in self.options,
            no_devices=no_devices,
            log_verbosity=verbosity,
            cores=cores,
        )


def share_of(model: pb.Model) -> CoreShare | None:
    """The cores and threads mmd gave a loaded model's child, so that a floor started
    "with mmd's argv" runs on the same cores with the same threads."""
    if not model.HasField("cores") or model.cores.threads == 0:
        return None  # its args chose its threads, or it is not on the CPU
    return CoreShare(tuple(model.cores.cpus), model.cores.threads, tuple(model.cores.shared_with))


@dataclass
class DirectServer:
    """llama-server started with mmd's argv, without mmd."""

    runtime: Runtime
    spec: LaunchSpec
    cpu_only: bool = False  # the environment a cpu_only Daemon gives its children
    # llama-server's own defaults for threads and placement: mmd's argv without the
    # flags a CPU-core policy would add (the peer mmd's policy is measured against).
    cpu_defaults: bool = False
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready_at: float = 0.0
    argv: list[str] = field(default_factory=list)

    def spawn(self) -> None:
        self.argv = build_argv(self.runtime.binary.path, self.spec)
        if self.cpu_defaults:
            self.argv = without_cpu_flags(self.argv)
        env = dict(self.runtime.binary.env)
        if self.cpu_only:
            env.update(CPU_ONLY_ENV)
        with self.spec.log_path.open("ab") as log:
            self.started_at = time.perf_counter()
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        if self.spec.cores is not None and not self.cpu_defaults:
            # As mmd does for its child: the whole process on its share, before its threads start.
            with contextlib.suppress(OSError):
                os.sched_setaffinity(self.process.pid, self.spec.cores.cpus)

    def wait_ready(self, client: RawClient, poll_s: float = 0.005) -> None:
        """Poll /health until 200, as mmd does (every 5 ms)."""
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited {self.process.returncode}")
            if self.spec.socket.exists():
                with contextlib.suppress(OSError):
                    if client.status("/health") == 200:
                        self.ready_at = time.perf_counter()
                        return
            time.sleep(poll_s)
        raise RuntimeError("llama-server was not ready in time")

    def start(self) -> DirectServer:
        self.spawn()
        with self.client() as client:
            self.wait_ready(client)
        return self

    def client(self) -> RawClient:
        return RawClient(self.spec.socket)

    def kill(self) -> None:
        """SIGKILL and reap, as mmd stops an idle model it evicts."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        with contextlib.suppress(FileNotFoundError):
            self.spec.socket.unlink()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        with contextlib.suppress(FileNotFoundError):
            self.spec.socket.unlink()


def child_argv_matches(pid: int, floor_argv: list[str]) -> bool:
    """Whether mmd's child runs the floor's argv (ignoring the socket and the pdeathsig wrapper)."""
    try:
        argv = psutil.Process(pid).cmdline()
    except psutil.Error:
        return False
    if "--" in argv:
        argv = argv[argv.index("--") + 1 :]

    def normalised(args: list[str]) -> list[str]:
        out = list(args)
        for flag in ("--host", "--alias"):
            if flag in out:
                out[out.index(flag) + 1] = "*"
        return out

    return normalised(argv) == normalised(floor_argv)
