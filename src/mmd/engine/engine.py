"""The engine: executes the scheduler's effects with real processes and memory readings.

It owns the futures that requests wait on, the timers and the background tasks, and
answers the front doors (gRPC, HTTP); the children are run by mmd.engine.children, memory is
watched by mmd.engine.monitor, a reload is applied by mmd.engine.reload. Every decision is the
scheduler's (mmd.core.scheduler). All of it runs on the event-loop thread, so no locks are
needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmd.config.settings import Config
from mmd.core.budget import DeviceBudgetView
from mmd.core.cores import CoreDecision, CpuBudget
from mmd.core.effects import (
    AbortRunning,
    Admit,
    ArmTimer,
    Effect,
    Fail,
    Kind,
    LoadFailed,
    StartLoad,
    Stop,
)
from mmd.core.errors import MmdError, RuntimeFailed, StillBusy
from mmd.core.footprint import Footprint
from mmd.core.model_state import ModelEntry, State
from mmd.core.planner import Placement, Plan, Refusal
from mmd.core.scheduler import Scheduler
from mmd.engine.accounting import RequestRecord
from mmd.engine.chat_templates import ChatTemplates
from mmd.engine.children import Child, ChildFactory, Children, LoadStage, model_file_problem
from mmd.engine.events import EventBus
from mmd.engine.monitor import MemoryMonitor
from mmd.engine.preload import preload_models
from mmd.engine.reload import ConfigDiff, apply_config
from mmd.host import paths
from mmd.host.cpu_topology import read_cpu_budget
from mmd.host.learned import LearnedStore
from mmd.host.memory import MemoryReader, MemorySnapshot
from mmd.runtime.check import LlamaRuntime
from mmd.runtime.gguf import footprint_for
from mmd.runtime.server import LlamaServer, read_log_tail
from mmd.runtime.upstream import Final, InferParams, embed, relay, stream_infer

log = logging.getLogger("mmd.engine")

__all__ = ["AlreadyLoaded", "Engine"]


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
        footprints = footprints or {m: footprint_for(s) for m, s in config.models.items()}
        self.core = Scheduler(
            config.scheduler, {m: (s, footprints[m]) for m, s in config.models.items()}
        )
        self.core.file_problem = model_file_problem
        self.read_cpus()
        self.loop = asyncio.get_running_loop()
        self._clock = clock or self.loop.time
        self.waiters: dict[int, asyncio.Future[None]] = {}
        self.servers: dict[str, Child] = {}  # model id -> its running (or starting) child
        self.running: dict[int, str] = {}  # ticket -> model id
        self.aborts: dict[int, MmdError] = {}
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.events = EventBus()
        self.started = time.time()
        self._background: set[asyncio.Task[Any]] = set()
        self.monitor = MemoryMonitor(
            probe,
            self.core,
            self.events,
            runtime,
            self.servers,
            config=lambda: self.config,
            clock=self.now,
            spawn=self.spawn,
        )
        self.children = Children(
            self.core,
            runtime,
            self.monitor,
            self.events,
            self.servers,
            runtime_dir,
            child_factory,
            config=lambda: self.config,
            clock=self.now,
            spawn=self.spawn,
            apply=self.apply,
        )
        self.templates = ChatTemplates(lambda model_id: self.core.entry(model_id).spec.path)
        # Where the HTTP front door listens (set by the daemon once bound), for health.
        self.http_listen: tuple[str, ...] = ()
        self.reload_lock = asyncio.Lock()  # serialises reloads (SIGHUP and the Reload RPC)
        self.removal_task: asyncio.Task[None] | None = None  # see mmd.engine.reload

    @property
    def cpu_budget(self) -> CpuBudget | None:
        return self.core.cpu_budget

    def read_cpus(self) -> None:
        """The cores children may compute on: read at start and at each reload (a changed
        affinity or quota applies from the next load)."""
        self.core.cpu_budget = read_cpu_budget(self.config.budget.cpus)

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.learned.load)
        self.monitor.attach_learned()
        await self.refresh_memory()
        self.monitor.start(lambda: self.apply(self.core.pump(self.now())))

    async def close(self, drain_timeout: float) -> None:
        """Wait for running requests (bounded), then refuse the rest and stop every child."""
        deadline = self.now() + drain_timeout
        while self.core.active_total and self.now() < deadline:
            await asyncio.sleep(0.05)
        self.apply(self.core.shutdown())
        self.children.cancel_loads()
        pending = [t for t in self._background if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.config.daemon.stop_grace + 5)
        await self.children.stop_all()
        self.monitor.stop()
        for handle in self.timers.values():
            handle.cancel()
        await self.runtime.close()

    def now(self) -> float:
        return self._clock()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in the background; close() waits for it (bounded)."""
        task = self.loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # --- memory (mmd.engine.monitor) ------------------------------------------------------

    @property
    def budgets(self) -> list[DeviceBudgetView]:
        return self.monitor.budgets

    @property
    def snapshot(self) -> MemorySnapshot | None:
        return self.monitor.snapshot

    @property
    def learned(self) -> LearnedStore:
        return self.monitor.learned

    async def refresh_memory(self, *, measure_children: bool = True) -> None:
        """Read the devices and the children's use; update the scheduler's budgets."""
        await self.monitor.refresh(measure_children=measure_children)

    # --- effects ----------------------------------------------------------------------

    def apply(self, effects: Sequence[Effect]) -> None:
        """Carry out the scheduler's effects."""
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
                case StartLoad(model_id, placement, after, replaced):
                    self.children.start_load(model_id, placement, after, replaced)
                case Stop(model_id, reason, at_once, beneficiary):
                    self.children.stop(model_id, reason, beneficiary, at_once)
                case AbortRunning(model_id, error):
                    # The Stop that comes with every abort ends the child, which breaks
                    # these requests' streams; they then end with this error. (Cancelling
                    # their tasks instead could land inside grpc's own writes and leave a
                    # client without a status.)
                    for ticket, owner in list(self.running.items()):
                        if owner == model_id:
                            self.aborts[ticket] = error
                case LoadFailed(model_id, message):
                    self.children.notify(model_id, "failed", message)
                case ArmTimer(model_id, at):
                    self.cancel_timer(model_id)
                    self.timers[model_id] = self.loop.call_later(
                        max(0.0, at - self.now()), self._idle_fired, model_id
                    )

    def cancel_timer(self, model_id: str) -> None:
        timer = self.timers.pop(model_id, None)
        if timer:
            timer.cancel()

    def _idle_fired(self, model_id: str) -> None:
        self.timers.pop(model_id, None)
        self.apply(self.core.idle_check(model_id, self.now()))

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
        self.apply(effects)
        try:
            await future
        except asyncio.CancelledError:
            # The client went away while waiting; also when it was admitted just now.
            self.waiters.pop(ticket, None)
            self.apply(self.core.cancel(ticket, self.now()))
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
            status, error = err.status, err.message
            raise
        except Exception as err:
            status, error = "INTERNAL", str(err)
            raise
        finally:
            if ticket:
                self.running.pop(ticket, None)
                self.aborts.pop(ticket, None)
                if record.admitted:
                    self.apply(self.core.request_done(ticket, self.now()))
            if model_id in self.core.models:
                self.events.publish(record.finished(model_id, kind, status, error, self.now()))

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
            abort = await self.children.crash_error(model_id, server)
        return abort if abort is not None else exc

    async def infer(
        self, model_id: str, params: InferParams, keep_alive: float | None = None
    ) -> AsyncGenerator[str | Final, None]:
        """Text pieces as they arrive, then a Final with totals and timings."""
        async with (
            self._slot(model_id, Kind.INFER, keep_alive) as (server, record),
            contextlib.aclosing(stream_infer(server.session, model_id, params)) as stream,
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
            answer = relay(server.session, model_id, path, body, final)
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
            vectors, tokens = await embed(server.session, model_id, inputs)
            record.prompt_tokens = tokens
            return vectors, tokens

    async def load_stages(
        self, model_id: str, gpu_layers: int | None = None
    ) -> AsyncGenerator[LoadStage, None]:
        """Load (if needed) and wait until ready: the plan ("planning", when the model is
        not loaded yet), then each stage as it happens, ending with "ready". The one way
        to load: LoadModel, POST /load and preloads all follow it."""
        plan = await self.plan(model_id, gpu_layers)
        if isinstance(plan, Plan):
            evict = f"; evicting {', '.join(plan.evict)}" if plan.evict else ""
            yield LoadStage("planning", f"{plan.placement.kind}{evict}")
        queue: asyncio.Queue[LoadStage] = asyncio.Queue()
        self.children.progress.setdefault(model_id, []).append(queue)
        admitted = self.loop.create_task(self._admit(model_id, Kind.LOAD, None, gpu_layers))
        try:
            while True:
                getter = self.loop.create_task(queue.get())
                await asyncio.wait({admitted, getter}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                if getter.result().stage != "ready":  # said last, once admitted
                    yield getter.result()
            # Stages reported in the turn that admitted the load are still queued.
            while not queue.empty():
                stage = queue.get_nowait()
                if stage.stage != "ready":
                    yield stage
            admitted.result()
        finally:
            admitted.cancel()
            self.children.progress[model_id].remove(queue)
        yield LoadStage("ready", "")

    async def unload(self, model_id: str, force: bool, timeout: float) -> int:
        """Unload; returns how many running requests were aborted."""
        entry = self.core.entry(model_id)
        aborted = entry.active if force else 0
        self.apply(self.core.unload(model_id, self.now(), force=force))
        deadline = self.now() + timeout
        while entry.state not in (State.UNLOADED, State.FAILED):
            event = self.children.stops.get(model_id)
            if entry.state == State.UNLOADING and event:
                await event.wait()
                continue
            if self.now() >= deadline:
                self.apply(self.core.cancel_unload(model_id, self.now()))
                raise StillBusy(
                    f"model {model_id!r} still has {entry.active} running requests after "
                    f"{timeout:g}s; it keeps serving (use --force to abort them)"
                )
            await asyncio.sleep(0.02)
        return aborted

    async def plan(self, model_id: str, gpu_layers: int | None) -> Plan | Refusal:
        await self.refresh_memory()
        return self.core.plan(model_id, gpu_layers, self.now())

    def decide_cores(self, model_id: str, plan: Plan) -> CoreDecision | None:
        """The cores a planned load would get, and whom it would re-place (see mmd.core.cores)."""
        entry = self.core.entry(model_id)
        return self.core.decide_cores(entry, plan.placement, leaving=plan.evict)

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

    async def chat_template_warning(self, model_id: str, chat: bool = True) -> str:
        """The warning for a request to a model without a chat template (see
        mmd.engine.chat_templates)."""
        return await self.templates.warning(model_id, chat)

    async def prompt_mode(
        self, model_id: str, params: InferParams, raw: bool
    ) -> tuple[InferParams, str]:
        """A lone prompt through the model's chat template when it has one, unless raw; the
        request as it will be sent and its warning (see mmd.engine.chat_templates)."""
        return await self.templates.prompt_mode(model_id, params, raw)

    def model_entries(self) -> list[ModelEntry]:
        return list(self.core.models.values())

    def pid_of(self, model_id: str) -> int:
        server = self.servers.get(model_id)
        return server.pid if server else 0

    def log_tail(self, model_id: str, lines: int = 10) -> list[str]:
        return read_log_tail(paths.model_log(self.config.daemon.log_dir, model_id), lines)

    # --- reload and preload -----------------------------------------------------------

    async def reload(
        self, new_config: Config, footprints: dict[str, Footprint] | None = None
    ) -> ConfigDiff:
        """Apply a validated config (mmd.engine.reload says what changes when)."""
        return await apply_config(self, new_config, footprints)

    async def preload(self, report: Callable[[int, int, str], None] | None = None) -> list[str]:
        """Load the preload and pinned models within the budget (see mmd.engine.preload)."""
        return await preload_models(self, report)

    def status_line(self) -> str:
        """A one-line summary for systemd's STATUS=."""
        loaded = sum(1 for e in self.core.models.values() if e.state == State.READY)
        return f"serving {len(self.core.models)} models, {loaded} loaded"
