"""The dashboard's page, static files and event stream (GET /api/events), without a browser."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
from conftest import Daemon, wait_until

from mmd.api.protojson import EVENT_TYPES, event_to_dict
from mmd.api.rpc import watch
from mmd.api.web import dashboard
from mmd.engine.events import AlertCrossed, EventBus, RequestFinished
from mmd.v1 import mmd_pb2 as pb

KEY = "dashboard-test-key-0001"


def sample_events() -> list[pb.Event]:
    device = pb.Device(id="ram", kind="ram", total_bytes=8, budget_bytes=6, free_bytes=4)
    model = pb.Model(id="m", state=pb.MODEL_STATE_READY, pid=7)
    return [
        pb.Event(time_unix=1.5, snapshot=pb.Health(version="1", devices=[device], models=[model])),
        pb.Event(
            time_unix=2,
            model=pb.ModelEvent(model_id="m", state=pb.MODEL_STATE_FAILED, reason="crashed"),
        ),
        pb.Event(time_unix=3, request=pb.RequestEvent(model_id="m", kind="infer", status="ok")),
        pb.Event(time_unix=4, memory=pb.MemorySample(devices=[device], active_inferences=1)),
        pb.Event(time_unix=5, alert=pb.MemoryAlert(device="ram", used_percent=90, above=True)),
        pb.Event(time_unix=6, lagged=pb.Lagged(dropped=3)),
    ]


def test_events_have_the_shape_of_mmctl_events_json() -> None:
    """The stream sends what ``mmctl events --json`` prints (both use
    protojson.event_to_dict): the type, the time, then the event's own fields."""
    shown = [event_to_dict(event) for event in sample_events()]
    assert [(e["type"], e["time"]) for e in shown] == [
        (kind, float(n)) for n, kind in zip([1.5, 2, 3, 4, 5, 6], EVENT_TYPES, strict=True)
    ]
    model = shown[1]
    assert (model["model_id"], model["state"], model["reason"]) == ("m", "failed", "crashed")
    assert shown[4]["above"] is True
    assert shown[5]["dropped"] == 3


def test_an_event_is_one_data_line_of_json() -> None:
    data = dashboard.sse_data({"type": "request", "text": "a\nb", "rate": float("inf")})
    assert data.startswith(b"data: ")
    assert data.endswith(b"\n\n")
    assert data.count(b"\n") == 2  # a newline inside a value stays escaped
    assert json.loads(data[6:]) == {"type": "request", "text": "a\nb", "rate": None}


def start(make_daemon: Any, model_files: dict[str, Path], keys: str = "") -> tuple[Daemon, str]:
    daemon: Daemon = make_daemon(
        f'[http]\nlisten = ["127.0.0.1:0"]\n{keys}\n\n[models.t]\npath = "{model_files["tiny"]}"\n'
    )
    (url,) = daemon.stub.GetHealth(pb.GetHealthRequest()).http_listen
    return daemon, url


def test_the_page_and_its_files(make_daemon: Any, model_files: dict[str, Path]) -> None:
    _, url = start(make_daemon, model_files)
    page = httpx.get(url + "/")
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    assert "Access-Control-Allow-Origin" not in page.headers
    # Only the page's own files: no CDN, nothing fetched from elsewhere.
    assert "://" not in page.text
    for name, kind in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        response = httpx.get(f"{url}/static/{name}")
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith(kind)
        assert "://" not in response.text
    assert httpx.get(url + "/favicon.ico").headers["Content-Type"] == "image/svg+xml"
    for name in ("nope.js", "..%2Fdashboard.py", "%2E%2E%2Fserver.py", ".hidden.js"):
        assert httpx.get(f"{url}/static/{name}").status_code == 404
    assert httpx.get(url + "/static/../dashboard.py").status_code == 404
    # The event stream is a read: a POST to it is not allowed.
    assert httpx.post(url + "/api/events").status_code == 405
    # An open loopback listener answers loopback names only (no DNS rebinding), the page too.
    for path in ("/", "/static/app.js", "/api/events"):
        assert httpx.get(url + path, headers={"Host": "evil.example"}).status_code == 403


def read_events(url: str, headers: dict[str, str], out: list[dict[str, Any]]) -> None:
    with httpx.stream("GET", url + "/api/events", headers=headers, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))


def test_the_event_stream_follows_the_daemon_until_it_stops(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon, url = start(make_daemon, model_files, keys=f'api_keys = ["{KEY}"]')
    headers = {"Authorization": f"Bearer {KEY}"}
    # The page and its files are public; the data needs the key.
    assert httpx.get(url + "/").status_code == 200
    assert httpx.get(url + "/static/app.js").status_code == 200
    assert httpx.get(url + "/api/events").status_code == 401

    events: list[dict[str, Any]] = []
    reader = threading.Thread(target=read_events, args=(url, headers, events), daemon=True)
    reader.start()
    assert wait_until(lambda: bool(events))
    assert events[0]["type"] == "snapshot"
    assert events[0]["http_listen"] == [url]

    loaded = httpx.post(url + "/load", json={"model": "t"}, headers=headers, timeout=60)
    assert loaded.status_code == 200
    body = {"model": "t", "prompt": "go", "max_tokens": 4}
    assert httpx.post(url + "/infer", json=body, headers=headers, timeout=60).status_code == 200
    assert wait_until(lambda: any(e["type"] == "request" for e in events))
    assert wait_until(lambda: any(e["type"] == "memory" for e in events))
    changes = [(e["model_id"], e["state"]) for e in events if e["type"] == "model"]
    assert ("t", "ready") in changes
    ready = next(e for e in events if e["type"] == "model" and e["state"] == "ready")
    assert ready["model"]["pid"] > 0
    request = next(e for e in events if e["type"] == "request")
    assert request["model_id"] == "t"
    assert request["status"] == "ok"
    assert request["completion_tokens"] == 4

    # The stream ends when the daemon shuts down (the page then shows "disconnected").
    daemon.stop(signal.SIGTERM)
    reader.join(15)
    assert not reader.is_alive()


class FakeEngine:
    """What the event stream uses of the engine: its event bus and whether it is closed."""

    def __init__(self) -> None:
        self.events = EventBus(capacity=4)
        self.closed = False


async def test_keep_alive_lag_and_the_end_of_the_stream(monkeypatch: Any) -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    snapshot = pb.Event(time_unix=1, snapshot=pb.Health(version="x"))
    monkeypatch.setattr(watch, "snapshot_events", lambda engine: [snapshot])
    monkeypatch.setattr(dashboard, "KEEPALIVE_S", 0.2)
    monkeypatch.setattr(watch, "_SHUTDOWN_CHECK_S", 0.05)
    engine = FakeEngine()
    app = web.Application()
    dashboard.add_routes(app, engine)  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/api/events")
        assert response.headers["Cache-Control"].startswith("no-cache")

        async def next_line() -> str:
            while True:
                line = (await asyncio.wait_for(response.content.readline(), 5)).decode()
                if line.strip():
                    return line.strip()

        assert json.loads((await next_line())[6:])["type"] == "snapshot"
        assert await next_line() == ": keep-alive"  # nothing else for KEEPALIVE_S
        assert len(engine.events.subscribers) == 1
        engine.events.publish(AlertCrossed("ram", 90.0, 85.0, True))
        alert = json.loads((await next_line())[6:])
        assert alert["type"] == "alert"
        assert alert["above"] is True
        assert alert["device"] == "ram"
        # A reader that falls behind is told how much it lost, then gets a fresh snapshot.
        for _ in range(10):
            engine.events.publish(RequestFinished("m", "infer", "ok", 0, 1, 2))
        events = [json.loads((await next_line())[6:]) for _ in range(3)]
        assert [e["type"] for e in events] == ["request", "lagged", "snapshot"]
        assert events[1]["dropped"] == 9  # 6 never queued, 3 queued behind the first
        # The daemon shuts down: the stream ends (the page then shows "disconnected").
        engine.closed = True
        assert (await asyncio.wait_for(response.content.read(), 5)).strip() == b""
    assert engine.events.subscribers == []
