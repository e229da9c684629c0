"""Scheduling with real children: queue, on-demand loads, cancellation, crashes, keep-alive."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from conftest import Daemon, wait_until

from mmd.host import paths
from mmd.runtime.server import resolve_llama_server
from mmd.v1 import mmd_pb2 as pb

DELAYED = Path(__file__).parents[1] / "delayed_llama_server.sh"


def model(model_id: str, path: Path, **settings: object) -> str:
    lines = [f"[models.{model_id}]", f'path = "{path}"']
    for key, value in settings.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def infer(daemon: Daemon, model_id: str, tokens: int = 4, **kw: Any) -> pb.InferDone:
    request = pb.InferRequest(model_id=model_id, prompt="go", max_tokens=tokens, **kw)
    chunks = list(daemon.stub.Infer(request, timeout=120))
    assert chunks[-1].WhichOneof("kind") == "done"
    return chunks[-1].done


def state_of(daemon: Daemon, model_id: str) -> dict[str, Any]:
    models = json.loads(daemon.mmctl("models", "--json").stdout)
    return next(m for m in models if m["id"] == model_id)


def health(daemon: Daemon) -> dict[str, Any]:
    return json.loads(daemon.mmctl("health", "--json").stdout)  # type: ignore[no-any-return]


def wait_active(daemon: Daemon, count: int) -> None:
    assert wait_until(lambda: health(daemon)["active_inferences"] >= count, timeout=20)


def load_count(daemon: Daemon, model_id: str) -> int:
    return daemon.log_path.read_text().count(f"{model_id}: loading ")


@pytest.fixture
def delayed(model_files: dict[str, Path]) -> dict[str, str]:
    real = resolve_llama_server(None).path
    return {"MMD_LLAMA_SERVER": str(DELAYED), "MMD_TEST_REAL_LLAMA_SERVER": str(real)}


def test_queue_full_is_refused_at_once(make_daemon: Any, model_files: dict[str, Path]) -> None:
    config = "[scheduler]\nmax_concurrent = 1\nmax_queue = 2\n" + model(
        "b", model_files["m50"], ctx=2048
    )
    daemon: Daemon = make_daemon(config)
    infer(daemon, "b")
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(infer, daemon, "b", 1500)
        wait_active(daemon, 1)
        queued = [pool.submit(infer, daemon, "b", 2) for _ in range(2)]
        assert wait_until(lambda: health(daemon)["queued_requests"] == 2, timeout=20)
        started = time.monotonic()
        refused = daemon.mmctl("infer", "b", "hi")
        assert time.monotonic() - started < 20  # answered, not left hanging
        assert refused.returncode == 5
        assert "queue full" in refused.stderr.decode()
        assert running.result().completion_tokens == 1500
        assert [f.result().completion_tokens for f in queued] == [2, 2]


def test_many_concurrent_requests_cause_one_load(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(model("a", model_files["m40"], ctx=512, parallel=4))
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: infer(daemon, "a", 3), range(16)))
    assert [r.completion_tokens for r in results] == [3] * 16
    assert load_count(daemon, "a") == 1
    assert len(daemon.children()) == 1


def test_ready_model_is_served_while_another_loads(
    make_daemon: Any, model_files: dict[str, Path], delayed: dict[str, str]
) -> None:
    slow = model_files["tiny"].with_name("slow-tiny.gguf")
    if not slow.exists():
        slow.symlink_to(model_files["tiny"])
    config = model("fast", model_files["tiny2"]) + model("slow", slow)
    daemon: Daemon = make_daemon(config, extra_env=delayed | {"MMD_TEST_LOAD_DELAY": "4"})
    infer(daemon, "fast")
    with ThreadPoolExecutor(1) as pool:
        slow_request = pool.submit(infer, daemon, "slow")
        assert wait_until(lambda: state_of(daemon, "slow")["state"] == "loading", timeout=10)
        started = time.monotonic()
        for _ in range(3):
            assert infer(daemon, "fast").completion_tokens == 4
        served_during_load = state_of(daemon, "slow")["state"] == "loading"
        assert served_during_load, "the slow load finished before the fast requests"
        assert time.monotonic() - started < 4
        assert slow_request.result().completion_tokens == 4


def test_client_cancel_aborts_the_upstream_generation(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(model("b", model_files["m50"], ctx=2048))
    call = daemon.stub.Infer(pb.InferRequest(model_id="b", prompt="go", max_tokens=1800))
    pieces = 0
    for chunk in call:
        pieces += chunk.WhichOneof("kind") == "text"
        if pieces == 5:
            break
    call.cancel()
    child_socket = paths.child_socket(paths.children_dir(daemon.socket), "b")
    transport = httpx.HTTPTransport(uds=str(child_socket))

    def slot_idle() -> bool:
        with httpx.Client(transport=transport, base_url="http://child") as client:
            slots = client.get("/slots").json()
        return not any(slot["is_processing"] for slot in slots)

    # 1800 tokens take ~10 s; the slot frees long before that.
    assert wait_until(slot_idle, timeout=5)
    assert wait_until(lambda: health(daemon)["active_inferences"] == 0, timeout=5)
    assert infer(daemon, "b").completion_tokens == 4


def test_kill_of_a_child_mid_stream_fails_the_request_and_reloads(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    config = model("b", model_files["m50"], ctx=2048) + model("t", model_files["tiny"])
    daemon: Daemon = make_daemon(config)
    infer(daemon, "t")
    call = daemon.stub.Infer(pb.InferRequest(model_id="b", prompt="go", max_tokens=1800))
    first = next(iter(call))
    assert first.WhichOneof("kind") == "text"
    pid = state_of(daemon, "b")["pid"]
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:
            pass
    assert time.monotonic() - killed_at < 3
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    details = err.value.details() or ""
    assert "'b'" in details
    assert "SIGKILL" in details
    failed = state_of(daemon, "b")
    assert failed["state"] == "failed"
    assert failed["log_tail"]
    assert infer(daemon, "t").completion_tokens == 4  # the other model kept serving
    assert infer(daemon, "b").completion_tokens == 4  # reloaded on the next request
    assert state_of(daemon, "b")["pid"] not in (0, pid)


def test_keep_alive_zero_and_expiry(make_daemon: Any, model_files: dict[str, Path]) -> None:
    config = model("t", model_files["tiny"], keep_alive="1s") + model(
        "u", model_files["tiny2"], keep_alive="10m"
    )
    daemon: Daemon = make_daemon(config)
    infer(daemon, "t")
    assert state_of(daemon, "t")["state"] == "ready"
    assert wait_until(lambda: state_of(daemon, "t")["state"] == "unloaded", timeout=10)

    # A request's own keep-alive 0 unloads at once, and does not change the model's setting.
    infer(daemon, "u", keep_alive_seconds=0)
    assert wait_until(lambda: state_of(daemon, "u")["state"] == "unloaded", timeout=5)
    infer(daemon, "u")
    time.sleep(1.5)
    ready = state_of(daemon, "u")
    assert ready["state"] == "ready"
    assert ready["keep_alive_seconds"] == 600


def test_unload_waits_or_aborts_with_force(make_daemon: Any, model_files: dict[str, Path]) -> None:
    daemon: Daemon = make_daemon(model("b", model_files["m50"], ctx=2048, parallel=2))
    infer(daemon, "b")
    with ThreadPoolExecutor(2) as pool:
        # Two slots share ctx 2048: at most ~1000 tokens each.
        running = pool.submit(infer, daemon, "b", 900)
        wait_active(daemon, 1)
        timed_out = daemon.mmctl("unload", "b", "--timeout", "0.5")
        assert timed_out.returncode == 1
        assert "still has 1 running" in timed_out.stderr.decode()
        assert state_of(daemon, "b")["state"] == "ready"
        waited = daemon.mmctl("unload", "b", "--timeout", "60")
        assert waited.returncode == 0, waited.stderr
        assert running.result().completion_tokens == 900  # finished before the unload
    assert state_of(daemon, "b")["state"] == "unloaded"

    infer(daemon, "b")
    with ThreadPoolExecutor(1) as pool:
        doomed = pool.submit(infer, daemon, "b", 900)
        wait_active(daemon, 1)
        forced = daemon.mmctl("unload", "b", "--force", "--json")
        assert forced.returncode == 0, forced.stderr
        assert json.loads(forced.stdout)["aborted_requests"] == 1
        with pytest.raises(grpc.RpcError) as err:
            doomed.result()
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert "unloaded by an operator" in (err.value.details() or "")
    assert state_of(daemon, "b")["state"] == "unloaded"
    assert not daemon.children()


def test_sixty_four_clients_three_models_every_request_accounted(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    from test_placement_e2e import RssSampler

    budget = 250 * 1024 * 1024
    config = f'[budget]\nram = "{budget}"\n[scheduler]\nmax_queue = 48\nmax_concurrent = 6\n'
    config += model("a", model_files["m40"], ctx=512, parallel=2)
    config += model("b", model_files["m50"], ctx=512, parallel=2)
    config += model("c", model_files["m60"], ctx=512, parallel=2)
    daemon: Daemon = make_daemon(config)
    ledger: dict[str, int] = {}
    details: list[str] = []
    lock = threading.Lock()
    sent = 0

    def client(index: int) -> None:
        nonlocal sent
        for round_ in range(3):
            model_id = "abc"[(index + round_) % 3]
            # Every eighth client gives up quickly: a deadline that cancels its request.
            timeout = 0.3 if index % 8 == 0 else 120
            with lock:
                sent += 1
            try:
                request = pb.InferRequest(model_id=model_id, prompt="go", max_tokens=8)
                chunks = list(daemon.stub.Infer(request, timeout=timeout))
                outcome = "completed" if chunks[-1].done.completion_tokens == 8 else "short"
            except grpc.RpcError as err:
                outcome = err.code().name
                details.append(f"{outcome}: {err.details()}")
            with lock:
                ledger[outcome] = ledger.get(outcome, 0) + 1

    with RssSampler(daemon) as sampler, ThreadPoolExecutor(64) as pool:
        list(pool.map(client, range(64)))
    assert sent == 192
    assert sum(ledger.values()) == sent, ledger
    allowed = {"completed", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED"}
    assert set(ledger) <= allowed, (ledger, [d for d in details if "UNAVAILABLE" in d])
    assert ledger["completed"] >= 100, ledger
    assert sampler.peak <= budget, f"children held {sampler.peak} bytes > {budget}"
    final = health(daemon)
    assert final["active_inferences"] == 0
    assert final["queued_requests"] == 0


def test_cancelled_clients_leave_no_slot_or_queue_entry_behind(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    config = "[scheduler]\nmax_concurrent = 1\nmax_queue = 500\n" + model(
        "b", model_files["m50"], ctx=2048
    )
    daemon: Daemon = make_daemon(config)
    infer(daemon, "b")
    calls = [
        daemon.stub.Infer(pb.InferRequest(model_id="b", prompt="go", max_tokens=1500))
        for _ in range(200)
    ]
    assert wait_until(lambda: health(daemon)["queued_requests"] >= 150, timeout=30)
    for call in calls:
        call.cancel()
    codes = set()
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        codes.add(err.value.code())
    assert codes == {grpc.StatusCode.CANCELLED}
    settled = wait_until(
        lambda: (health(daemon)["active_inferences"], health(daemon)["queued_requests"]) == (0, 0),
        timeout=15,
    )
    assert settled, json.dumps(health(daemon)["models"], indent=1)[:3000]
    assert infer(daemon, "b").completion_tokens == 4


def test_a_burst_beyond_the_transports_pending_limit_is_served_in_full(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    """grpc-core's own pending-call limit (1,000 by default) must not cancel a burst."""
    import asyncio
    from collections import Counter

    from mmd.v1 import mmd_pb2_grpc

    config = "[scheduler]\nmax_concurrent = 2\nmax_queue = 5000\n" + model(
        "t", model_files["tiny"], parallel=2
    )
    daemon: Daemon = make_daemon(config)

    async def burst(count: int) -> Counter[str]:
        outcomes: Counter[str] = Counter()
        async with grpc.aio.insecure_channel(f"unix:{daemon.socket}") as channel:
            stub = mmd_pb2_grpc.ModelManagerStub(channel)
            request = pb.InferRequest(model_id="t", prompt="go", max_tokens=2)

            async def one() -> None:
                try:
                    async for _ in stub.Infer(request, timeout=300):
                        pass
                    outcomes["ok"] += 1
                except grpc.RpcError as err:
                    outcomes[err.code().name] += 1

            await asyncio.gather(*(one() for _ in range(count)))
        return outcomes

    assert asyncio.run(burst(2000)) == Counter(ok=2000)
