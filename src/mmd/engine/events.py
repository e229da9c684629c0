"""Daemon events and their fan-out to watchers.

The engine publishes plain dataclasses; the Watch servicer turns them into
protos. Each watcher has a bounded buffer: a watcher that falls behind loses
events (counted, and told so) instead of slowing the daemon or growing its memory.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from mmd.core.budget import DeviceBudgetView

DEFAULT_BUFFER = 1024


@dataclass(frozen=True)
class ModelChanged:
    model_id: str
    state: str  # a scheduler State value: "loading", "ready", "unloading", "unloaded", "failed"
    reason: str  # "load", "idle", "unload", "forced unload", "evicted", "crashed", "load failed"...
    for_model: str = ""  # an eviction's beneficiary
    detail: str = ""


@dataclass(frozen=True)
class RequestFinished:
    model_id: str
    kind: str  # "infer", "embed"
    status: str  # "ok" or a gRPC status name
    queue_ms: float
    first_token_ms: float
    total_ms: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_per_second: float = 0.0
    error: str = ""


@dataclass(frozen=True)
class MemorySampled:
    devices: tuple[DeviceBudgetView, ...]
    active: int
    queued: int


@dataclass(frozen=True)
class AlertCrossed:
    device: str
    used_percent: float
    threshold_percent: float
    above: bool


Event = ModelChanged | RequestFinished | MemorySampled | AlertCrossed


@dataclass
class Subscription:
    """One watcher's bounded buffer of (unix time, event)."""

    queue: asyncio.Queue[tuple[float, Event]]
    dropped: int = 0

    def offer(self, item: tuple[float, Event]) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.dropped += 1

    def take_dropped(self) -> int:
        dropped, self.dropped = self.dropped, 0
        return dropped


@dataclass
class EventBus:
    capacity: int = DEFAULT_BUFFER
    subscribers: list[Subscription] = field(default_factory=list)

    def subscribe(self, capacity: int | None = None) -> Subscription:
        """A new watcher's buffer: ``capacity`` events (default: the bus's)."""
        subscription = Subscription(asyncio.Queue(capacity or self.capacity))
        self.subscribers.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self.subscribers:
            self.subscribers.remove(subscription)

    def publish(self, event: Event) -> None:
        if not self.subscribers:
            return
        item = (time.time(), event)
        for subscription in self.subscribers:
            subscription.offer(item)
