"""The llama-server children: what the engine needs of one, how each is launched, and
:class:`Children`, which runs their loads, stops and exits for the engine.

:class:`mmd.runtime.LlamaServer` is the real child; the engine is given a
:data:`ChildFactory` (``LlamaServer`` itself by default) so that it can be driven
with stand-ins that hold no process. Every decision stays the scheduler's: a load or
a stop starts on its effect, and its outcome goes back to the scheduler, whose effects
the engine applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from mmd.config.settings import Config, check_model_file
from mmd.core.effects import Effect
from mmd.core.errors import ConfigError, MmdError, RuntimeFailed
from mmd.core.planner import Placement
from mmd.core.scheduler import Scheduler
from mmd.core.spec import ModelSpec
from mmd.engine.events import EventBus, ModelChanged
from mmd.host import paths
from mmd.runtime.buffers import buffer_sizes
from mmd.runtime.check import LlamaRuntime
from mmd.runtime.cpu import is_sigill, sigill_line
from mmd.runtime.server import LaunchSpec, LlamaBinary

log = logging.getLogger("mmd.engine")


class LoadWatch(Protocol):
    """What the children need of the memory monitor (mmd.engine.monitor.MemoryMonitor is
    one): wait for freed memory before a load, and learn what each child measures. A
    protocol, since the monitor imports :class:`Child` from here."""

    @property
    def learned_runtime(self) -> Path | None: ...

    async def wait_settled(self, placement: Placement) -> None: ...

    def attach_learned(self, model_ids: Sequence[str] | None = None) -> None: ...

    def track(self, model_id: str, spec: ModelSpec, binary: Path, gpu_layers: int) -> None: ...

    def forget(self, model_id: str) -> None: ...


class Child(Protocol):
    """A llama-server child as the engine uses it (see LlamaServer for the contract)."""

    binary: LlamaBinary
    spec: LaunchSpec
    session: aiohttp.ClientSession  # requests to the child, once start() has begun

    @property
    def pid(self) -> int:
        """The process id; 0 before it runs."""
        ...

    async def start(self, timeout: float) -> None:
        """Run the child and wait until it serves; RuntimeFailed (the child stopped) when
        it exits first or is not ready within ``timeout`` seconds."""
        ...

    async def wait(self) -> int:
        """Wait for the child to exit; its exit status (negative: killed by signal)."""
        ...

    async def stop(self, grace: float) -> int | None:
        """End the child (SIGTERM, ``grace`` seconds, then SIGKILL); its exit status."""
        ...


ChildFactory = Callable[[LlamaBinary, LaunchSpec], Child]

# Load stages that are also model state changes (published to watchers).
_STATE_STAGES = frozenset({"loading", "ready", "failed", "unloading", "unloaded"})

# llama-server logs its buffer sizes (model, KV, compute per device) from verbosity 4 on;
# its default, 3, leaves them out. Level 4 adds about 1 KB of log per request (sampler
# settings, prompt-cache state), never the prompt or the generated text.
RUNTIME_LOG_VERBOSITY = 4
# After a child is ready its log is read for those lines, again after these pauses
# while the compute buffer's line (the last one) is missing.
_BUFFER_LOG_RETRIES_S = (0.2, 0.5, 1.0, 2.0)
_BUFFER_LOG_MAX_BYTES = 4 * 1024 * 1024


def launch_flags(options: frozenset[str], gpu_layers: int) -> tuple[bool, int | None]:
    """(``--device none``, ``--verbosity``) for a child with ``gpu_layers`` offloaded, from
    the long options its binary's ``--help`` lists.

    A CPU placement gets no GPU backend at all: with ``-ngl 0`` alone llama-server still
    makes a GPU context (42-82 MiB of VRAM measured on an NVIDIA H200, Vulkan build).
    """
    no_devices = gpu_layers == 0 and "--device" in options
    verbosity = RUNTIME_LOG_VERBOSITY if "--verbosity" in options else None
    return no_devices, verbosity


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    """The text of ``path`` from ``offset`` on (at most _BUFFER_LOG_MAX_BYTES)."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read(_BUFFER_LOG_MAX_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return ""


def describe_exit(status: int, binary: Path) -> str:
    if is_sigill(status):
        return sigill_line(binary)
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"killed by {name} (exit status {status})"
    return f"exited with status {status}"


def model_file_problem(spec: ModelSpec) -> str | None:
    """Why ``spec``'s file cannot be loaded now, in a load failure's words, or None."""
    try:
        check_model_file(spec.path, f"model {spec.id!r}")
    except ConfigError as err:
        return str(err)
    return None


@dataclass(frozen=True)
class LoadStage:
    stage: str
    message: str


class Children:
    """The running children by model id, and the loads and stops under way.

    ``apply`` hands the scheduler's answers (load done, stopped, crashed) back to the
    engine; ``spawn`` runs a task that the engine waits for at its close.
    """

    def __init__(
        self,
        core: Scheduler,
        runtime: LlamaRuntime,
        monitor: LoadWatch,
        events: EventBus,
        servers: dict[str, Child],
        runtime_dir: Path,
        factory: ChildFactory,
        *,
        config: Callable[[], Config],
        clock: Callable[[], float],
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
        apply: Callable[[Sequence[Effect]], None],
    ) -> None:
        self.core = core
        self.runtime = runtime
        self.monitor = monitor
        self.events = events
        self.servers = servers
        self.runtime_dir = runtime_dir
        self._factory = factory
        self._config = config
        self._now = clock
        self._spawn = spawn
        self._apply = apply
        self.load_tasks: dict[str, asyncio.Task[None]] = {}
        self.stops: dict[str, asyncio.Event] = {}  # set once the model's stop is over
        self.progress: dict[str, list[asyncio.Queue[LoadStage]]] = {}  # load stage listeners

    def start_load(
        self,
        model_id: str,
        placement: Placement,
        after: tuple[str, ...],
        replaced: tuple[str, ...] = (),
    ) -> None:
        self.load_tasks[model_id] = self._spawn(
            self._run_load(model_id, placement, after, replaced)
        )

    def stop(self, model_id: str, reason: str, beneficiary: str, at_once: bool) -> None:
        self.stops[model_id] = asyncio.Event()
        grace = 0.0 if at_once else self._config().daemon.stop_grace
        self._spawn(self._run_stop(model_id, reason, beneficiary, grace))

    def cancel_loads(self) -> None:
        for task in list(self.load_tasks.values()):
            task.cancel()

    async def stop_all(self) -> None:
        """Stop whatever still runs (the daemon's exit)."""
        for server in list(self.servers.values()):
            await server.stop(self._config().daemon.stop_grace)
        self.servers.clear()

    def notify(self, model_id: str, stage: str, message: str, beneficiary: str = "") -> None:
        """Report a load stage to waiting clients and a state change to watchers.

        ``beneficiary``: with an eviction's stages, the model it makes room for.
        """
        text = f"{message} for {beneficiary}" if beneficiary else message
        log.info("%s: %s %s", model_id, stage, text)
        for queue in self.progress.get(model_id, []):
            queue.put_nowait(LoadStage(stage, text))
        if stage in _STATE_STAGES:
            reason = message
            if stage in ("loading", "ready"):
                reason, beneficiary = "load", ""
            detail = message if stage == "failed" else ""
            if stage == "failed":
                reason = "load failed"
            self.events.publish(ModelChanged(model_id, stage, reason, beneficiary, detail))

    async def _run_load(
        self,
        model_id: str,
        placement: Placement,
        after: tuple[str, ...],
        replaced: tuple[str, ...],
    ) -> None:
        entry = self.core.models[model_id]
        try:
            if after:
                self.notify(model_id, "evicting", ", ".join(after))
            if replaced:
                self.notify(model_id, "re-placing", f"{', '.join(replaced)} on fewer cores")
            for victim in (*after, *replaced):
                event = self.stops.get(victim)
                if event:
                    await event.wait()
            if after:
                await self.monitor.wait_settled(placement)
            try:
                check_model_file(entry.spec.path, f"model {model_id!r}")
            except ConfigError as err:
                raise RuntimeFailed(str(err)) from None
            binary = await self.runtime.ready()
            if binary.path != self.monitor.learned_runtime:
                self.monitor.attach_learned()  # the figures learned with this binary
            server = self._factory(binary, self.launch_spec(entry.spec, placement))
            self.servers[model_id] = server
            self.notify(model_id, "loading", f"{placement.kind}, {placement.gpu_layers} GPU layers")
            log_start = _log_size(server.spec.log_path)
            self.monitor.track(model_id, entry.spec, binary.path, placement.gpu_layers)
            await server.start(self._config().daemon.load_timeout)
        except MmdError as err:
            self.servers.pop(model_id, None)
            self.monitor.forget(model_id)
            self.notify(model_id, "failed", err.message)
            self._apply(self.core.load_done(model_id, self._now(), err))
            return
        finally:
            self.load_tasks.pop(model_id, None)
        self.notify(model_id, "ready", f"pid {server.pid}")
        self._spawn(self._watch(model_id, server))
        self._spawn(self._read_buffer_sizes(model_id, server, log_start))
        # The new child is measured by the next sample (within a second), not now: reading
        # its PSS takes milliseconds of CPU that its first request's prompt needs more.
        self._apply(self.core.load_done(model_id, self._now()))

    def launch_spec(self, spec: ModelSpec, placement: Placement) -> LaunchSpec:
        gpus = sorted(d.id for d in self.core.devices if d.kind == "gpu")
        split: tuple[float, ...] = ()
        if len(gpus) > 1 and placement.gpu_layers:
            split = tuple(float(placement.layers.get(g, 0)) for g in gpus)
        layers = placement.gpu_layers
        no_devices, verbosity = launch_flags(self.runtime.options, layers)
        if layers and layers >= len(self.core.models[spec.id].footprint.layer_bytes):
            layers += 1  # llama.cpp counts the output layer as one more to offload
        return LaunchSpec(
            model_id=spec.id,
            model_path=spec.path,
            socket=paths.child_socket(self.runtime_dir, spec.id),
            log_path=paths.model_log(self._config().daemon.log_dir, spec.id),
            ctx=spec.ctx,
            parallel=spec.parallel,
            gpu_layers=layers,
            tensor_split=split,
            embedding=spec.embedding,
            extra_args=spec.args,
            supports_fit="--fit" in self.runtime.options,
            supports_cache_ram="--cache-ram" in self.runtime.options,
            no_devices=no_devices,
            log_verbosity=verbosity,
            cores=self.core.models[spec.id].cores,
        )

    async def _run_stop(self, model_id: str, reason: str, beneficiary: str, grace: float) -> None:
        event = self.stops[model_id]
        try:
            load = self.load_tasks.pop(model_id, None)
            if load and not load.done():
                load.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await load
            server = self.servers.pop(model_id, None)
            self.monitor.forget(model_id)
            self.notify(model_id, "unloading", reason, beneficiary)
            if server:
                await server.stop(grace)
            self.notify(model_id, "unloaded", reason, beneficiary)
            self._apply(self.core.stopped(model_id, self._now()))
        finally:
            event.set()

    async def _watch(self, model_id: str, server: Child) -> None:
        status = await server.wait()
        if self.servers.get(model_id) is not server:
            return  # a stop mmd asked for
        self.servers.pop(model_id, None)
        self.monitor.forget(model_id)
        description = describe_exit(status, server.binary.path)
        log.error("model %s: llama-server %s", model_id, description)
        self.events.publish(ModelChanged(model_id, "failed", "crashed", detail=description))
        await server.stop(0.1)
        self._apply(self.core.crashed(model_id, self._now(), description))

    async def _read_buffer_sizes(self, model_id: str, server: Child, offset: int) -> None:
        """Read the buffer sizes the ready child logged (from ``offset``, where its start
        is in the log) and keep them per device next to the estimate and the measurement."""
        sizes: dict[str, dict[str, int]] = {}
        for pause in (0.0, *_BUFFER_LOG_RETRIES_S):
            await asyncio.sleep(pause)
            if self.servers.get(model_id) is not server:
                return
            text = await asyncio.to_thread(_read_from, server.spec.log_path, offset)
            sizes = buffer_sizes(text)
            if any("compute" in kinds for kinds in sizes.values()):
                break
        if sizes and self.servers.get(model_id) is server:
            self.core.set_runtime(model_id, {d: sum(k.values()) for d, k in sizes.items()})

    async def crash_error(self, model_id: str, server: Child) -> MmdError | None:
        """When a stream broke because the child died, an error that says how it died."""
        try:
            status = await asyncio.wait_for(asyncio.shield(server.wait()), 1.0)
        except TimeoutError:
            return None
        return RuntimeFailed(
            f"model {model_id!r} crashed: {describe_exit(status, server.binary.path)}"
        )
