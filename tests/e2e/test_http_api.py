"""The HTTP front door with real clients: the official openai library, curl and httpx,
against the real daemon with real llama-server children on synthetic models."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from conftest import Daemon, wait_until
from test_scheduling_e2e import DELAYED, model

from mmd.runtime.server import resolve_llama_server
from mmd.v1 import mmd_pb2 as pb

HTTP = '[http]\nlisten = ["127.0.0.1:0"]\n'
KEY = "test-key-0123456789abcdef"


def http_base(daemon: Daemon) -> str:
    """The daemon's HTTP address (it bound a free port: the config said 0)."""
    health = daemon.stub.GetHealth(pb.GetHealthRequest(), timeout=10)
    tcp = [a for a in health.http_listen if a.startswith("http://")]
    assert tcp, f"no HTTP listener in {list(health.http_listen)}"
    return tcp[0]


def client(daemon: Daemon, key: str = "unused", retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=http_base(daemon) + "/v1", api_key=key, max_retries=retries)


def slow_loading(
    model_files: dict[str, Path], name: str, delay: int
) -> tuple[Path, dict[str, str]]:
    """A tiny model whose load takes ``delay`` seconds (tests/delayed_llama_server.sh,
    which delays paths containing "slow"), and the environment that makes it so."""
    slow = model_files["tiny"].with_name(name)
    if not slow.exists():
        slow.symlink_to(model_files["tiny"])
    env = {
        "MMD_LLAMA_SERVER": str(DELAYED),
        "MMD_TEST_REAL_LLAMA_SERVER": str(resolve_llama_server(None).path),
        "MMD_TEST_LOAD_DELAY": str(delay),
    }
    return slow, env


def listening_tcp_ports(pid: int) -> list[int]:
    return [
        c.laddr.port
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]


@pytest.fixture
def daemon(make_daemon: Any, model_files: dict[str, Path]) -> Daemon:
    config = HTTP + model("tiny", model_files["tiny"], ctx=256)
    config += model("emb", model_files["embed"], ctx=256, embedding=True)
    return make_daemon(config)  # type: ignore[no-any-return]


def test_without_http_nothing_listens_on_tcp(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(model("tiny", model_files["tiny"]))
    assert daemon.process is not None
    assert listening_tcp_ports(daemon.process.pid) == []
    health = daemon.stub.GetHealth(pb.GetHealthRequest(), timeout=10)
    assert list(health.http_listen) == []


def test_openai_streaming_chat(daemon: Daemon) -> None:
    assert daemon.process is not None
    port = int(http_base(daemon).rsplit(":", 1)[1])
    assert listening_tcp_ports(daemon.process.pid) == [port]
    stream = client(daemon).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "say hi"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        assert chunk.model == "tiny"
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    assert finish == "length"
    assert usage is not None
    assert usage.completion_tokens == 5
    assert "".join(pieces)
    # The request went through mmd's scheduler: it is in its accounting.
    models = json.loads(daemon.mmctl("ps", "--json").stdout)
    assert [m["id"] for m in models] == ["tiny"]


def test_openai_completion_and_embeddings(daemon: Daemon) -> None:
    api = client(daemon)
    answer = api.completions.create(model="tiny", prompt="once upon", max_tokens=4)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 4
    vectors = api.embeddings.create(model="emb", input=["one", "two words"])
    assert [len(v.embedding) for v in vectors.data] == [128, 128]
    assert vectors.data[0].embedding != vectors.data[1].embedding
    listed = {m.id for m in api.models.list()}
    assert listed == {"tiny", "emb"}


def test_openai_errors_have_mmd_statuses(daemon: Daemon) -> None:
    api = client(daemon)
    with pytest.raises(openai.NotFoundError) as unknown:
        api.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert "unknown model 'nope'" in unknown.value.message
    assert unknown.value.code == "unknown_model"
    with pytest.raises(openai.BadRequestError) as empty:
        api.chat.completions.create(model="tiny", messages=[])
    assert "messages must be a non-empty list" in empty.value.message
    with pytest.raises(openai.BadRequestError) as hot:
        api.completions.create(model="tiny", prompt="x", temperature=9)
    assert "temperature must be between 0 and 5" in hot.value.message
    with pytest.raises(openai.BadRequestError) as not_embedding:
        api.embeddings.create(model="tiny", input="x")
    assert "does not serve embeddings" in not_embedding.value.message
    base = http_base(daemon)
    bad_json = httpx.post(
        base + "/v1/completions", content=b"{", headers={"Content-Type": "application/json"}
    )
    assert bad_json.status_code == 400
    assert bad_json.json()["error"]["code"] == "invalid_request"
    too_big = httpx.post(
        base + "/v1/completions", json={"model": "tiny", "prompt": "x" * (3 * 1024 * 1024)}
    )
    assert too_big.status_code == 413
    assert "larger than" in too_big.json()["error"]["message"]
    missing = httpx.get(base + "/v1/nothing")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    # The daemon serves on after all of that.
    assert api.completions.create(model="tiny", prompt="ok", max_tokens=2).choices


def test_prompt_over_max_prompt_bytes_is_refused(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(
        HTTP + model("tiny", model_files["tiny"]), daemon_extra="max_prompt_bytes = 1000\n"
    )
    with pytest.raises(openai.BadRequestError) as refused:
        client(daemon).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "é" * 600}]
        )
    assert "prompt is 1200 bytes; the limit is 1000" in refused.value.message


def test_queue_full_is_429_with_retry_after(make_daemon: Any, model_files: dict[str, Path]) -> None:
    slow, env = slow_loading(model_files, "slow-q.gguf", delay=3)
    config = HTTP + "[scheduler]\nmax_queue = 1\n" + model("slow", slow)
    daemon: Daemon = make_daemon(config, extra_env=env)
    base = http_base(daemon)
    body = {"model": "slow", "prompt": "go", "max_tokens": 2}

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as http:
            first = asyncio.create_task(http.post(base + "/v1/completions", json=body))
            for _ in range(200):  # until the first waits in the queue behind the load
                health = (await http.get(base + "/health")).json()
                if health["queued_requests"] == 1:
                    break
                await asyncio.sleep(0.02)
            refused = await http.post(base + "/v1/completions", json=body)
            return await first, refused

    first, refused = asyncio.run(scenario())
    assert first.status_code == 200, first.text
    assert first.json()["usage"]["completion_tokens"] == 2
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    assert refused.json()["error"]["type"] == "rate_limit_error"


def test_closing_a_stream_frees_its_slot(make_daemon: Any, model_files: dict[str, Path]) -> None:
    config = HTTP + "[scheduler]\nmax_concurrent = 1\n"
    config += model("b", model_files["m50"], ctx=2048, parallel=1)
    daemon: Daemon = make_daemon(config)
    api = client(daemon)
    stream = api.chat.completions.create(
        model="b", messages=[{"role": "user", "content": "go"}], max_tokens=1900, stream=True
    )
    for received, _ in enumerate(stream, 1):
        if received == 3:
            break
    stream.close()
    health = lambda: json.loads(daemon.mmctl("health", "--json").stdout)  # noqa: E731
    assert wait_until(lambda: health()["active_inferences"] == 0, timeout=10)
    # The slot is free: the next request is served at once, not after 1,900 tokens.
    answer = api.completions.create(model="b", prompt="x", max_tokens=2)
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 2
    watch = daemon.log_path.read_text()
    assert "Traceback" not in watch


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_streams_server_sent_events(daemon: Daemon) -> None:
    base = http_base(daemon)
    body = json.dumps(
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "stream": True,
        }
    )
    result = subprocess.run(
        [
            "curl",
            "-sSN",
            "--fail-with-body",
            base + "/v1/chat/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    events = [line for line in result.stdout.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_admin_endpoints_match_mmctl_json(daemon: Daemon) -> None:
    base = http_base(daemon)
    with httpx.Client(base_url=base, timeout=60) as http:
        loaded = http.post("/load", json={"model": "tiny"})
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["state"] == "ready"
        over_http = http.get("/models").json()
        over_grpc = json.loads(daemon.mmctl("models", "--json").stdout)
        assert [set(m) for m in over_http] == [set(m) for m in over_grpc]
        assert [(m["id"], m["state"], m["pid"]) for m in over_http] == [
            (m["id"], m["state"], m["pid"]) for m in over_grpc
        ]
        answer = http.post("/infer", json={"model": "tiny", "prompt": "hi", "max_tokens": 3})
        cli = json.loads(daemon.mmctl("infer", "tiny", "hi", "--max-tokens", "3", "--json").stdout)
        assert set(answer.json()) == set(cli)
        assert set(answer.json()["timings"]) == set(cli["timings"])
        assert answer.json()["completion_tokens"] == 3
        health = http.get("/health").json()
        cli_health = json.loads(daemon.mmctl("health", "--json").stdout)
        assert set(health) == set(cli_health)
        assert health["http_listen"] == [base]
        unloaded = http.post("/unload", json={"model": "tiny"})
        assert unloaded.json()["state"] == "unloaded"
        assert unloaded.json()["aborted_requests"] == 0
        unknown = http.post("/load", json={"model": "nope"})
        assert unknown.status_code == 404


def test_load_that_cannot_fit_is_507(make_daemon: Any, model_files: dict[str, Path]) -> None:
    config = HTTP + '[budget]\nram = "20MiB"\n' + model("b", model_files["m50"])
    daemon: Daemon = make_daemon(config)
    response = httpx.post(http_base(daemon) + "/load", json={"model": "b"}, timeout=60)
    assert response.status_code == 507
    assert response.json()["error"]["code"] == "insufficient_memory"
    assert response.headers["X-Mmd-Error"] == "insufficient_memory"


def test_insufficient_memory_status_503_for_a_load_balancer(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    """Behind HAProxy (whose retry-on takes 503, not 507) the same refusal is a 503, still
    named insufficient_memory in the body and the X-Mmd-Error header; other errors keep
    their statuses."""
    config = HTTP.replace("]\n", "]\ninsufficient_memory_status = 503\n", 1)
    config += '[budget]\nram = "20MiB"\n' + model("b", model_files["m50"])
    daemon: Daemon = make_daemon(config)
    base = http_base(daemon)
    body = {"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    response = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "insufficient_memory"
    assert response.headers["X-Mmd-Error"] == "insufficient_memory"
    unknown = httpx.post(base + "/v1/chat/completions", json={**body, "model": "x"}, timeout=60)
    assert unknown.status_code == 404
    assert unknown.headers["X-Mmd-Error"] == "unknown_model"


def test_streamed_admin_infer(daemon: Daemon) -> None:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", http_base(daemon) + "/infer", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line]
    assert all("text" in e for e in events[:-1])
    assert events[-1]["completion_tokens"] == 4
    assert "".join(e["text"] for e in events[:-1]) == events[-1]["text"]


def test_api_keys_are_required_everywhere(
    make_daemon: Any, model_files: dict[str, Path], tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# mmd keys\n{KEY}\n")
    keys.chmod(0o600)
    config = f'[http]\nlisten = ["127.0.0.1:0"]\napi_keys_file = "{keys}"\n'
    daemon: Daemon = make_daemon(config + model("tiny", model_files["tiny"]))
    base = http_base(daemon)
    with pytest.raises(openai.AuthenticationError):
        client(daemon, key="wrong-key-0123456789").models.list()
    for path in ("/health", "/models", "/v1/models"):
        refused = httpx.get(base + path)
        assert refused.status_code == 401, path
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    answer = client(daemon, key=KEY).completions.create(model="tiny", prompt="x", max_tokens=2)
    assert answer.choices[0].finish_reason == "length"


def test_cross_site_post_and_foreign_host_are_refused(daemon: Daemon) -> None:
    base = http_base(daemon)
    port = base.rsplit(":", 1)[1]
    body = {"model": "tiny"}
    cross = httpx.post(base + "/load", json=body, headers={"Origin": "http://evil.example"})
    assert cross.status_code == 403
    assert cross.json()["error"]["code"] == "forbidden"
    # A page that rebinds its own name to 127.0.0.1 still sends its own Host.
    rebound = httpx.get(base + "/models", headers={"Host": f"evil.example:{port}"})
    assert rebound.status_code == 403
    same = httpx.post(base + "/load", json=body, headers={"Origin": base}, timeout=60)
    assert same.status_code == 200
    assert "access-control-allow-origin" not in {k.lower() for k in same.headers}


def test_unix_socket_listener(make_daemon: Any, model_files: dict[str, Path]) -> None:
    sock = Path(f"/tmp/mmd-http-{os.getpid()}-{time.monotonic_ns() % 100000}.sock")
    config = f'[http]\nlisten = ["unix:{sock}"]\n' + model("tiny", model_files["tiny"])
    daemon: Daemon = make_daemon(config)
    try:
        assert oct(sock.stat().st_mode & 0o777) == oct(0o660)
        transport = httpx.HTTPTransport(uds=str(sock))
        with httpx.Client(transport=transport, base_url="http://mmd") as http:
            answer = http.post(
                "/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2}
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["completion_tokens"] == 2
        assert daemon.process is not None
        assert listening_tcp_ports(daemon.process.pid) == []
        daemon.stop()
        assert not sock.exists()
    finally:
        sock.unlink(missing_ok=True)


def test_network_address_without_keys_is_refused_at_start(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(
        '[http]\nlisten = ["0.0.0.0:0"]\n' + model("tiny", model_files["tiny"]), start=False
    )
    result = start_refused(daemon)
    assert result.returncode == 2
    line = result.stderr.decode().strip()
    assert "can be reached from other machines; set api_keys" in line
    assert "Traceback" not in line


def start_refused(daemon: Daemon) -> subprocess.CompletedProcess[bytes]:
    """Start mmd in the foreground with ``daemon``'s config, for a start it must refuse."""
    import sys

    daemon.write_config()
    return subprocess.run(
        [sys.executable, "-m", "mmd", "--config", str(daemon.config_path)],
        capture_output=True,
        env=daemon.env(),
        timeout=30,
        check=False,
    )


def test_sixty_four_http_clients_three_models_every_request_accounted(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    """Three models that do not fit together: the scheduler evicts between them while 64
    clients send 192 requests; each ends as an answer, a 429 or the client's own timeout."""
    from test_placement_e2e import RssSampler

    budget = 250 * 1024 * 1024
    config = HTTP + f'[budget]\nram = "{budget}"\n[scheduler]\nmax_queue = 48\n'
    config += "max_concurrent = 6\n"
    config += model("a", model_files["m40"], ctx=512, parallel=2)
    config += model("b", model_files["m50"], ctx=512, parallel=2)
    config += model("c", model_files["m60"], ctx=512, parallel=2)
    daemon: Daemon = make_daemon(config)
    base = http_base(daemon)
    ledger: dict[str, int] = {}
    sent = 0

    async def one(http: httpx.AsyncClient, index: int, round_: int) -> str:
        model_id = "abc"[(index + round_) % 3]
        body: dict[str, Any] = {"model": model_id, "prompt": "go", "max_tokens": 8}
        if index % 2:
            body = {
                "model": model_id,
                "messages": [{"role": "user", "content": "go"}],
                "max_tokens": 8,
            }
        path = "/v1/completions" if index % 2 == 0 else "/v1/chat/completions"
        # Every eighth client gives up quickly: its request is cancelled mid-way.
        timeout = 0.3 if index % 8 == 0 else 120
        try:
            response = await http.post(base + path, json=body, timeout=timeout)
        except httpx.TimeoutException:
            return "client timeout"
        if response.status_code != 200:
            return f"{response.status_code} {response.json()['error']['code']}"
        tokens = response.json()["usage"]["completion_tokens"]
        return "completed" if tokens == 8 else f"short {tokens}"

    async def client_loop(http: httpx.AsyncClient, index: int) -> None:
        nonlocal sent
        for round_ in range(3):
            sent += 1
            outcome = await one(http, index, round_)
            ledger[outcome] = ledger.get(outcome, 0) + 1

    async def everyone() -> None:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(limits=limits) as http:
            await asyncio.gather(*(client_loop(http, i) for i in range(64)))

    with RssSampler(daemon) as sampler:
        asyncio.run(everyone())
    assert sent == 192
    assert sum(ledger.values()) == sent, ledger
    assert set(ledger) <= {"completed", "429 queue_full", "client timeout"}, ledger
    assert ledger["completed"] >= 100, ledger
    assert sampler.peak <= budget, f"children held {sampler.peak} bytes > {budget}"
    final = json.loads(daemon.mmctl("health", "--json").stdout)
    assert final["active_inferences"] == 0
    assert final["queued_requests"] == 0
    log = daemon.log_path.read_text()
    assert "unloaded evicted" in log  # the three took turns
    assert "Traceback" not in log


def test_keep_alive_field_warning_header_and_autoload_off(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    config = HTTP + "[scheduler]\nautoload = false\n" + model("tiny", model_files["tiny"])
    daemon: Daemon = make_daemon(config)
    base = http_base(daemon)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with httpx.Client(base_url=base, timeout=60) as http:
        refused = http.post("/v1/chat/completions", json=chat)
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "failed_precondition"
        assert http.post("/load", json={"model": "tiny"}).status_code == 200
        # The synthetic model has no chat template: the answer says so in a header.
        answered = http.post("/v1/chat/completions", json={**chat, "keep_alive": 0})
        assert answered.status_code == 200, answered.text
        assert "no chat template" in answered.headers["X-Mmd-Warning"]
        # keep_alive 0: unloaded as soon as the request is done.
        state = lambda: http.get("/models").json()[0]["state"]  # noqa: E731
        assert wait_until(lambda: state() == "unloaded", timeout=10)
        bad = http.post("/v1/chat/completions", json={**chat, "keep_alive": "soon"})
        assert bad.status_code == 400
        assert bad.json()["error"]["message"].startswith("keep_alive:")


def test_world_readable_keys_file_is_refused_at_start(
    make_daemon: Any, model_files: dict[str, Path], tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    keys.chmod(0o644)
    config = f'[http]\nlisten = ["127.0.0.1:0"]\napi_keys_file = "{keys}"\n'
    daemon: Daemon = make_daemon(config + model("tiny", model_files["tiny"]), start=False)
    result = start_refused(daemon)
    assert result.returncode == 2
    assert result.stderr.decode().strip().endswith("is readable by every user; chmod o-r it")


def test_shutdown_answers_waiting_http_requests(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    """A request waiting on a load when the daemon stops gets 503 "aborted", not a reset."""
    slow, env = slow_loading(model_files, "slow-s.gguf", delay=4)
    daemon: Daemon = make_daemon(HTTP + model("slow", slow), extra_env=env)
    base = http_base(daemon)

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(timeout=60) as http:
            waiting = asyncio.create_task(
                http.post(base + "/v1/completions", json={"model": "slow", "prompt": "go"})
            )
            for _ in range(200):
                if (await http.get(base + "/health")).json()["queued_requests"] == 1:
                    break
                await asyncio.sleep(0.02)
            assert daemon.process is not None
            daemon.process.terminate()
            return await waiting

    answer = asyncio.run(scenario())
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "aborted"
    assert daemon.process is not None
    assert daemon.process.wait(30) == 0


def test_unix_listener_replaces_a_stale_socket_and_refuses_anything_else(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    import socket as socketlib

    sock = Path(f"/tmp/mmd-http-{os.getpid()}-{time.monotonic_ns() % 100000}.sock")
    config = f'[http]\nlisten = ["unix:{sock}"]\n' + model("tiny", model_files["tiny"])
    try:
        sock.write_text("not a socket")
        refused: Daemon = make_daemon(config, start=False)
        result = start_refused(refused)
        assert result.returncode == 2
        assert "exists and is not a socket of this user's" in result.stderr.decode()
        assert sock.read_text() == "not a socket"  # left as it was
        sock.unlink()
        stale = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
        stale.bind(str(sock))  # bound, never listened on, closed: a dead daemon's leftover
        stale.close()
        daemon: Daemon = make_daemon(config)
        transport = httpx.HTTPTransport(uds=str(sock))
        with httpx.Client(transport=transport, base_url="http://mmd") as http:
            assert http.get("/health").status_code == 200
        assert daemon.stop() == 0
    finally:
        sock.unlink(missing_ok=True)


def test_a_stream_cut_by_a_forced_unload_ends_with_an_error_event(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    config = HTTP + model("b", model_files["m50"], ctx=2048, parallel=1)
    daemon: Daemon = make_daemon(config)
    base = http_base(daemon)
    body = {
        "model": "b",
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 1900,
        "stream": True,
    }
    with (
        httpx.Client(base_url=base, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        unloaded = httpx.post(base + "/unload", json={"model": "b", "force": True}, timeout=60)
        assert unloaded.json()["aborted_requests"] == 1
        events = [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] != "[DONE]"
    error = json.loads(events[-1])["error"]
    assert error["code"] == "aborted"
    assert "unloaded by an operator" in error["message"]
