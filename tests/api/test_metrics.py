"""Prometheus metrics: the listen setting, counters from events, and a real scrape."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from conftest import Daemon, wait_until
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mmd.api.metrics import EventMetrics, kv_use
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


@pytest.mark.parametrize(
    ("slots", "expected"),
    [
        ([{"id": 0, "n_ctx": 1024, "is_processing": False}], (0, 1024)),
        # Today's llama-server: n_prompt_tokens grows with each generated token.
        (
            [
                {
                    "n_ctx": 1000,
                    "is_processing": True,
                    "n_prompt_tokens": 249,
                    "n_prompt_tokens_processed": 30,
                    "n_prompt_tokens_cache": 0,
                    "next_token": [{"n_decoded": 220}],
                },
                {"n_ctx": 1000, "is_processing": False, "n_prompt_tokens": 900},
            ],
            (250, 2000),
        ),
        # An older shape: the prompt (cached + processed) plus what was decoded.
        (
            [
                {
                    "n_ctx": 512,
                    "is_processing": True,
                    "n_prompt_tokens_processed": 10,
                    "n_prompt_tokens_cache": 90,
                    "next_token": {"n_decoded": 50},
                }
            ],
            (150, 512),
        ),
        # Never more than a slot holds.
        ([{"n_ctx": 100, "is_processing": True, "n_prompt_tokens": 400}], (100, 100)),
    ],
)
def test_kv_use_reads_llama_server_slots(
    slots: list[dict[str, Any]], expected: tuple[int, int]
) -> None:
    use = kv_use(slots)
    assert use is not None
    assert (use.used, use.capacity) == expected
    assert 0.0 <= use.ratio <= 1.0


@pytest.mark.parametrize("answer", [{"error": "x"}, [1], [{"id": 0}], "text"])
def test_kv_use_refuses_what_is_not_a_slot_list(answer: Any) -> None:
    assert kv_use(answer) is None


def test_model_server_protocol_gauges_while_requests_queue_and_run(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    """Two requests run in the model's two slots and a third waits: the queued, running
    and KV-cache gauges say so while it happens, and fall back to 0 after."""
    port = free_port()
    daemon: Daemon = make_daemon(
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n\n'
        f'[models.t]\npath = "{model_files["tiny"]}"\nctx = 4096\nparallel = 2\n'
    )
    daemon.load("t")
    url = f"http://127.0.0.1:{port}/metrics"
    calls = [
        daemon.stub.Infer(pb.InferRequest(model_id="t", prompt="go", max_tokens=1900))
        for _ in range(3)
    ]
    try:
        deadline = time.monotonic() + 30
        seen: dict[str, float] = {}
        while time.monotonic() < deadline:
            found = samples(httpx.get(url, timeout=10).text)
            seen = {
                "running": value(found, "mmd_model_active_requests", model="t"),
                "queued": value(found, "mmd_model_queued_requests", model="t"),
                "running_total": value(found, "mmd_active_requests"),
                "queued_total": value(found, "mmd_queued_requests"),
                "kv": value(found, "mmd_model_kv_cache_usage_ratio", model="t"),
                "kv_total": value(found, "mmd_kv_cache_usage_ratio"),
            }
            if seen["running"] == 2 and seen["queued"] == 1 and seen["kv"] > 0:
                break
            time.sleep(0.05)
        print("gauges while busy:", seen)
        assert seen["running"] == seen["running_total"] == 2, seen
        assert seen["queued"] == seen["queued_total"] == 1, seen
        # Two slots of 2048 tokens, each holding its prompt and what it generated so far.
        assert 0 < seen["kv"] <= 1, seen
        assert seen["kv_total"] == pytest.approx(seen["kv"]), seen
    finally:
        for call in calls:
            call.cancel()
    assert wait_until(
        lambda: value(samples(httpx.get(url, timeout=10).text), "mmd_active_requests") == 0,
        timeout=20,
    )
    found = samples(httpx.get(url, timeout=10).text)
    assert value(found, "mmd_queued_requests") == 0
    assert ("mmd_model_kv_cache_usage_ratio", frozenset({("model", "t")})) in found
    assert value(found, "mmd_model_kv_cache_usage_ratio", model="t") == 0
    assert value(found, "mmd_kv_cache_usage_ratio") == 0
