"""Prometheus metrics: the listen setting, counters from events, and a real scrape."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from conftest import Daemon
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mmd.api.metrics import EventMetrics
from mmd.config.http import parse_host_port
from mmd.config.settings import parse_config
from mmd.core.errors import ConfigError
from mmd.engine.events import AlertCrossed, ModelChanged, RequestFinished
from mmd.v1 import mmd_pb2 as pb


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9464", ("127.0.0.1", 9464)),
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("[::1]:9464", ("::1", 9464)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text", ["", ":9464", "host:", "host:port", "1.2.3.4:70000", "-1"])
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_host_port(text)


def test_metrics_table_is_off_by_default_and_validated() -> None:
    assert parse_config("", None).metrics.listen is None
    assert parse_config('[metrics]\nlisten = "9464"\n', None).metrics.listen == "9464"
    assert parse_config("[metrics]\nlisten = 9464\n", None).metrics.listen == "9464"
    with pytest.raises(ConfigError, match=r"metrics\.listen"):
        parse_config('[metrics]\nlisten = "nowhere"\n', None)
    with pytest.raises(ConfigError, match=r"metrics\.port: unknown key"):
        parse_config("[metrics]\nport = 1\n", None)


def test_event_metrics_count_requests_loads_evictions_crashes() -> None:
    registry = CollectorRegistry()
    metrics = EventMetrics(registry)
    ok = RequestFinished("a", "infer", "ok", 1.0, 20.0, 100.0, 3, 8, 80.0)
    metrics.observe(ok)
    metrics.observe(ok)
    metrics.observe(RequestFinished("a", "embed", "FAILED_PRECONDITION", 0.5, 1.0, 1.0))
    metrics.observe(ModelChanged("a", "ready", "load"))
    metrics.observe(ModelChanged("a", "unloading", "evicted", "b"))
    metrics.observe(ModelChanged("a", "unloaded", "evicted", "b"))
    metrics.observe(ModelChanged("b", "unloaded", "forced unload"))
    metrics.observe(ModelChanged("b", "failed", "crashed", detail="killed by SIGKILL"))
    metrics.observe(ModelChanged("c", "failed", "load failed", detail="bad file"))
    metrics.observe(AlertCrossed("ram", 90.0, 85.0, True))
    metrics.observe(AlertCrossed("ram", 80.0, 85.0, False))
    found = samples(generate_latest(registry).decode())
    assert value(found, "mmd_requests_total", model="a", kind="infer", status="ok") == 2
    assert (
        value(found, "mmd_requests_total", model="a", kind="embed", status="FAILED_PRECONDITION")
        == 1
    )
    assert value(found, "mmd_generated_tokens_total", model="a") == 16
    assert value(found, "mmd_request_duration_seconds_count", model="a") == 3
    assert value(found, "mmd_request_first_token_seconds_count", model="a") == 2
    assert value(found, "mmd_request_first_token_seconds_sum", model="a") == pytest.approx(0.04)
    assert value(found, "mmd_model_loads_total", model="a") == 1
    assert value(found, "mmd_model_unloads_total", model="a", reason="evicted") == 1
    assert value(found, "mmd_model_unloads_total", model="b", reason="forced_unload") == 1
    assert value(found, "mmd_model_evictions_total", model="a", for_model="b") == 1
    assert value(found, "mmd_model_crashes_total", model="b") == 1
    assert value(found, "mmd_model_load_failures_total", model="c") == 1
    assert value(found, "mmd_memory_alerts_total", device="ram") == 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_scrape_matches_the_requests_sent(make_daemon: Any, model_files: dict[str, Path]) -> None:
    port = free_port()
    daemon: Daemon = make_daemon(
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n\n[models.t]\npath = "{model_files["tiny"]}"\n'
    )
    for _ in range(3):
        list(daemon.stub.Infer(pb.InferRequest(model_id="t", prompt="go", max_tokens=5)))
    with pytest.raises(grpc.RpcError):
        daemon.stub.Embed(pb.EmbedRequest(model_id="t", input=["x"]))
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 10
    while True:  # request events reach the metrics task just after the replies
        response = httpx.get(url, timeout=10)
        assert response.status_code == 200
        found = samples(response.text)
        done = value(
            found, "mmd_requests_total", model="t", kind="embed", status="FAILED_PRECONDITION"
        )
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert response.headers["content-type"].startswith("text/plain")
    assert value(found, "mmd_requests_total", model="t", kind="infer", status="ok") == 3
    assert (
        value(found, "mmd_requests_total", model="t", kind="embed", status="FAILED_PRECONDITION")
        == 1
    )
    assert value(found, "mmd_generated_tokens_total", model="t") == 15
    assert value(found, "mmd_request_duration_seconds_count", model="t") == 4
    assert value(found, "mmd_request_first_token_seconds_count", model="t") == 3
    assert value(found, "mmd_model_loads_total", model="t") == 1
    assert value(found, "mmd_model_state", model="t", state="ready") == 1
    assert value(found, "mmd_model_state", model="t", state="unloaded") == 0
    assert value(found, "mmd_model_estimated_bytes", model="t") > 0
    assert value(found, "mmd_device_budget_bytes", device="ram", kind="ram") > 0
    assert value(found, "mmd_device_free_bytes", device="ram", kind="ram") > 0
    assert value(found, "mmd_active_requests") == 0
    budget = value(found, "mmd_cpu_budget_cores")
    assert budget >= 1
    # Loaded alone, the model computes on every core of the budget, one thread each.
    [(labels, threads)] = [
        (dict(labels), v) for (name, labels), v in found.items() if name == "mmd_model_cpu_threads"
    ]
    assert labels["model"] == "t"
    assert threads == budget == len(labels["cpus"].split(","))
    assert httpx.get(f"http://127.0.0.1:{port}/nothing", timeout=10).status_code == 404


def test_metrics_port_in_use_is_refused_at_start(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon: Daemon = make_daemon(f'[metrics]\nlisten = "{port}"\n', start=False)
        daemon.start(wait=False)
        assert daemon.process is not None
        assert daemon.process.wait(30) == 2
    assert "metrics.listen" in daemon.log_path.read_text()
