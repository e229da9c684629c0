"""A Watch stream read in a thread, and its events as comparable tuples: shared by the
tests that follow what the daemon reports."""

from __future__ import annotations

import threading
from typing import Any

import grpc
from daemon_proc import Daemon

from mmd.v1 import mmd_pb2 as pb


class Watcher:
    """Collects a Watch stream in a thread."""

    def __init__(self, daemon: Daemon, interval: float = 0.0) -> None:
        self.events: list[pb.Event] = []
        self.call = daemon.stub.Watch(pb.WatchRequest(memory_interval_seconds=interval))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for event in self.call:
                self.events.append(event)
        except grpc.RpcError:
            pass

    def kinds(self, kind: str) -> list[Any]:
        return [getattr(e, kind) for e in list(self.events) if e.WhichOneof("kind") == kind]

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(10)


def is_subsequence(wanted: list[tuple[Any, ...]], seen: list[tuple[Any, ...]]) -> bool:
    remaining = iter(seen)
    return all(item in remaining for item in wanted)


def summary(event: pb.Event) -> tuple[Any, ...]:
    kind = event.WhichOneof("kind")
    if kind == "model":
        m = event.model
        return ("model", m.model_id, pb.ModelState.Name(m.state), m.reason, m.for_model)
    if kind == "request":
        return ("request", event.request.model_id, event.request.status)
    return (kind,)
