"""The benchmarks' floors: the verdict of a row, and the raw client the floors are read with.

Pure functions and a fake llama-server on a Unix socket: no daemon, no model.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

# bench/ is a directory of scripts that import each other by name, not a package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from rawhttp import (
    ConnectionClosed,
    RawClient,
    ResponseReader,
    Timeline,
    busy_rate,
    completed,
    completion_async,
    request_bytes,
)
from verdicts import verdict

# ---------------------------------------------------------------- verdicts


@pytest.mark.parametrize(
    ("ratio", "target_met", "expected"),
    [
        (1.03, True, "floor invalid"),  # mmd faster than its floor: the floor is no floor
        (1.58, True, "floor invalid"),
        (1.02, True, "met"),  # within the noise
        (0.98, True, "met"),
        (0.90, False, "missed"),
        (1.10, None, "floor invalid"),  # an informational row is flagged too
        (0.95, None, "info"),
    ],
)
def test_throughput_ratio_above_the_tolerance_is_an_invalid_floor(
    ratio: float, target_met: bool | None, expected: str
) -> None:
    assert verdict(target_met, ratio=ratio, better="higher")[0] == expected


@pytest.mark.parametrize(
    ("ratio", "expected"),
    [(0.026, "floor invalid"), (0.97, "floor invalid"), (0.99, "met"), (1.4, "met")],
)
def test_latency_ratio_below_the_tolerance_is_an_invalid_floor(ratio: float, expected: str) -> None:
    assert verdict(True, ratio=ratio, better="lower")[0] == expected


@pytest.mark.parametrize(
    ("added", "target_met", "expected"),
    [(-0.1, True, "floor invalid"), (-1.30, True, "floor invalid"), (0.0, True, "met"),
     (2.75, False, "missed"), (0.4, None, "info")],
)  # fmt: skip
def test_negative_added_latency_is_an_invalid_floor(
    added: float, target_met: bool | None, expected: str
) -> None:
    assert verdict(target_met, added=added)[0] == expected


def test_a_benchmarks_own_problem_overrides_a_met_target() -> None:
    judged, why = verdict(True, ratio=1.0, problem="0 evictions in 4 swaps")
    assert (judged, why) == ("floor invalid", "0 evictions in 4 swaps")


def test_the_reason_names_how_far_mmd_beat_its_floor() -> None:
    judged, why = verdict(True, ratio=1.75, better="higher")
    assert judged == "floor invalid"
    assert "1.750x" in why


def test_an_estimate_may_err_either_way() -> None:
    assert verdict(True, ratio=0.5, better="")[0] == "met"
    assert verdict(False, ratio=1.5, better="")[0] == "missed"


@pytest.mark.parametrize("ratio", [float("nan"), float("inf"), 0.0, -1.0])
def test_a_ratio_that_is_no_measurement_is_an_invalid_floor(ratio: float) -> None:
    assert verdict(True, ratio=ratio, better="higher")[0] == "floor invalid"


# ---------------------------------------------------------------- the raw client's parser


def _chunk(payload: bytes) -> bytes:
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


def _event(body: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


HEAD = (
    b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5, max=100\r\nTransfer-Encoding: chunked\r\n"
    b"Server: llama.cpp\r\nContent-Type: text/event-stream\r\n\r\n"
)
TIMINGS = {"prompt_n": 46, "prompt_ms": 0.946, "predicted_n": 4, "predicted_ms": 0.273,
           "predicted_per_second": 14652.0}  # fmt: skip
FINAL = {"index": 0, "content": "", "stop": True, "tokens_predicted": 4, "timings": TIMINGS}
# As llama-server streams a 4-token answer: the first event may carry no text.
STREAM = (
    HEAD
    + _chunk(_event({"index": 0, "content": "", "stop": False}))
    + b"".join(_chunk(_event({"content": c, "stop": False})) for c in "ab\r\n")
    + _chunk(_event(FINAL))
    + b"0\r\n\r\n"
)


def _feed_in_pieces(data: bytes, size: int) -> ResponseReader:
    reader = ResponseReader()
    for i in range(0, len(data), size):
        assert not reader.done, f"done before byte {i}"
        reader.feed(data[i : i + size])
    return reader


@pytest.mark.parametrize("size", [1, 2, 7, 64, len(STREAM)])
def test_a_stream_split_anywhere_gives_its_closing_event(size: int) -> None:
    reader = _feed_in_pieces(STREAM, size)
    assert reader.done
    assert reader.has_text
    assert reader.final == FINAL
    done = completed(reader, 1.0, 1.5, 2.0)
    assert (done.tokens, done.timings["predicted_ms"], done.total_ms) == (4, 0.273, 1000.0)


def test_the_first_text_is_seen_with_the_event_that_carries_it() -> None:
    reader = ResponseReader()
    reader.feed(HEAD + _chunk(_event({"content": "", "stop": False})))
    assert not reader.has_text
    reader.feed(_chunk(_event({"content": "x", "stop": False})))
    assert reader.has_text
    assert not reader.done


def test_a_plain_response_is_read_by_its_length() -> None:
    reader = _feed_in_pieces(
        b'HTTP/1.1 503 Service Unavailable\r\nContent-Length: 20\r\n\r\n{"error":"loading"}\n', 5
    )
    assert (reader.done, reader.status, reader.keep_alive) == (True, 503, True)
    with pytest.raises(RuntimeError, match="503"):
        completed(reader, 0.0, 0.0, 0.0)


def test_a_stream_without_a_closing_event_is_an_error() -> None:
    reader = _feed_in_pieces(
        HEAD + _chunk(_event({"content": "a", "stop": False})) + b"0\r\n\r\n", 9
    )
    assert reader.done
    with pytest.raises(RuntimeError, match="no closing event"):
        completed(reader, 0.0, 0.0, 0.0)


def test_request_bytes_carry_the_body_length() -> None:
    request = request_bytes("POST", "/completion", {"prompt": "é"})
    head, _, body = request.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    assert json.loads(body) == {"prompt": "é"}


# ---------------------------------------------------------------- llama-server's own rate


def test_busy_rate_counts_overlapping_work_once_and_skips_gaps() -> None:
    # Busy [0, 1], [0.5, 1.5] and [4, 5]: 2.5 s of work for 30 tokens.
    spans = [(1.0, 1.0, 10), (1.5, 1.0, 10), (5.0, 1.0, 10)]
    assert busy_rate(spans) == pytest.approx(12.0)


def test_busy_rate_of_nested_work() -> None:
    assert busy_rate([(3.0, 3.0, 30), (2.0, 1.0, 30)]) == pytest.approx(20.0)


def test_busy_rate_without_work_is_zero() -> None:
    assert busy_rate([]) == 0.0


# ---------------------------------------------------------------- against a fake llama-server


def _close(listener: socket.socket) -> None:
    listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept(); close() does not
    listener.close()


@pytest.fixture
def fake_server(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """A Unix socket that drops its first connection unanswered, then answers each with STREAM
    (closing it, as llama-server does after a stream) or, for GET, a kept-alive 200."""
    path = tmp_path / "llama.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    seen: list[str] = []

    def serve() -> None:
        first = True
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                if first:
                    first = False
                    conn.recv(65536)
                    continue  # closed without an answer
                while data := conn.recv(65536):
                    seen.append(data.split(b" ", 2)[1].decode())
                    if data.startswith(b"GET"):
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        continue
                    conn.sendall(STREAM)
                    break

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, seen
    _close(listener)
    thread.join(5)


def test_the_blocking_client_sends_again_after_an_unanswered_close(
    fake_server: tuple[Path, list[str]],
) -> None:
    path, seen = fake_server
    with RawClient(path, timeout=5) as client:
        assert client.status("/health") == 200
        done = client.completion({"prompt": "x", "n_predict": 4})  # on the poll's connection
    assert (done.tokens, seen) == (4, ["/health", "/completion"])
    assert 0 < done.first_ms <= done.total_ms


def test_the_event_loop_client_sends_again_after_an_unanswered_close(
    fake_server: tuple[Path, list[str]],
) -> None:
    path, seen = fake_server
    request = request_bytes("POST", "/completion", {"prompt": "x"})

    async def twice() -> list[int]:
        return [(await completion_async(path, request)).tokens for _ in range(2)]

    assert asyncio.run(asyncio.wait_for(twice(), 5)) == [4, 4]
    assert seen == ["/completion", "/completion"]


def test_a_connection_closed_mid_answer_is_not_sent_again(tmp_path: Path) -> None:
    path = tmp_path / "half.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    accepted: list[int] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                accepted.append(1)
                conn.recv(65536)
                conn.sendall(STREAM[: len(HEAD) + 10])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with RawClient(path, timeout=5) as client, pytest.raises(ConnectionClosed):
            client.completion({"prompt": "x"})
    finally:
        _close(listener)
        thread.join(5)
    assert accepted == [1]


# ---------------------------------------------------------------- the swap benchmark's budget


@pytest.mark.parametrize(
    ("planned", "counted"),
    [(100, 100), (100, 70), (70, 100), (100_602_215, 69_975_040), (1, 1)],
)
def test_the_swap_budget_holds_one_model_and_not_two(planned: int, counted: int) -> None:
    from bench_requests import one_not_two  # imports mmd and grpc: only here

    budget = one_not_two(planned, counted)
    assert max(planned, counted) <= budget  # a load is never refused, and fits once alone
    assert counted + planned > budget  # beside a loaded one, the next must evict it


# ---------------------------------------------------------------- OpenAI streams, over TCP too


def _chat(delta: dict[str, object], finish: str | None = None, **extra: object) -> bytes:
    choice = {"finish_reason": finish, "index": 0, "delta": delta}
    return _event({"choices": [choice], "object": "chat.completion.chunk", **extra})


# As llama-server (and mmd's HTTP listener, which relays it) streams a 4-token chat answer:
# a first event with the role and no text, the pieces, the reason with timings, [DONE].
CHAT_STREAM = (
    HEAD
    + _chunk(_chat({"role": "assistant", "content": None}))
    + b"".join(_chunk(_chat({"content": c})) for c in "ab\r\n")
    + _chunk(_chat({}, "length", timings=TIMINGS))
    + _chunk(b"data: [DONE]\n\n")
    + b"0\r\n\r\n"
)


@pytest.mark.parametrize("size", [1, 3, 64, len(CHAT_STREAM)])
def test_a_chat_stream_split_anywhere_gives_its_closing_event(size: int) -> None:
    reader = _feed_in_pieces(CHAT_STREAM, size)
    assert (reader.done, reader.has_text) == (True, True)
    done = completed(reader, 1.0, 1.5, 2.0)
    assert (done.tokens, done.timings["predicted_ms"]) == (4, 0.273)  # by llama-server's timings


def test_a_chat_streams_role_event_is_no_text() -> None:
    reader = ResponseReader()
    reader.feed(HEAD + _chunk(_chat({"role": "assistant", "content": None})))
    assert not reader.has_text
    reader.feed(_chunk(_chat({"content": "x"})))
    assert reader.has_text


def test_a_usage_event_counts_the_tokens() -> None:
    usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    stream = (
        HEAD
        + _chunk(_chat({"content": "a"}))
        + _chunk(_chat({}, "stop"))
        + _chunk(_event({"choices": [], "usage": usage, "timings": TIMINGS}))
        + _chunk(b"data: [DONE]\n\n")
        + b"0\r\n\r\n"
    )
    assert completed(_feed_in_pieces(stream, 5), 0.0, 0.0, 1.0).tokens == 3


def test_an_error_event_is_no_closing_event() -> None:
    stream = (
        HEAD
        + _chunk(_chat({"content": "a"}))
        + _chunk(_event({"error": {"message": "gone", "type": "server_error"}}))
        + b"0\r\n\r\n"
    )
    with pytest.raises(RuntimeError, match="no closing event"):
        completed(_feed_in_pieces(stream, 7), 0.0, 0.0, 0.0)


def test_the_clients_read_a_tcp_listener() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    address = listener.getsockname()
    hosts: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(65536)
                hosts.append(data.split(b"\r\nHost: ", 1)[1].split(b"\r\n", 1)[0])
                conn.sendall(CHAT_STREAM)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    request = request_bytes("POST", "/v1/chat/completions", {"stream": True}, host="localhost")
    try:
        with RawClient(address, timeout=5) as client:
            assert client.send(request).tokens == 4
        assert asyncio.run(asyncio.wait_for(completion_async(address, request), 5)).tokens == 4
    finally:
        _close(listener)
        thread.join(5)
    assert hosts == [b"localhost", b"localhost"]


def test_the_http_benchmark_flags_answers_of_other_lengths() -> None:
    from bench_http import tcp_address, token_problem  # imports mmd and grpc: only here

    assert token_problem({"mmd": [4, 4], "direct": [4]}, 4) == ""
    problem = token_problem({"mmd": [4, 2], "direct": [4]}, 4)
    assert "mmd: [2]" in problem
    assert "direct" not in problem
    assert tcp_address(["unix:/run/h.sock", "http://127.0.0.1:8123"]) == ("127.0.0.1", 8123)
    assert tcp_address(["unix:/run/h.sock"]) is None


# ---------------------------------------------------------------- peers: ahead, level, behind


@pytest.mark.parametrize(
    ("ratio", "better", "expected"),
    [(1.2, "higher", "ahead"), (1.03, "higher", "level"), (0.8, "higher", "behind"),
     (0.8, "lower", "ahead"), (0.97, "lower", "level"), (1.3, "lower", "behind")],
)  # fmt: skip
def test_a_peer_row_reads_ahead_level_or_behind(ratio: float, better: str, expected: str) -> None:
    from verdicts import Better, peer_verdict

    side: Better = "higher" if better == "higher" else "lower"
    assert peer_verdict(ratio, side)[0] == expected


def test_a_peer_that_could_not_run_is_info_with_why() -> None:
    from verdicts import peer_verdict

    assert peer_verdict(None, "higher") == ("info", "no ratio to compare")
    assert peer_verdict(1.5, "higher", problem="router exited 1") == ("info", "router exited 1")


def test_a_peer_may_be_beaten_without_invalidating_the_row() -> None:
    from harness import Figure, Spread

    row = Figure("router", "x", "ms", Spread.of([10.0]), Spread.of([20.0]), "-", None, peer=True)
    assert row.judged() == ("ahead", "")


# ---------------------------------------------------------------- the cores benchmark


def test_llama_servers_defaults_drop_the_thread_and_placement_flags() -> None:
    from harness import without_cpu_flags

    argv = ["llama-server", "-m", "a.gguf", "--threads", "1", "-tb", "1", "--cpu-mask", "0x1",
            "--cpu-strict", "1", "--poll=0", "-c", "2048", "--parallel", "1"]  # fmt: skip
    assert without_cpu_flags(argv) == [
        "llama-server",
        "-m",
        "a.gguf",
        "-c",
        "2048",
        "--parallel",
        "1",
    ]


def _timeline(sent: float, end: float, arrivals: list[tuple[float, int]]) -> Timeline:
    return Timeline(sent, end, arrivals, arrivals[-1][1] if arrivals else 0, {}, False)


def test_a_streams_tokens_by_a_moment_count_what_had_arrived() -> None:
    t = _timeline(0.0, 2.0, [(0.5, 1), (1.0, 5), (2.0, 9)])
    assert [t.tokens_by(m) for m in (0.1, 0.5, 1.5, 3.0)] == [0, 1, 5, 9]
    assert t.wall_rate == 4.5


def test_rates_together_count_only_until_the_first_stream_ended() -> None:
    from bench_cores import rates_while_all_ran  # imports mmd and grpc: only here

    fast = _timeline(0.0, 1.0, [(0.5, 10), (1.0, 20)])
    slow = _timeline(0.0, 3.0, [(0.5, 2), (1.0, 5), (3.0, 20)])
    assert rates_while_all_ran({"fast": fast, "slow": slow}) == {"fast": 20.0, "slow": 5.0}


@pytest.mark.parametrize("sizes", [(100, 100, 300, 250), (98, 70, 260, 240), (5, 9, 9, 5)])
def test_the_router_swap_budget_holds_either_model_and_not_both(
    sizes: tuple[int, int, int, int],
) -> None:
    from bench_router import one_of_two

    pa, ca, pb, cb = sizes
    needs = {"a": {"planned": pa, "counted": ca}, "b": {"planned": pb, "counted": cb}}
    budget = one_of_two(needs)
    assert max(sizes) <= budget
    assert ca + pb > budget
    assert cb + pa > budget


def test_the_overcommit_budget_holds_two_models_and_not_three() -> None:
    from bench_router import two_of_three

    needs = {"a": {"planned": 100, "counted": 90}, "b": {"planned": 260, "counted": 280},
             "c": {"planned": 100, "counted": 95}}  # fmt: skip
    budget = two_of_three(needs)
    assert 280 + 100 <= budget < 280 + 100 + 100


def test_a_swap_is_cut_into_phases_by_the_daemon_events() -> None:
    from bench_requests import swap_phases

    def model(model_id: str, state: str, at: float) -> dict[str, object]:
        return {"type": "model", "model_id": model_id, "state": state, "time": at}

    events = [
        model("a", "ready", 99.0),  # before the swap: not part of it
        model("a", "stopping", 100.001),
        model("a", "unloaded", 100.008),
        model("b", "loading", 100.009),
        {"type": "request", "model_id": "b", "time": 100.05},
        model("b", "ready", 100.150),
    ]
    phases = swap_phases(events, [(100.0, "b", "a")], [180.0])
    assert phases == {
        "stopped": pytest.approx([8.0]),
        "started": pytest.approx([1.0]),
        "ready": pytest.approx([141.0]),
        "first": pytest.approx([30.0]),
    }
    # A swap whose events are missing (the watcher lagged) is left out, not guessed.
    assert swap_phases(events[:3], [(100.0, "b", "a")], [180.0])["ready"] == []
