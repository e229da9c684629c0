"""Verify before trust: prove that a llama-server binary loads and runs a model here.

A prebuilt llama-server compiled for another CPU (AVX-512 kernels in a CPU backend
without run-time dispatch, say) starts, prints its help, and then dies with SIGILL on
the first model it loads. So before a binary serves, mmd has it load a tiny synthetic
model and generate two tokens. The verdict is cached in ``state_dir`` per binary
identity (path, size, mtime) and CPU flags, so a daemon start with a known binary costs
a file read; a new binary is checked once (~0.3 s) in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

from mmd.core.errors import MmdError, RuntimeFailed
from mmd.host.learned import write_atomically
from mmd.runtime.cpu import cpu_flags, is_sigill, sigill_line
from mmd.runtime.server import LaunchSpec, LlamaBinary, LlamaServer, probe_binary

log = logging.getLogger("mmd")

CACHE_FILE = "runtime-checks.json"
# Bumped when the check itself changes, so that old verdicts are not trusted.
_CHECK_VERSION = 1
_CHECK_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Verdict:
    """What the check found for one binary on this machine."""

    ok: bool
    detail: str  # the version line when ok, else the one-line reason
    options: tuple[str, ...] = ()  # the long options its --help lists
    seconds: float = 0.0


def _identity(binary: LlamaBinary, flags: frozenset[str]) -> str:
    """The binary, the libraries beside it (the CPU backend is one of them) and the CPU."""
    files = [binary.path, *sorted(binary.path.parent.glob("lib*.so*"))]
    stats = ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    digest = hashlib.sha256(f"{stats}|{' '.join(sorted(flags))}".encode()).hexdigest()[:24]
    return f"v{_CHECK_VERSION}:{binary.path}:{digest}"


class VerdictCache:
    """Good verdicts by binary identity, in one small JSON file under the state directory.

    Only a binary that passed is remembered: a failure may come from something outside
    the binary (a missing library, a full disk) that gets fixed, so it is checked again.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / CACHE_FILE

    def _read(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, binary: LlamaBinary, flags: frozenset[str]) -> Verdict | None:
        try:
            key = _identity(binary, flags)
        except OSError:
            return None
        entry = self._read().get(key)
        if not isinstance(entry, dict):
            return None
        try:
            return Verdict(
                ok=bool(entry["ok"]),
                detail=str(entry["detail"]),
                options=tuple(str(o) for o in entry["options"]),  # type: ignore[attr-defined]
                seconds=float(entry["seconds"]),  # type: ignore[arg-type]
            )
        except (KeyError, TypeError, ValueError):
            return None

    def put(self, binary: LlamaBinary, flags: frozenset[str], verdict: Verdict) -> bool:
        """Best effort: a state directory that cannot be written only costs a re-check."""
        if not verdict.ok:
            return True
        try:
            key = _identity(binary, flags)
            entries = self._read()
            entries[key] = asdict(verdict)
            write_atomically(self.path, json.dumps(entries, indent=1, sort_keys=True))
        except OSError:
            return False
        return True


def _check_model(directory: Path) -> Path:
    from mmd.runtime.synthetic import write_model  # numpy and gguf: only when a check runs

    return write_model(directory / "check.gguf", embedding=32, blocks=1, heads=2, kv_heads=2)


async def check_binary(binary: LlamaBinary, flags: frozenset[str] | None = None) -> Verdict:
    """Load a tiny synthetic model with ``binary`` and generate two tokens.

    Never raises for a broken binary: the verdict says what went wrong, in one line.
    """
    started = time.monotonic()
    flags = cpu_flags() if flags is None else flags
    try:
        version, options = await asyncio.to_thread(probe_binary, binary)
    except MmdError as err:
        return Verdict(False, err.message, (), time.monotonic() - started)
    # A short private directory: the child's socket path must fit in sun_path.
    work = Path(tempfile.mkdtemp(prefix="mmd-check-"))
    server = LlamaServer(
        binary,
        LaunchSpec(
            model_id="mmd-check",
            model_path=_check_model(work),
            socket=work / "check.sock",  # llama-server binds a Unix socket by its suffix
            log_path=work / "check.log",
            ctx=128,
            parallel=1,
            gpu_layers=0,
            supports_fit="--fit" in options,
        ),
    )
    try:
        detail = await _load_and_generate(server, flags)
    finally:
        with contextlib.suppress(Exception):
            await server.stop(grace=1.0)
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.monotonic() - started
    ok = detail is None
    return Verdict(ok, version if ok else str(detail), tuple(sorted(options)), seconds)


async def _load_and_generate(server: LlamaServer, flags: frozenset[str]) -> str | None:
    """None when the child loaded the model and answered; else the reason in one line."""
    path = server.binary.path
    try:
        await server.start(_CHECK_TIMEOUT_S)
        async with server.session.post(
            "/completion", json={"prompt": "hi", "n_predict": 2, "cache_prompt": False}
        ) as response:
            text = await response.text(errors="replace")
        if response.status != 200:
            return f"llama-server {path} loads a model but fails to generate: {text}"
        return None
    except RuntimeFailed as err:
        if is_sigill(server.returncode):
            return sigill_line(path, flags)
        return f"llama-server {path} cannot load a model: {err.message}"
    except aiohttp.ClientError as err:
        # The child may have died mid-generation: the first kernel that needs a missing
        # instruction runs then, not at load.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait(), 1.0)
        if is_sigill(server.returncode):
            return sigill_line(path, flags)
        return f"llama-server {path} loads a model but fails to generate: {err!r}"


def failure_line(rejected: list[str] | tuple[str, ...]) -> str:
    """Why no candidate can be used, in one line: the first one's reason, and how many more
    failed."""
    if not rejected:
        return "no llama-server was checked"
    others = len(rejected) - 1
    return rejected[0] if not others else f"{rejected[0]} ({others} other candidates fail too)"


@dataclass(frozen=True)
class Choice:
    """The first candidate that passed (None when none did) and why the earlier ones
    were passed over."""

    binary: LlamaBinary | None
    verdict: Verdict | None
    rejected: tuple[str, ...]


async def choose(
    candidates: list[LlamaBinary],
    cache: VerdictCache,
    flags: frozenset[str] | None = None,
    *,
    record: bool = True,
) -> Choice:
    """Walk the candidates as the daemon does: a cached good verdict counts, else the check
    runs (its verdict kept in the cache when ``record``). For doctor and --check-config."""
    flags = cpu_flags() if flags is None else flags
    rejected: list[str] = []
    for candidate in candidates:
        verdict = cache.get(candidate, flags)
        if verdict is None:
            verdict = await check_binary(candidate, flags)
            if record:
                cache.put(candidate, flags, verdict)
        if verdict.ok:
            return Choice(candidate, verdict, tuple(rejected))
        rejected.append(verdict.detail)
    return Choice(None, None, tuple(rejected))


class LlamaRuntime:
    """The llama-server that children run: the first candidate proven to work here.

    ``start`` picks at once when every verdict it needs is cached; otherwise the checks
    run in the background, so serving (and READY=1) never waits for them, and a load
    waits in ``ready`` instead. Only an automatic choice falls back to the next
    candidate; an explicit one that fails stays an error that every load reports.
    """

    def __init__(
        self,
        candidates: list[LlamaBinary],
        cache: VerdictCache,
        flags: frozenset[str] | None = None,
    ) -> None:
        self.candidates = candidates  # an explicit choice is the only one: no fallback
        self.cache = cache
        self.flags = cpu_flags() if flags is None else flags
        self.binary = candidates[0]  # until a check says otherwise
        self.verdict: Verdict | None = None
        self.rejected: list[str] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def options(self) -> frozenset[str]:
        return frozenset(self.verdict.options) if self.verdict else frozenset()

    @property
    def checking(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        for index, candidate in enumerate(self.candidates):
            verdict = self.cache.get(candidate, self.flags)
            if verdict is None:
                self._task = asyncio.get_running_loop().create_task(self._check_from(index))
                return
            if self._judge(candidate, verdict, cached=True):
                return

    async def _check_from(self, first: int) -> None:
        for candidate in self.candidates[first:]:
            verdict = self.cache.get(candidate, self.flags)
            cached = verdict is not None
            if verdict is None:
                log.info("checking llama-server %s (%s) on this machine", *_named(candidate))
                try:
                    verdict = await check_binary(candidate, self.flags)
                except Exception as err:  # a check must never take the daemon down
                    verdict = Verdict(
                        False, f"llama-server {candidate.path}: check failed: {err!r}"
                    )
                if not self.cache.put(candidate, self.flags, verdict):
                    log.warning("cannot record the llama-server check in %s", self.cache.path)
            if self._judge(candidate, verdict, cached=cached):
                return

    def _judge(self, candidate: LlamaBinary, verdict: Verdict, *, cached: bool) -> bool:
        """Take ``candidate`` if its verdict is good; log either way."""
        how = "verdict cached" if cached else f"checked in {verdict.seconds:.2f}s"
        if verdict.ok:
            self.binary, self.verdict = candidate, verdict
            if self.rejected:
                log.warning("falling back to llama-server %s (%s)", *_named(candidate))
            log.info("llama-server: %s (%s, %s; %s)", *_named(candidate), verdict.detail, how)
            return True
        self.rejected.append(verdict.detail)
        log.error("%s (%s)", verdict.detail, how)
        return False

    def describe(self) -> str:
        """For health: the binary, how it was found, and where its check stands."""
        where = f"{self.binary.path} ({self.binary.source})"
        if self.verdict is not None:
            return f"{where}, {self.verdict.detail or 'checked'}"
        if self.checking:
            return f"{where}, being checked"
        return f"none works: {self.failure()}"

    def failure(self) -> str:
        """Why no llama-server can be used, in one line."""
        return failure_line(self.rejected)

    async def ready(self) -> LlamaBinary:
        """The proven binary, once the checks are over; RuntimeFailed when none works."""
        if self._task is not None:
            await asyncio.shield(self._task)
        if self.verdict is None:
            raise RuntimeFailed(self.failure())
        return self.binary

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _named(binary: LlamaBinary) -> tuple[str, str]:
    return str(binary.path), binary.source
