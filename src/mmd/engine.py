"""The engine: executes the scheduler's effects with real processes and memory readings.

It owns the llama-server children, the futures that requests wait on, the timers
and the background tasks; every decision is the scheduler's (mmd.scheduler).
All of it runs on the event-loop thread, so no locks are needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmd import paths
from mmd.budget import DeviceBudgetView, alert_crossings, compute_budgets
from mmd.buffers import buffer_sizes
from mmd.children import Child, ChildFactory
from mmd.config import Config, ModelSpec, check_model_file
from mmd.cpu import is_sigill, sigill_line
from mmd.errors import ConfigError, MmdError, RuntimeFailed, StillBusy
from mmd.events import AlertCrossed, EventBus, MemorySampled, ModelChanged, RequestFinished
from mmd.footprint import Footprint, LearnedBytes, footprint_for, has_chat_template
from mmd.learned import LearnedStore, ModelIdentity, model_identity
from mmd.memory import RAM_ID, MemoryReader, MemorySnapshot, ProcessMemory
from mmd.planner import Placement, Plan, Refusal
from mmd.reload import ConfigDiff, diff_configs, keep_restart_settings
from mmd.runtime import LaunchSpec, LlamaServer, read_log_tail
from mmd.runtime_check import LlamaRuntime
from mmd.scheduler import (
    AbortRunning,
    Admit,
    ArmTimer,
    Effect,
    Fail,
    Kind,
    LoadFailed,
    ModelEntry,
    Scheduler,
    StartLoad,
    State,
    Stop,
)
from mmd.upstream import Final, InferParams, embed, relay, stream_infer

log = logging.getLogger("mmd.engine")

# Load stages that are also model state changes (published to watchers).
_STATE_STAGES = frozenset({"loading", "ready", "failed", "unloading", "unloaded"})

# How long to wait for freed memory to show as free after an eviction.
_SETTLE_TIMEOUT_S = 5.0
_SETTLE_POLL_S = 0.01

# llama-server logs its buffer sizes (model, KV, compute per device) from verbosity 4 on;
# its default, 3, leaves them out. Level 4 adds about 1 KB of log per request (sampler
# settings, prompt-cache state), never the prompt or the generated text.
RUNTIME_LOG_VERBOSITY = 4
# After a child is ready its log is read for those lines, again after these pauses
# while the compute buffer's line (the last one) is missing.
_BUFFER_LOG_RETRIES_S = (0.2, 0.5, 1.0, 2.0)
_BUFFER_LOG_MAX_BYTES = 4 * 1024 * 1024


def _model_file_problem(spec: ModelSpec) -> str | None:
    """Why ``spec``'s file cannot be loaded now, in a load failure's words, or None."""
    try:
        check_model_file(spec.path, f"model {spec.id!r}")
    except ConfigError as err:
        return str(err)
    return None


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


@dataclass
class RequestRecord:
    """Times (loop clock) and totals of one request, for its reply and its event."""

    arrived: float
    admitted: float = 0.0
    load_ms: float = 0.0
    first_token: float = 0.0
    prompt_tokens: int = 0
    final: Final | None = None


@dataclass(frozen=True)
class LoadStage:
    stage: str
    message: str


@dataclass(frozen=True)
class AlreadyLoaded:
    """A plan's answer for a model that is loaded or loading: where it is."""

    placement: Placement | None


class Engine:
    def __init__(
        self,
        config: Config,
        runtime: LlamaRuntime,
        probe: MemoryReader,
        runtime_dir: Path,
        footprints: dict[str, Footprint] | None = None,
        *,
        child_factory: ChildFactory = LlamaServer,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """``child_factory`` makes each llama-server child; ``clock`` is the scheduler's
        time in seconds (the event loop's by default: timers are armed on it)."""
        self.config = config
        self.runtime = runtime
        self.probe = probe
        self.runtime_dir = runtime_dir
        self._child_factory = child_factory
        footprints = footprints or {m: footprint_for(s) for m, s in config.models.items()}
        self.core = Scheduler(
            config.scheduler, {m: (s, footprints[m]) for m, s in config.models.items()}
        )
        self.core.file_problem = _model_file_problem
        self.loop = asyncio.get_running_loop()
        self._clock = clock or self.loop.time
        self.waiters: dict[int, asyncio.Future[None]] = {}
        self.servers: dict[str, Child] = {}
        self.running: dict[int, str] = {}  # ticket -> model id
        self.aborts: dict[int, MmdError] = {}
        self.load_tasks: dict[str, asyncio.Task[None]] = {}
        self.stops: dict[str, asyncio.Event] = {}
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.progress: dict[str, list[asyncio.Queue[LoadStage]]] = {}
        self.budgets: list[DeviceBudgetView] = []
        self.events = EventBus()
        self._children_usage: dict[str, dict[str, int]] = {}  # model -> device -> bytes
        self._above_alert: set[str] = set()
        self.snapshot: MemorySnapshot | None = None
        self.started = time.time()
        self._background: set[asyncio.Task[Any]] = set()
        self._sampler: asyncio.Task[None] | None = None
        self.learned = LearnedStore(config.daemon.state_dir)
        # model -> (identity, offloaded layers) of its running child, for what it measures
        self._learning: dict[str, tuple[ModelIdentity, int]] = {}
        self._learned_runtime: Path | None = None  # the binary the learned figures are for
        self._warned_no_template: set[str] = set()
        # Where the HTTP front door listens (set by the daemon once bound), for health.
        self.http_listen: tuple[str, ...] = ()

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.learned.load)
        self._attach_learned()
        await self.refresh_memory()
        self._sampler = self.loop.create_task(self._sample_forever())

    async def close(self, drain_timeout: float) -> None:
        """Wait for running requests (bounded), then refuse the rest and stop every child."""
        deadline = self.now() + drain_timeout
        while self.core.active_total and self.now() < deadline:
            await asyncio.sleep(0.05)
        self._apply(self.core.shutdown())
        for task in list(self.load_tasks.values()):
            task.cancel()
        pending = [t for t in self._background if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.config.daemon.stop_grace + 5)
        for server in list(self.servers.values()):
            await server.stop(self.config.daemon.stop_grace)
        self.servers.clear()
        if self._sampler:
            self._sampler.cancel()
        for handle in self.timers.values():
            handle.cancel()
        await self.runtime.close()

    def now(self) -> float:
        return self._clock()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # --- effects ----------------------------------------------------------------------

    def _apply(self, effects: Sequence[Effect]) -> None:
        for effect in effects:
            match effect:
                case Admit(ticket):
                    future = self.waiters.pop(ticket, None)
                    if future and not future.done():
                        future.set_result(None)
                case Fail(ticket, error):
                    future = self.waiters.pop(ticket, None)
                    if future and not future.done():
                        future.set_exception(error)
                case StartLoad(model_id, placement, after):
                    self.load_tasks[model_id] = self._spawn(
                        self._run_load(model_id, placement, after)
                    )
                case Stop(model_id, reason, at_once, beneficiary):
                    self.stops[model_id] = asyncio.Event()
                    grace = 0.0 if at_once else self.config.daemon.stop_grace
                    self._spawn(self._run_stop(model_id, reason, beneficiary, grace))
                case AbortRunning(model_id, error):
                    # The Stop that comes with every abort ends the child, which breaks
                    # these requests' streams; they then end with this error. (Cancelling
                    # their tasks instead could land inside grpc's own writes and leave a
                    # client without a status.)
                    for ticket, owner in list(self.running.items()):
                        if owner == model_id:
                            self.aborts[ticket] = error
                case LoadFailed(model_id, message):
                    self._notify(model_id, "failed", message)
                case ArmTimer(model_id, at):
                    old = self.timers.pop(model_id, None)
                    if old:
                        old.cancel()
                    self.timers[model_id] = self.loop.call_later(
                        max(0.0, at - self.now()), self._idle_fired, model_id
                    )

    def _idle_fired(self, model_id: str) -> None:
        self.timers.pop(model_id, None)
        self._apply(self.core.idle_check(model_id, self.now()))

    def _notify(self, model_id: str, stage: str, message: str, beneficiary: str = "") -> None:
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

    async def _run_load(self, model_id: str, placement: Placement, after: tuple[str, ...]) -> None:
        entry = self.core.models[model_id]
        try:
            if after:
                self._notify(model_id, "evicting", ", ".join(after))
                for victim in after:
                    event = self.stops.get(victim)
                    if event:
                        await event.wait()
                await self._wait_memory_settled(placement)
            try:
                check_model_file(entry.spec.path, f"model {model_id!r}")
            except ConfigError as err:
                raise RuntimeFailed(str(err)) from None
            binary = await self.runtime.ready()
            if binary.path != self._learned_runtime:
                self._attach_learned()  # the figures learned with this binary
            server = self._child_factory(binary, self._launch_spec(entry.spec, placement))
            self.servers[model_id] = server
            self._notify(
                model_id, "loading", f"{placement.kind}, {placement.gpu_layers} GPU layers"
            )
            log_start = _log_size(server.spec.log_path)
            identity = model_identity(entry.spec, binary.path)
            if identity is not None:
                self._learning[model_id] = (identity, placement.gpu_layers)
            await server.start(self.config.daemon.load_timeout)
        except MmdError as err:
            self.servers.pop(model_id, None)
            self._learning.pop(model_id, None)
            self._notify(model_id, "failed", err.message)
            self._apply(self.core.load_done(model_id, self.now(), err))
            return
        finally:
            self.load_tasks.pop(model_id, None)
        self._notify(model_id, "ready", f"pid {server.pid}")
        self._spawn(self._watch(model_id, server))
        self._spawn(self._read_buffer_sizes(model_id, server, log_start))
        # The new child is measured by the next sample (within a second), not now: reading
        # its PSS takes milliseconds of CPU that its first request's prompt needs more.
        self._apply(self.core.load_done(model_id, self.now()))

    def _launch_spec(self, spec: ModelSpec, placement: Placement) -> LaunchSpec:
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
            log_path=paths.model_log(self.config.daemon.log_dir, spec.id),
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
        )

    async def _wait_memory_settled(self, placement: Placement) -> None:
        """Drivers report frees late: wait (bounded) until the planned bytes show as free."""
        deadline = self.now() + _SETTLE_TIMEOUT_S
        while self.now() < deadline:
            snapshot = await self.probe.read_async(fresh=True)
            free = {d.id: d.free for d in snapshot.devices}
            if all(free.get(dev, 0) >= need for dev, need in placement.usage.items()):
                return
            await asyncio.sleep(_SETTLE_POLL_S)
        log.warning("freed memory did not show as free within %.0fs", _SETTLE_TIMEOUT_S)

    async def _run_stop(self, model_id: str, reason: str, beneficiary: str, grace: float) -> None:
        event = self.stops[model_id]
        try:
            load = self.load_tasks.pop(model_id, None)
            if load and not load.done():
                load.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await load
            server = self.servers.pop(model_id, None)
            self._learning.pop(model_id, None)
            self._notify(model_id, "unloading", reason, beneficiary)
            if server:
                await server.stop(grace)
            self._notify(model_id, "unloaded", reason, beneficiary)
            self._apply(self.core.stopped(model_id, self.now()))
        finally:
            event.set()

    async def _watch(self, model_id: str, server: Child) -> None:
        status = await server.wait()
        if self.servers.get(model_id) is not server:
            return  # a stop mmd asked for
        self.servers.pop(model_id, None)
        self._learning.pop(model_id, None)
        description = describe_exit(status, server.binary.path)
        log.error("model %s: llama-server %s", model_id, description)
        self.events.publish(ModelChanged(model_id, "failed", "crashed", detail=description))
        await server.stop(0.1)
        self._apply(self.core.crashed(model_id, self.now(), description))

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

    # --- learned footprints ---------------------------------------------------------

    def _learned_for(self, spec: ModelSpec) -> tuple[LearnedBytes, ...]:
        """What was measured of ``spec``'s model with the current binary (nothing when the
        registry's ``memory`` setting replaces the footprint)."""
        if spec.memory is not None:
            return ()
        return self.learned.for_model(model_identity(spec, self.runtime.binary.path))

    def _attach_learned(self, model_ids: Sequence[str] | None = None) -> None:
        """Give the scheduler what was learned about these models (all by default)."""
        self._learned_runtime = self.runtime.binary.path
        for model_id in self.core.models if model_ids is None else model_ids:
            entry = self.core.models.get(model_id)
            if entry is None:
                continue
            self.core.set_learned(model_id, self._learned_for(entry.spec))
            pending = self.core.pending_specs.get(model_id)
            if pending is not None:
                self.core.set_learned(model_id, self._learned_for(pending[0]), pending=True)

    def _learn(self, model_id: str, reading: ProcessMemory) -> None:
        """Keep a ready child's measurement; save and apply it when it is new or larger.

        RAM is learned as RSS, not PSS: a figure that does not depend on which other
        models happen to share library pages with it (and is never below what the
        process has resident, as the estimate is calibrated to be).
        """
        key = self._learning.get(model_id)
        if key is None or RAM_ID not in reading.usage:
            return  # no identity, or the child is gone
        identity, layers = key
        gpu = sum(size for device, size in reading.usage.items() if device != RAM_ID)
        if not self.learned.record(identity, layers, gpu, reading.ram_rss):
            return
        text, generation = self.learned.dumps(), self.learned.generation
        self._spawn(asyncio.to_thread(self.learned.write, text, generation))
        if identity.runtime == str(self._learned_runtime):
            self._attach_learned([model_id])

    # --- memory ---------------------------------------------------------------------

    async def refresh_memory(self, *, measure_children: bool = True) -> None:
        """Read the devices and the children's use; update the scheduler's budgets.

        Measuring every child (PSS) takes milliseconds: a request that needs a load
        reuses the sampler's last measurement (a child started since then is not in it,
        which only makes the budget smaller).
        """
        snapshot = await self.probe.read_async()
        measured: dict[str, ProcessMemory] = {}
        if measure_children:
            children = {m: s.pid for m, s in self.servers.items() if s.pid}
            measured = await asyncio.to_thread(
                lambda: {m: self.probe.measure_process(pid) for m, pid in children.items()}
            )
            self._children_usage = {m: reading.usage for m, reading in measured.items()}
        usages = {m: u for m, u in self._children_usage.items() if m in self.servers}
        mmd_usage: dict[str, int] = {}
        for model_id, usage in usages.items():
            if self.servers.get(model_id) and model_id in self.core.models:
                entry = self.core.models[model_id]
                if entry.state == State.READY:
                    self.core.set_measured(model_id, usage)
                    if model_id in measured:
                        self._learn(model_id, measured[model_id])
            for device, used in usage.items():
                mmd_usage[device] = mmd_usage.get(device, 0) + used
        self.snapshot = snapshot
        self.budgets = compute_budgets(snapshot, self.config.budget, mmd_usage)
        headroom = self.config.scheduler.min_headroom
        low = frozenset(d.id for d in snapshot.devices if d.free < headroom)
        self.core.update_devices([v.to_planner() for v in self.budgets], low)

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.refresh_memory()
            except Exception:  # a failed reading must not stop sampling
                log.exception("memory sampling failed")
                continue
            self._apply(self.core.pump(self.now()))
            self._publish_memory()

    def _publish_memory(self) -> None:
        views = tuple(self.budgets)
        self.events.publish(MemorySampled(views, self.core.active_total, self.core.queued_total))
        threshold = self.config.budget.alert_percent
        for crossing in alert_crossings(views, threshold, self._above_alert):
            device, used = crossing.device, crossing.used_percent
            if crossing.above:
                self._above_alert.add(device)
                log.warning("%s memory at %.0f%% (alert at %.0f%%)", device, used, threshold)
            else:
                self._above_alert.discard(device)
                log.info("%s memory back below %.0f%%", device, threshold)
            self.events.publish(AlertCrossed(device, used, threshold, crossing.above))

    # --- requests ---------------------------------------------------------------------

    async def _admit(
        self, model_id: str, kind: Kind, keep_alive: float | None, gpu_layers: int | None = None
    ) -> int:
        entry = self.core.entry(model_id)
        if entry.state != State.READY:
            await self.refresh_memory(measure_children=False)
        ticket, effects = self.core.submit(
            model_id, kind, self.now(), keep_alive=keep_alive, gpu_layers=gpu_layers
        )
        future: asyncio.Future[None] = self.loop.create_future()
        self.waiters[ticket] = future
        self._apply(effects)
        try:
            await future
        except asyncio.CancelledError:
            # The client went away while waiting; also when it was admitted just now.
            self.waiters.pop(ticket, None)
            self._apply(self.core.cancel(ticket, self.now()))
            raise
        return ticket

    @contextlib.asynccontextmanager
    async def _slot(
        self, model_id: str, kind: Kind, keep_alive: float | None
    ) -> AsyncIterator[tuple[Child, RequestRecord]]:
        """Admission, then the running request; always accounted and published."""
        record = RequestRecord(arrived=self.now())
        ticket = 0
        status, error = "ok", ""
        try:
            self.core.entry(model_id)  # unknown ids fail before anything is counted
            was_ready = self.core.models[model_id].state == State.READY
            ticket = await self._admit(model_id, kind, keep_alive)
            record.admitted = self.now()
            if not was_ready:
                record.load_ms = (record.admitted - record.arrived) * 1000
            self.running[ticket] = model_id
            server = self.servers[model_id]
            try:
                yield server, record
            except (asyncio.CancelledError, RuntimeFailed) as exc:
                raise await self._running_error(ticket, model_id, server, exc) from None
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except MmdError as err:
            status, error = err.code.name, err.message
            raise
        except Exception as err:
            status, error = "INTERNAL", str(err)
            raise
        finally:
            if ticket:
                self.running.pop(ticket, None)
                self.aborts.pop(ticket, None)
                if record.admitted:
                    self._apply(self.core.request_done(ticket, self.now()))
            if model_id in self.core.models:
                self._publish_request(model_id, kind, record, status, error)

    def _publish_request(
        self, model_id: str, kind: Kind, record: RequestRecord, status: str, error: str
    ) -> None:
        end = self.now()
        final = record.final
        self.events.publish(
            RequestFinished(
                model_id=model_id,
                kind=kind.value,
                status=status,
                queue_ms=((record.admitted or end) - record.arrived) * 1000,
                first_token_ms=((record.first_token or end) - record.arrived) * 1000,
                total_ms=(end - record.arrived) * 1000,
                prompt_tokens=final.prompt_tokens if final else record.prompt_tokens,
                completion_tokens=final.completion_tokens if final else 0,
                tokens_per_second=final.generation_per_second if final else 0.0,
                error=error,
            )
        )

    async def _running_error(
        self, ticket: int, model_id: str, server: Child, exc: BaseException
    ) -> BaseException:
        """The error a running request ends with when its stream broke.

        An abort (forced unload, crash, shutdown) is recorded in ``self.aborts`` before
        the child is stopped, so the broken stream then reports the abort's reason. A
        stream that broke on its own asks the child how it died. A cancellation (the
        client went away) stays what it is.
        """
        if isinstance(exc, asyncio.CancelledError):
            return exc
        abort = self.aborts.pop(ticket, None)
        if abort is None:
            abort = await self._crash_error(model_id, server)
        return abort if abort is not None else exc

    async def _crash_error(self, model_id: str, server: Child) -> MmdError | None:
        """When a stream broke because the child died, an error that says how it died."""
        try:
            status = await asyncio.wait_for(asyncio.shield(server.wait()), 1.0)
        except TimeoutError:
            return None
        return RuntimeFailed(
            f"model {model_id!r} crashed: {describe_exit(status, server.binary.path)}"
        )

    async def infer(
        self, model_id: str, params: InferParams, keep_alive: float | None = None
    ) -> AsyncGenerator[str | Final, None]:
        """Text pieces as they arrive, then a Final with totals and timings."""
        async with (
            self._slot(model_id, Kind.INFER, keep_alive) as (server, record),
            contextlib.aclosing(stream_infer(server.client, model_id, params)) as stream,
        ):
            async for item in stream:
                now = self.now()
                if isinstance(item, Final):
                    item.queue_ms = (record.admitted - record.arrived) * 1000
                    item.load_ms = record.load_ms
                    item.first_token_ms = ((record.first_token or now) - record.arrived) * 1000
                    item.total_ms = (now - record.arrived) * 1000
                    record.final = item
                elif not record.first_token:
                    record.first_token = now
                yield item

    async def relay(
        self,
        model_id: str,
        kind: Kind,
        path: str,
        body: dict[str, Any],
        keep_alive: float | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """An OpenAI-shaped request (``path`` on the child, ``body`` as the client sent it)
        through the same queue, slots and accounting as infer(); the child's answer comes
        back as bytes, unchanged. Everything that refuses the request (unknown model, queue
        full, no memory) is raised before the first bytes."""
        async with self._slot(model_id, kind, keep_alive) as (server, record):
            final = Final()
            answer = relay(server.client, model_id, path, body, final)
            async with contextlib.aclosing(answer):
                async for chunk in answer:
                    if not record.first_token:
                        record.first_token = self.now()
                    yield chunk
            record.prompt_tokens = final.prompt_tokens
            record.final = final

    async def embed(
        self, model_id: str, inputs: Sequence[str], keep_alive: float | None = None
    ) -> tuple[list[list[float]], int]:
        async with self._slot(model_id, Kind.EMBED, keep_alive) as (server, record):
            vectors, tokens = await embed(server.client, model_id, inputs)
            record.prompt_tokens = tokens
            return vectors, tokens

    async def load_stages(
        self, model_id: str, gpu_layers: int | None = None
    ) -> AsyncGenerator[LoadStage, None]:
        """Load (if needed) and wait until ready: the plan ("planning", when the model is
        not loaded yet), then each stage as it happens, ending with "ready"."""
        plan = await self.plan(model_id, gpu_layers)
        if isinstance(plan, Plan):
            evict = f"; evicting {', '.join(plan.evict)}" if plan.evict else ""
            yield LoadStage("planning", f"{plan.placement.kind}{evict}")
        stages: asyncio.Queue[LoadStage | None] = asyncio.Queue()
        load = self.loop.create_task(self.load(model_id, gpu_layers, stages.put_nowait))
        load.add_done_callback(lambda _: stages.put_nowait(None))
        try:
            while (stage := await stages.get()) is not None:
                if stage.stage != "ready":
                    yield stage
            await load
        finally:
            load.cancel()
        yield LoadStage("ready", "")

    async def load(
        self, model_id: str, gpu_layers: int | None, report: Callable[[LoadStage], None]
    ) -> None:
        """Load (if needed) and wait until ready, reporting stages as they happen."""
        queue: asyncio.Queue[LoadStage] = asyncio.Queue()
        self.progress.setdefault(model_id, []).append(queue)
        admitted = self.loop.create_task(self._admit(model_id, Kind.LOAD, None, gpu_layers))
        try:
            while not admitted.done():
                getter = self.loop.create_task(queue.get())
                await asyncio.wait({admitted, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    report(getter.result())
                else:
                    getter.cancel()
            admitted.result()
        finally:
            admitted.cancel()
            self.progress[model_id].remove(queue)

    async def unload(self, model_id: str, force: bool, timeout: float) -> int:
        """Unload; returns how many running requests were aborted."""
        entry = self.core.entry(model_id)
        aborted = entry.active if force else 0
        self._apply(self.core.unload(model_id, self.now(), force=force))
        deadline = self.now() + timeout
        while entry.state not in (State.UNLOADED, State.FAILED):
            event = self.stops.get(model_id)
            if entry.state == State.UNLOADING and event:
                await event.wait()
                continue
            if self.now() >= deadline:
                self._apply(self.core.cancel_unload(model_id, self.now()))
                raise StillBusy(
                    f"model {model_id!r} still has {entry.active} running requests after "
                    f"{timeout:g}s; it keeps serving (use --force to abort them)"
                )
            await asyncio.sleep(0.02)
        return aborted

    async def plan(self, model_id: str, gpu_layers: int | None) -> Plan | Refusal:
        await self.refresh_memory()
        return self.core.plan(model_id, gpu_layers, self.now())

    async def plan_load(
        self, model_id: str, gpu_layers: int | None
    ) -> Plan | Refusal | AlreadyLoaded:
        """What loading the model would do now; a loaded (or loading) one is left as it is."""
        entry = self.core.entry(model_id)
        if entry.state in (State.READY, State.LOADING):
            return AlreadyLoaded(entry.placement)
        return await self.plan(model_id, gpu_layers)

    # --- queries for the front doors (gRPC, HTTP): plain values, no scheduler inside ------

    @property
    def closed(self) -> bool:
        """The daemon is shutting down: the drain is over, nothing new is admitted."""
        return self.core.closed

    def entry(self, model_id: str) -> ModelEntry:
        """The model's entry (UnknownModel when the registry has no such id)."""
        return self.core.entry(model_id)

    def find_entry(self, model_id: str) -> ModelEntry | None:
        return self.core.models.get(model_id)

    def keep_alive_of(self, entry: ModelEntry) -> float:
        return self.core.keep_alive_of(entry)

    @property
    def active_total(self) -> int:
        return self.core.active_total

    @property
    def queued_total(self) -> int:
        return self.core.queued_total

    async def chat_template_warning(self, model_id: str) -> str:
        """For a chat (messages, a system prompt) to a model whose GGUF file has no chat
        template: llama-server then formats it as ChatML, which such a model (the Gemma
        demo model, for one) may not know: it answered with ChatML's markers. Logged once
        per model; returned for each such client ("" when the model has a template)."""
        path = self.core.entry(model_id).spec.path
        if await asyncio.to_thread(has_chat_template, path) is not False:
            return ""
        warning = (
            f"model {model_id!r} has no chat template in its GGUF file (no "
            "tokenizer.chat_template): llama-server formats the chat as ChatML, which the "
            "model may not follow; a plain prompt (no --system) is sent as it is"
        )
        if model_id not in self._warned_no_template:
            self._warned_no_template.add(model_id)
            log.warning("%s", warning)
        return warning

    def model_entries(self) -> list[ModelEntry]:
        return list(self.core.models.values())

    def pid_of(self, model_id: str) -> int:
        server = self.servers.get(model_id)
        return server.pid if server else 0

    def log_tail(self, model_id: str, lines: int = 10) -> list[str]:
        return read_log_tail(paths.model_log(self.config.daemon.log_dir, model_id), lines)

    # --- reload and preload -----------------------------------------------------------

    _reload_lock: asyncio.Lock | None = None
    _removal_task: asyncio.Task[None] | None = None

    @property
    def reload_lock(self) -> asyncio.Lock:
        """Serialises reloads (SIGHUP and the Reload RPC may race)."""
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        return self._reload_lock

    async def reload(
        self, new_config: Config, footprints: dict[str, Footprint] | None = None
    ) -> ConfigDiff:
        """Apply a validated config (mmd.reload says what changes when)."""
        if footprints is None:
            footprints = {m: footprint_for(s) for m, s in new_config.models.items()}
        current = {
            m: self.core.pending_specs.get(m, (e.spec, e.footprint))[1]
            for m, e in self.core.models.items()
        }
        diff = diff_configs(self.config, new_config, current, footprints)
        old_log_dir = self.config.daemon.log_dir
        self.config = keep_restart_settings(self.config, new_config)
        if self.config.daemon.log_dir != old_log_dir:
            try:
                self.config.daemon.log_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                log.error("cannot create log directory %s: %s", self.config.daemon.log_dir, err)
        now = self.now()
        for model_id in diff.added:
            self.core.add_model(new_config.models[model_id], footprints[model_id])
        for model_id in diff.changed:
            self.core.update_spec(new_config.models[model_id], footprints[model_id])
        self._attach_learned([*diff.added, *diff.changed])
        effects: list[Effect] = []
        for model_id in diff.removed:
            timer = self.timers.pop(model_id, None)
            if timer:
                timer.cancel()
            effects += self.core.remove_model(model_id, now)
        effects += self.core.update_settings(new_config.scheduler, now)
        self._apply(effects)
        self._forget_removed()
        if self.core.removing and (self._removal_task is None or self._removal_task.done()):
            self._removal_task = self._spawn(self._finish_removals())
        await self.refresh_memory()  # the new budget, at once
        self._apply(self.core.pump(self.now()))
        return diff

    def _forget_removed(self) -> None:
        for model_id in self.core.forget_removed():
            self.stops.pop(model_id, None)
            timer = self.timers.pop(model_id, None)
            if timer:
                timer.cancel()
            log.info("%s: removed from the registry", model_id)

    async def _finish_removals(self) -> None:
        """Drop removed models once their child has stopped."""
        while self.core.removing and not self.core.closed:
            self._forget_removed()
            for model_id in list(self.core.removing):
                entry = self.core.models[model_id]
                if entry.state == State.READY and not entry.unload_requested:
                    # An operator's unload timed out and cancelled the drain: drain again.
                    self._apply(self.core.remove_model(model_id, self.now()))
            await asyncio.sleep(0.05)

    async def preload(self, report: Callable[[int, int, str], None] | None = None) -> list[str]:
        """Load the ``preload`` and pinned models, in priority order then id, within the
        budget: a preload never evicts another model. Failures are logged; returns the ids
        that are ready."""
        wanted = sorted(
            (s for s in self.config.models.values() if s.preload or s.pinned),
            key=lambda s: (s.priority, s.id),
        )
        ready: list[str] = []
        for index, spec in enumerate(wanted, 1):
            entry = self.core.models.get(spec.id)
            if entry is None or spec.id in self.core.removing:
                continue  # removed by a reload meanwhile
            if report:
                report(index, len(wanted), spec.id)
            try:
                if entry.state not in (State.READY, State.LOADING):
                    plan = await self.plan(spec.id, None)
                    if isinstance(plan, Refusal):
                        log.error("preload of %s refused: %s", spec.id, plan.reason)
                        continue
                    if plan.evict:
                        log.error(
                            "preload of %s skipped: it would evict %s (not within the budget)",
                            spec.id,
                            ", ".join(plan.evict),
                        )
                        continue
                await self.load(spec.id, None, lambda stage: None)
            except MmdError as err:
                log.error("preload of %s failed: %s", spec.id, err.message)
                continue
            ready.append(spec.id)
        return ready

    def status_line(self) -> str:
        """A one-line summary for systemd's STATUS=."""
        loaded = sum(1 for e in self.core.models.values() if e.state == State.READY)
        return f"serving {len(self.core.models)} models, {loaded} loaded"
