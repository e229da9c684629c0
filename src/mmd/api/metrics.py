"""Prometheus metrics: counters and histograms fed by the event bus, gauges read at scrape time.

Served by a small asyncio HTTP server on the event-loop thread, so a scrape reads the
engine's state between two steps of the loop and never races with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from mmd import __version__
from mmd.config.http import parse_host_port
from mmd.core.errors import ConfigError
from mmd.core.model_state import State
from mmd.engine.events import AlertCrossed, Event, ModelChanged, RequestFinished, Subscription

if TYPE_CHECKING:
    from mmd.engine.engine import Engine

log = logging.getLogger("mmd.metrics")

# The metrics task consumes as fast as the loop runs; the large buffer only absorbs bursts.
SUBSCRIPTION_BUFFER = 65536

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# A scrape request is a few hundred bytes; anything slower or larger is dropped.
_REQUEST_TIMEOUT_S = 10.0
_MAX_HEADER_LINES = 100


# A scrape asks each ready child for its slots; one that does not answer this fast (a
# child stuck in a long prompt) is left out of that scrape rather than delaying it.
_SLOTS_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class KvUse:
    """A model's KV cache at one scrape: tokens held for running requests, and capacity
    (the context of all its slots)."""

    used: int
    capacity: int

    @property
    def ratio(self) -> float:
        return min(1.0, self.used / self.capacity) if self.capacity else 0.0


def kv_use(slots: Any) -> KvUse | None:
    """A KvUse from llama-server's ``GET /slots`` answer (None when it is not one).

    Only slots that are processing count: an idle slot's cached prompt is reused or
    overwritten by the next request, so it is free room, as vLLM's
    ``kv_cache_usage_perc`` counts it. A processing slot holds its prompt and what it
    has generated so far; llama-server reports that as ``n_prompt_tokens`` (which grows
    with each token), and older builds as the prompt plus ``n_decoded``: the larger."""
    if not isinstance(slots, list):
        return None
    used = capacity = 0
    for slot in slots:
        if not isinstance(slot, dict):
            return None
        n_ctx = slot.get("n_ctx")
        if not isinstance(n_ctx, int):
            return None
        capacity += n_ctx
        if not slot.get("is_processing"):
            continue
        held = _int(slot.get("n_prompt_tokens"))
        prompt = _int(slot.get("n_prompt_tokens_cache")) + _int(
            slot.get("n_prompt_tokens_processed")
        )
        next_tokens = slot.get("next_token")
        if isinstance(next_tokens, dict):
            next_tokens = [next_tokens]
        decoded = sum(
            _int(item.get("n_decoded")) for item in next_tokens or () if isinstance(item, dict)
        )
        used += min(n_ctx, max(held, prompt + decoded))
    return KvUse(used, capacity)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _label(reason: str) -> str:
    return reason.replace(" ", "_")


class EventMetrics:
    """Counters and histograms, updated from published events."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "mmd_requests",
            "Requests finished, by model, kind and status (ok or a gRPC status name).",
            ["model", "kind", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "mmd_request_duration_seconds",
            "Request latency from arrival to the end, queueing and loading included.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "mmd_request_queue_seconds",
            "Time a request waited before it ran (loading included).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.first_token = Histogram(
            "mmd_request_first_token_seconds",
            "Time to the first generated token of successful inference requests.",
            ["model"],
            buckets=FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self.generated = Counter(
            "mmd_generated_tokens", "Tokens generated.", ["model"], registry=registry
        )
        self.prompt = Counter(
            "mmd_prompt_tokens", "Prompt tokens processed.", ["model"], registry=registry
        )
        self.loads = Counter(
            "mmd_model_loads", "Loads that became ready.", ["model"], registry=registry
        )
        self.load_failures = Counter(
            "mmd_model_load_failures", "Loads that failed.", ["model"], registry=registry
        )
        self.unloads = Counter(
            "mmd_model_unloads",
            "Models stopped, by reason "
            "(idle, unload, forced_unload, evicted, re-placed, shutdown).",
            ["model", "reason"],
            registry=registry,
        )
        self.evictions = Counter(
            "mmd_model_evictions",
            "Idle models evicted to make room, by the model they made room for.",
            ["model", "for_model"],
            registry=registry,
        )
        self.crashes = Counter(
            "mmd_model_crashes", "llama-server children that died.", ["model"], registry=registry
        )
        self.alerts = Counter(
            "mmd_memory_alerts",
            "Times a device's memory use crossed above the alert threshold.",
            ["device"],
            registry=registry,
        )

    def observe(self, event: Event) -> None:
        match event:
            case RequestFinished():
                model = event.model_id
                self.requests.labels(model, event.kind, event.status).inc()
                self.latency.labels(model).observe(event.total_ms / 1000)
                self.queue_wait.labels(model).observe(event.queue_ms / 1000)
                if event.kind == "infer" and event.status == "ok":
                    self.first_token.labels(model).observe(event.first_token_ms / 1000)
                self.generated.labels(model).inc(event.completion_tokens)
                self.prompt.labels(model).inc(event.prompt_tokens)
            case ModelChanged(state="ready"):
                self.loads.labels(event.model_id).inc()
            case ModelChanged(state="failed"):
                if event.reason == "crashed":
                    self.crashes.labels(event.model_id).inc()
                else:
                    self.load_failures.labels(event.model_id).inc()
            case ModelChanged(state="unloaded"):
                self.unloads.labels(event.model_id, _label(event.reason)).inc()
                if event.reason == "evicted":
                    self.evictions.labels(event.model_id, event.for_model).inc()
            case AlertCrossed(above=True):
                self.alerts.labels(event.device).inc()


class EngineCollector(Collector):
    """Gauges of the engine's current state, read at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Filled by MetricsServer.read_kv_cache just before each scrape renders.
        self.kv: dict[str, KvUse] = {}

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        info = GaugeMetricFamily("mmd_info", "The running mmd.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        device_gauges = {
            "total": ("mmd_device_total_bytes", "Device memory in all."),
            "budget": ("mmd_device_budget_bytes", "Memory mmd may use now, on this device."),
            "mmd_bytes": ("mmd_device_used_bytes", "Memory held by mmd's models."),
            "other_bytes": ("mmd_device_other_bytes", "Memory used by other processes."),
            "free": ("mmd_device_free_bytes", "Free memory."),
        }
        for attribute, (name, help_text) in device_gauges.items():
            family = GaugeMetricFamily(name, help_text, labels=["device", "kind"])
            for view in engine.budgets:
                family.add_metric([view.id, view.kind], getattr(view, attribute))
            yield family

        state = GaugeMetricFamily(
            "mmd_model_state", "1 for the model's current state.", labels=["model", "state"]
        )
        estimated = GaugeMetricFamily(
            "mmd_model_estimated_bytes", "Estimated footprint.", labels=["model"]
        )
        measured = GaugeMetricFamily(
            "mmd_model_measured_bytes", "Measured memory of the running model.", labels=["model"]
        )
        active = GaugeMetricFamily(
            "mmd_model_active_requests", "Requests running.", labels=["model"]
        )
        queued = GaugeMetricFamily(
            "mmd_model_queued_requests", "Requests waiting.", labels=["model"]
        )
        threads = GaugeMetricFamily(
            "mmd_model_cpu_threads",
            "Threads (one per core of its own) mmd gave the model's child; absent: none of mmd's.",
            labels=["model", "cpus"],
        )
        for entry in engine.model_entries():
            model = entry.spec.id
            if entry.cores is not None and entry.holds_memory:
                cpus = ",".join(str(cpu) for cpu in entry.cores.cpus)
                threads.add_metric([model, cpus], entry.cores.threads)
            for value in State:
                state.add_metric([model, value.value], 1 if entry.state == value else 0)
            estimated.add_metric([model], entry.footprint.total)
            measured.add_metric([model], sum(entry.measured.values()))
            active.add_metric([model], entry.active)
            queued.add_metric([model], entry.queued)
        yield from (state, estimated, measured, active, queued, threads)
        if engine.cpu_budget is not None:
            yield GaugeMetricFamily(
                "mmd_cpu_budget_cores",
                "Cores mmd gives its children (affinity, quota, [budget] cpus).",
                value=engine.cpu_budget.count,
            )

        yield GaugeMetricFamily(
            "mmd_active_requests", "Requests running, all models.", value=engine.active_total
        )
        yield GaugeMetricFamily(
            "mmd_queued_requests", "Requests waiting, all models.", value=engine.queued_total
        )

        # The model server protocol's KV-cache utilisation (a fraction, 0 to 1, like
        # vLLM's kv_cache_usage_perc), per ready model and for the whole server.
        kv = GaugeMetricFamily(
            "mmd_model_kv_cache_usage_ratio",
            "Fraction of the model's KV cache (all slots' context) held by running requests.",
            labels=["model"],
        )
        for model, use in sorted(self.kv.items()):
            kv.add_metric([model], use.ratio)
        yield kv
        used = sum(use.used for use in self.kv.values())
        capacity = sum(use.capacity for use in self.kv.values())
        yield GaugeMetricFamily(
            "mmd_kv_cache_usage_ratio",
            "Fraction of the KV cache of all ready models held by running requests.",
            value=min(1.0, used / capacity) if capacity else 0.0,
        )


class MetricsServer:
    """The registry, the task that feeds it, and the HTTP endpoint."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.registry = CollectorRegistry(auto_describe=True)
        self.events = EventMetrics(self.registry)
        self.collector = EngineCollector(engine)
        self.registry.register(self.collector)
        self.server: asyncio.Server | None = None
        self._feeder: asyncio.Task[None] | None = None
        self._subscription: Subscription | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when the configured port was 0)."""
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        self._subscription = self.engine.events.subscribe(SUBSCRIPTION_BUFFER)
        self._feeder = asyncio.get_running_loop().create_task(self._feed(self._subscription))
        self.server = await asyncio.start_server(self._handle, host, port, limit=8192)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1.0)
        if self._feeder is not None:
            self._feeder.cancel()
        if self._subscription is not None:
            self.engine.events.unsubscribe(self._subscription)

    async def _feed(self, subscription: Subscription) -> None:
        while True:
            _, event = await subscription.queue.get()
            if subscription.dropped:
                log.warning("metrics missed %d events", subscription.take_dropped())
            self.events.observe(event)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def read_kv_cache(self) -> None:
        """Ask every ready model's llama-server for its slots, all at once (each bounded
        by _SLOTS_TIMEOUT_S); a child that does not answer is left out of this scrape."""
        engine = self.engine
        ready = [
            (entry.spec.id, engine.servers[entry.spec.id])
            for entry in engine.model_entries()
            if entry.state == State.READY and entry.spec.id in engine.servers
        ]
        answers = await asyncio.gather(*(_read_slots(server.session) for _, server in ready))
        self.collector.kv = {
            model: use for (model, _), use in zip(ready, answers, strict=True) if use is not None
        }

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body, content_type = await asyncio.wait_for(
                self._respond(reader), _REQUEST_TIMEOUT_S
            )
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await asyncio.wait_for(writer.drain(), _REQUEST_TIMEOUT_S)
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass  # a client that is gone or misbehaves gets nothing more
        finally:
            writer.close()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[str, bytes, str]:
        request_line = (await reader.readline()).decode("latin-1").split()
        for _ in range(_MAX_HEADER_LINES):
            if (await reader.readline()).strip() == b"":
                break
        text = "text/plain; charset=utf-8"
        if len(request_line) < 2 or request_line[0] not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b"only GET\n", text
        path = request_line[1].split("?", 1)[0]
        if path == "/metrics":
            await self.read_kv_cache()
            body = self.render()
            return "200 OK", b"" if request_line[0] == "HEAD" else body, CONTENT_TYPE_LATEST
        if path == "/":
            return "200 OK", b"mmd metrics: /metrics\n", text
        return "404 Not Found", b"not found; try /metrics\n", text


async def _read_slots(session: aiohttp.ClientSession) -> KvUse | None:
    try:
        async with asyncio.timeout(_SLOTS_TIMEOUT_S):
            async with session.get("/slots") as response:
                if response.status != 200:
                    return None  # a child started with --no-slots
                return kv_use(await response.json(content_type=None))
    except (TimeoutError, aiohttp.ClientError, ValueError, RuntimeError):
        return None  # busy, gone, or closing (RuntimeError: its session closed)


async def start_metrics(engine: Engine, listen: str | None) -> MetricsServer | None:
    """Serve metrics on ``listen`` ("HOST:PORT" or a bare port on loopback); None: off."""
    if not listen:
        return None
    host, port = parse_host_port(listen)
    server = MetricsServer(engine)
    try:
        await server.start(host, port)
    except OSError as err:
        await server.close()
        raise ConfigError(
            f"metrics.listen: cannot listen on {listen}: {err.strerror or err}"
        ) from None
    log.info(
        "metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", server.port
    )
    return server
