"""The engine driven with stand-in children and a stand-in probe: no process, no device.

Each child answers over HTTP on a Unix socket (an aiohttp server in the test's own
event loop) the way llama-server does; the probe
reports one RAM device whose free memory is what the running stand-ins leave. What the
real children and devices do is tested elsewhere (test_daemon, test_faults, ...).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import shutil
import tempfile
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from mmd.config.settings import Config, DaemonSettings
from mmd.core.errors import RequestAborted, RuntimeFailed
from mmd.core.footprint import Footprint
from mmd.core.model_state import State
from mmd.core.spec import ModelSpec, SchedulerSettings
from mmd.core.units import GIB
from mmd.engine.children import LoadStage
from mmd.engine.engine import Engine
from mmd.engine.events import AlertCrossed, Event, MemorySampled, ModelChanged, RequestFinished
from mmd.host.memory import DeviceReading, MemorySnapshot, ProcessMemory
from mmd.runtime.check import LlamaRuntime, Verdict, VerdictCache
from mmd.runtime.server import LaunchSpec, LlamaBinary, close_child_session, open_child_session
from mmd.runtime.upstream import Final, InferParams

RAM_TOTAL = 16 * GIB
OTHERS = 2 * GIB  # held by processes that are not mmd's
MODEL_BYTES = 8 * GIB  # one model fits in the budget (13 GiB), two do not

_pids = itertools.count(70000)


class FakeProbe:
    """One RAM device; the stand-in children's bytes count as used while they run."""

    def __init__(self) -> None:
        self.held: dict[int, int] = {}  # pid -> bytes
        self.others = OTHERS
        self.reads = 0

    async def read_async(self, *, fresh: bool = False) -> MemorySnapshot:
        self.reads += 1
        used = min(RAM_TOTAL, self.others + sum(self.held.values()))
        ram = DeviceReading("ram", "ram", "Test RAM", RAM_TOTAL, RAM_TOTAL - used, used)
        return MemorySnapshot((ram,), 0.0)

    def measure_process(self, pid: int) -> ProcessMemory:
        held = self.held.get(pid)
        return ProcessMemory({"ram": held}, held) if held is not None else ProcessMemory({}, 0)


class FakeChild:
    """A llama-server stand-in: ``behaviour`` "ok" serves, "fail" exits during its load,
    "hang" never becomes ready. Once started it answers over HTTP on a Unix socket, from
    an aiohttp server in this process. With ``stall`` set a completion sends one piece,
    then waits until the child is gone, whose stream then breaks as a lost connection
    does."""

    def __init__(
        self, binary: LlamaBinary, spec: LaunchSpec, probe: FakeProbe, behaviour: str
    ) -> None:
        self.binary = binary
        self.spec = spec
        self.probe = probe
        self.behaviour = behaviour
        self.stall = False
        self.streaming = asyncio.Event()  # a completion has sent its first piece
        self.exited = asyncio.Event()
        self.status: int | None = None
        self.stop_grace: float | None = None
        self._pid = 0
        self._runner: web.AppRunner | None = None
        self._dir: str | None = None
        self._responses: weakref.WeakSet[aiohttp.ClientResponse] = weakref.WeakSet()

    @property
    def pid(self) -> int:
        return self._pid

    async def start(self, timeout: float) -> None:
        self._pid = next(_pids)
        name = self.spec.model_id
        if self.behaviour == "fail":
            self._exit(1)
            raise RuntimeFailed(f"model {name!r}: llama-server exited with status 1 during load")
        if self.behaviour == "hang":
            try:
                await asyncio.wait_for(self.exited.wait(), timeout)
            except TimeoutError:
                await self.stop(1.0)
                raise RuntimeFailed(
                    f"model {name!r} was not ready within {timeout:g}s (load timeout)"
                ) from None
        await self._serve()
        self.probe.held[self._pid] = MODEL_BYTES
        self.spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.spec.log_path.open("a") as log:
            log.write("load_tensors:   CPU_Mapped model buffer size =   100.00 MiB\n")
            log.write("sched_reserve:        CPU compute buffer size =    12.00 MiB\n")

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/completion", self._completion)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_route("*", "/{path:.*}", self._missing)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        self._dir = tempfile.mkdtemp(prefix="mmd-fake-")  # short: a socket path has a limit
        socket = os.path.join(self._dir, "child.sock")
        await web.UnixSite(self._runner, socket).start()
        self.session = open_child_session(Path(socket), 8, self._responses)

    async def wait(self) -> int:
        await self.exited.wait()
        assert self.status is not None
        return self.status

    async def stop(self, grace: float) -> int | None:
        if self._pid == 0:
            return None
        self.stop_grace = grace
        self._exit(-15 if grace > 0 else -9)
        await self.close()
        return self.status

    async def close(self) -> None:
        """The session and the server, once: at stop, or at the test's end after a crash."""
        if self._runner is not None:
            await close_child_session(self.session, self._responses)
            await self._runner.cleanup()
            self._runner = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def crash(self, status: int = -11) -> None:
        self._exit(status)

    def _exit(self, status: int) -> None:
        if self.status is None:
            self.status = status
            self.probe.held.pop(self._pid, None)
            self.exited.set()

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"content": "Hel"}\n\n')
        if self.stall:
            self.streaming.set()
            await self.exited.wait()
            assert request.transport is not None
            request.transport.abort()  # the child closed the connection mid-answer
            return response
        await asyncio.sleep(0.001)  # the next piece comes in a read of its own
        await response.write(b'data: {"content": "lo", "stop": true, "tokens_evaluated": 3,')
        await response.write(b' "tokens_predicted": 2}\n\n')
        await response.write_eof()
        return response

    async def _embeddings(self, request: web.Request) -> web.Response:
        inputs = (await request.json())["input"]
        data = [{"index": i, "embedding": [float(i), 0.5]} for i in range(len(inputs))]
        return web.json_response({"data": data, "usage": {"prompt_tokens": 4}})

    async def _missing(self, request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "no such endpoint"}}, status=404)


class Children:
    """The child factory: makes stand-ins and keeps them, per model, in order."""

    def __init__(self, probe: FakeProbe) -> None:
        self.probe = probe
        self.behaviour: dict[str, str] = {}
        self.made: list[FakeChild] = []

    def __call__(self, binary: LlamaBinary, spec: LaunchSpec) -> FakeChild:
        child = FakeChild(binary, spec, self.probe, self.behaviour.get(spec.model_id, "ok"))
        self.made.append(child)
        return child

    def of(self, model_id: str) -> list[FakeChild]:
        return [c for c in self.made if c.spec.model_id == model_id]


class Clock:
    """The loop's time plus an offset the test may move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return asyncio.get_running_loop().time() + self.offset


def _footprint() -> Footprint:
    return Footprint((), 0, MODEL_BYTES, MODEL_BYTES, 0, 0)  # all of it host overhead


def _model_file(path: Path) -> Path:
    path.write_bytes(b"GGUF" + bytes(60))  # enough for the checks that a load makes
    return path


Rig = tuple[Engine, Children, FakeProbe]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def build(*, load_timeout: float = 5.0, keep_alive: float = 300.0) -> Rig:
        specs = {
            name: ModelSpec(
                name,
                _model_file(tmp_path / f"{name}.gguf"),
                keep_alive=keep_alive,
                embedding=name == "e",
            )
            for name in ("a", "b", "e")
        }
        config = Config(
            source=None,
            daemon=DaemonSettings(
                socket=tmp_path / "mmd.sock",
                state_dir=tmp_path / "state",
                log_dir=tmp_path / "logs",
                load_timeout=load_timeout,
                stop_grace=0.5,
            ),
            scheduler=SchedulerSettings(min_residency=0.0),
            models=specs,
        )
        binary = LlamaBinary(tmp_path / "llama-server", {}, "config")
        runtime = LlamaRuntime([binary], VerdictCache(tmp_path / "state"), flags=frozenset())
        runtime.verdict = Verdict(True, "version: 1 (test)", options=("--verbosity",))
        probe = FakeProbe()
        children = Children(probe)
        engine = Engine(
            config,
            runtime,
            probe,
            tmp_path / "children",
            {name: _footprint() for name in specs},
            child_factory=children,
            clock=Clock(),
        )
        made.append((engine, children, probe))
        return engine, children, probe

    yield build
    for engine, _, _ in made:
        await engine.close(drain_timeout=0.0)
    for _, children, _ in made:
        for child in children.made:
            await child.close()  # those that crashed are not stopped


def _events(engine: Engine) -> Callable[[], list[Event]]:
    subscription = engine.events.subscribe()

    def taken() -> list[Event]:
        found = []
        while not subscription.queue.empty():
            found.append(subscription.queue.get_nowait()[1])
        return found

    return taken


def _changes(events: list[Event]) -> list[tuple[str, str, str]]:
    return [(e.model_id, e.state, e.reason) for e in events if isinstance(e, ModelChanged)]


async def _stages(engine: Engine, model_id: str) -> list[LoadStage]:
    return [stage async for stage in engine.load_stages(model_id)]


async def _infer(engine: Engine, model_id: str) -> list[str | Final]:
    return [item async for item in engine.infer(model_id, InferParams(prompt="hi"))]


async def _stalled_request(
    engine: Engine, children: Children
) -> tuple[
    FakeChild,
    AsyncGenerator[str | Final, None],
    asyncio.Future[str | Final],
    Callable[[], list[Event]],
]:
    """Model "a" loaded and one request running on it, its stream stalled after the first
    piece: the child, the stream, the pending next piece, and the events taken since."""
    await engine.start()
    await _stages(engine, "a")
    (child,) = children.made
    child.stall = True
    taken = _events(engine)
    stream = engine.infer("a", InferParams(prompt="hi"))
    assert await anext(stream) == "Hel"
    pending = asyncio.ensure_future(anext(stream))
    await child.streaming.wait()
    return child, stream, pending, taken


async def test_a_load_starts_a_child_and_requests_reach_it(rig: Callable[..., Rig]) -> None:
    engine, children, _ = rig()
    await engine.start()
    taken = _events(engine)
    stages = await _stages(engine, "a")
    assert [s.stage for s in stages] == ["planning", "loading", "ready"]
    assert stages[1].message == "cpu, 0 GPU layers"
    (child,) = children.made
    assert child.spec.model_id == "a"
    assert child.spec.socket.parent == engine.runtime_dir
    assert child.spec.log_verbosity == 4  # its binary lists --verbosity
    assert engine.entry("a").state == State.READY
    assert engine.pid_of("a") == child.pid

    pieces = await _infer(engine, "a")
    assert pieces[:2] == ["Hel", "lo"]
    final = pieces[-1]
    assert isinstance(final, Final)
    assert (final.prompt_tokens, final.completion_tokens) == (3, 2)
    assert engine.status_line() == "serving 3 models, 1 loaded"

    events = taken()
    assert _changes(events) == [("a", "loading", "load"), ("a", "ready", "load")]
    finished = [e for e in events if isinstance(e, RequestFinished)]
    assert [(e.kind, e.status, e.completion_tokens) for e in finished] == [("infer", "ok", 2)]
    assert engine.active_total == engine.queued_total == 0

    # The child's own figures: the buffers its log names, its measured bytes.
    await engine.refresh_memory()
    assert engine.entry("a").measured == {"ram": MODEL_BYTES}
    (ram,) = engine.budgets
    assert (ram.mmd_bytes, ram.other_bytes) == (MODEL_BYTES, OTHERS)


async def test_an_embedding_request_loads_its_model(rig: Callable[..., Rig]) -> None:
    engine, children, _ = rig()
    await engine.start()
    vectors, tokens = await engine.embed("e", ["x", "y"])
    assert (vectors, tokens) == ([[0.0, 0.5], [1.0, 0.5]], 4)
    (child,) = children.made
    assert child.spec.embedding


async def test_a_load_that_fails_leaves_the_model_failed(rig: Callable[..., Rig]) -> None:
    engine, children, _ = rig()
    await engine.start()
    children.behaviour["a"] = "fail"
    taken = _events(engine)
    with pytest.raises(RuntimeFailed, match="exited with status 1 during load"):
        await _stages(engine, "a")
    entry = engine.entry("a")
    assert entry.state == State.FAILED
    assert "during load" in entry.last_error
    assert engine.pid_of("a") == 0
    changes = _changes(taken())
    assert changes == [("a", "loading", "load"), ("a", "failed", "load failed")]

    # An explicit load retries at once, with a new child.
    children.behaviour["a"] = "ok"
    await _stages(engine, "a")
    assert engine.entry("a").state == State.READY
    assert len(children.of("a")) == 2


async def test_a_load_timeout_stops_the_child_and_fails_the_load(
    rig: Callable[..., Rig],
) -> None:
    engine, children, probe = rig(load_timeout=0.05)
    await engine.start()
    children.behaviour["a"] = "hang"
    with pytest.raises(RuntimeFailed, match=r"not ready within 0\.05s"):
        await _infer(engine, "a")
    (child,) = children.made
    assert child.exited.is_set()
    assert engine.entry("a").state == State.FAILED
    assert probe.held == {}


async def test_a_crash_of_a_ready_child_fails_its_running_request(
    rig: Callable[..., Rig],
) -> None:
    engine, children, _ = rig()
    child, stream, pending, taken = await _stalled_request(engine, children)
    child.crash(-11)
    with pytest.raises(RuntimeFailed, match=r"crashed: killed by SIGSEGV \(exit status -11\)"):
        await pending
    await stream.aclose()
    for _ in range(100):
        if engine.entry("a").state == State.FAILED:
            break
        await asyncio.sleep(0.01)
    assert engine.entry("a").state == State.FAILED
    assert engine.pid_of("a") == 0
    events = taken()
    crashed = [e for e in events if isinstance(e, ModelChanged)]
    assert [(e.state, e.reason, e.detail) for e in crashed] == [
        ("failed", "crashed", "killed by SIGSEGV (exit status -11)")
    ]
    (finished,) = [e for e in events if isinstance(e, RequestFinished)]
    assert finished.status == "UNAVAILABLE"
    assert "crashed" in finished.error
    assert engine.active_total == 0

    # The next request loads it again.
    assert (await _infer(engine, "a"))[:2] == ["Hel", "lo"]
    assert len(children.of("a")) == 2


async def test_a_forced_unload_aborts_the_running_request(rig: Callable[..., Rig]) -> None:
    engine, children, probe = rig()
    child, stream, pending, taken = await _stalled_request(engine, children)
    assert await engine.unload("a", force=True, timeout=5.0) == 1
    with pytest.raises(RequestAborted, match="unloaded by an operator"):
        await pending
    await stream.aclose()
    assert child.stop_grace == 0.5  # the configured stop_grace
    assert engine.entry("a").state == State.UNLOADED
    assert probe.held == {}
    events = taken()
    assert _changes(events) == [
        ("a", "unloading", "forced unload"),
        ("a", "unloaded", "forced unload"),
    ]
    (finished,) = [e for e in events if isinstance(e, RequestFinished)]
    assert finished.status == "ABORTED"


async def test_a_load_evicts_an_idle_model_to_make_room(rig: Callable[..., Rig]) -> None:
    engine, children, probe = rig()
    await engine.start()
    await _stages(engine, "a")
    taken = _events(engine)
    plan = await engine.plan_load("b", None)
    assert getattr(plan, "evict", None) == ("a",)
    stages = await _stages(engine, "b")
    # Every stage reaches the caller, also those reported in the turn that admitted it.
    names = [s.stage for s in stages]
    assert names[:2] == ["planning", "evicting"]
    assert "loading" in names
    assert names[-1] == "ready"
    assert stages[0].message == "cpu; evicting a"
    (a_child,) = children.of("a")
    assert a_child.stop_grace == 0.0  # an idle model evicted for a waiting load: at once
    assert engine.entry("a").state == State.UNLOADED
    assert engine.entry("b").state == State.READY
    assert list(probe.held.values()) == [MODEL_BYTES]
    changes = [
        (e.model_id, e.state, e.reason, e.for_model) for e in taken() if isinstance(e, ModelChanged)
    ]
    assert changes == [
        ("a", "unloading", "evicted", "b"),
        ("a", "unloaded", "evicted", "b"),
        ("b", "loading", "load", ""),
        ("b", "ready", "load", ""),
    ]


async def test_an_idle_model_unloads_after_its_keep_alive(rig: Callable[..., Rig]) -> None:
    engine, children, _ = rig(keep_alive=0.05)
    await engine.start()
    await _infer(engine, "a")
    (child,) = children.made
    await asyncio.wait_for(child.exited.wait(), 5.0)
    for _ in range(100):
        if engine.entry("a").state == State.UNLOADED:
            break
        await asyncio.sleep(0.01)
    assert engine.entry("a").state == State.UNLOADED


async def test_memory_samples_and_alert_crossings_are_published(
    rig: Callable[..., Rig],
) -> None:
    engine, _, probe = rig()
    await engine.start()
    taken = _events(engine)
    probe.others = 15 * GIB  # 93.75% of the total in use: past the 85% alert
    await engine.refresh_memory()
    engine.monitor.publish()
    engine.monitor.publish()  # still above: no second crossing
    probe.others = OTHERS
    await engine.refresh_memory()
    engine.monitor.publish()
    events = taken()
    assert sum(isinstance(e, MemorySampled) for e in events) == 3
    crossings = [(e.device, e.above) for e in events if isinstance(e, AlertCrossed)]
    assert crossings == [("ram", True), ("ram", False)]


async def test_a_reload_adds_and_drains_models(rig: Callable[..., Rig]) -> None:
    engine, children, _ = rig()
    await engine.start()
    await _stages(engine, "b")
    (b_child,) = children.of("b")
    old = engine.config
    models = {m: s for m, s in old.models.items() if m != "b"}
    models["c"] = ModelSpec("c", _model_file(old.models["a"].path.with_name("c.gguf")))
    new = dataclasses.replace(
        old, models=models, scheduler=dataclasses.replace(old.scheduler, max_queue=7)
    )
    footprints = {m: _footprint() for m in models}
    async with engine.reload_lock:
        diff = await engine.reload(new, footprints)
    assert (diff.added, diff.removed, diff.changed) == (("c",), ("b",), ())
    assert diff.applied == ("scheduler.max_queue",)
    await asyncio.wait_for(b_child.exited.wait(), 5.0)
    for _ in range(200):
        if engine.find_entry("b") is None:
            break
        await asyncio.sleep(0.01)
    assert engine.find_entry("b") is None
    assert [e.spec.id for e in engine.model_entries()] == ["a", "e", "c"]
    assert engine.config.scheduler.max_queue == 7
    assert (await _infer(engine, "c"))[:2] == ["Hel", "lo"]
