"""Benchmarks of the HTTP front door: OpenAI chat completions through mmd's [http]
listener against the same request sent straight to llama-server.

Both sides get the same bytes (``POST /v1/chat/completions``, streamed, the same
model, prompt and ``max_tokens``) from the same raw-socket client (bench/rawhttp.py),
alternated request by request (latency) or round by round (throughput) so that drift
on a shared machine falls on both. mmd relays the request to a child started with the
argv the floor's llama-server runs, and the child's answer back unchanged.

The floor's llama-server listens on a Unix socket (mmd's argv), so mmd's listener
is read on a Unix socket too: the added latency is mmd's, not TCP's. One more row
reads mmd's TCP listener (127.0.0.1), for what a client on TCP sees.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bench_requests import DIRECT_CLIENT, Raw, Sizes, daemon_pid, server_cpu_ms
from harness import (
    PROMPT,
    Daemon,
    DirectServer,
    Figure,
    Runtime,
    Spread,
    child_argv_matches,
    percentile,
    share_of,
)
from rawhttp import Address, Completion, RawClient, busy_rate, completion_async, request_bytes

from mmd.runtime.synthetic import write_model

CHAT_PATH = "/v1/chat/completions"
# A name a loopback listener accepts (mmd checks Host on TCP); llama-server ignores it.
HOST = "localhost"
LATENCY_TOKENS = 4  # as the gRPC overhead benchmark: a whole short request
THROUGHPUT_TOKENS = 64
LEVELS = {1: 8, 8: 32, 32: 64}  # clients: requests per round, as the gRPC throughput


def chat_request(model_id: str, max_tokens: int) -> bytes:
    """The request both sides get: one user message, streamed."""
    body = {
        "model": model_id,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    return request_bytes("POST", CHAT_PATH, body, host=HOST)


def tcp_address(listen: list[str]) -> tuple[str, int] | None:
    """The (host, port) of the first http://127.0.0.1:PORT in Health.http_listen."""
    for address in listen:
        if address.startswith("http://127.0.0.1:"):
            return "127.0.0.1", int(address.rsplit(":", 1)[1])
    return None


def token_problem(side: dict[str, list[int]], expected: int) -> str:
    """Why the two sides did not do the same work: answers of other lengths."""
    wrong = {
        name: sorted({n for n in counts if n != expected})
        for name, counts in side.items()
        if any(n != expected for n in counts)
    }
    if not wrong:
        return ""
    found = "; ".join(f"{name}: {counts}" for name, counts in wrong.items())
    return f"answers other than {expected} tokens ({found}): the two sides did different work"


def http_path(work: Path, runtime: Runtime, sizes: Sizes) -> tuple[list[Figure], Raw]:
    root = work / "http"
    tiny = write_model(work / "models" / "http-tiny.gguf", embedding=64, blocks=2)
    gen = write_model(work / "models" / "http-m256x4.gguf", embedding=256, blocks=4, seed=7)
    models = (
        f'[models.tiny]\npath = "{tiny}"\nctx = 512\nparallel = 1\nkeep_alive = -1\n'
        f'[models.gen]\npath = "{gen}"\nctx = 2048\nparallel = 8\nkeep_alive = -1\n'
    )
    http_socket = root / "http.sock"
    settings = (
        "[scheduler]\nmax_concurrent = 32\nmax_queue = 1024\n"
        f'[http]\nlisten = ["unix:{http_socket}", "127.0.0.1:0"]\n'
    )
    daemon = Daemon(root, models, settings).start()
    figures: list[Figure] = []
    raw: Raw = {
        "path": CHAT_PATH,
        "floor": "the same request to a llama-server started with mmd's argv, read by the "
        "same raw-socket client (bench/rawhttp.py); mmd read on a Unix socket as the floor is",
    }
    try:
        tcp = tcp_address(list(daemon.health().http_listen))
        found, raw["latency"] = _latency(root, runtime, sizes, daemon, tiny, http_socket, tcp)
        figures += found
        found, raw["throughput"] = _throughput(root, runtime, sizes, daemon, gen, http_socket)
        figures += found
    finally:
        daemon.stop()
    return figures, raw


def _direct(
    runtime: Runtime, daemon: Daemon, model_id: str, path: Path, root: Path, *, ctx: int, np: int
) -> tuple[DirectServer, bool]:
    """The floor's llama-server for a model mmd has loaded, and whether its argv is mmd's."""
    loaded = daemon.load(model_id)
    spec = runtime.spec(
        model_id,
        path,
        root,
        ctx=ctx,
        parallel=np,
        layers=loaded.placement.gpu_layers,
        cores=share_of(loaded),
    )
    server = DirectServer(runtime, spec).start()
    return server, child_argv_matches(loaded.pid, server.argv)


def _latency(
    root: Path,
    runtime: Runtime,
    sizes: Sizes,
    daemon: Daemon,
    model: Path,
    http_socket: Path,
    tcp: tuple[str, int] | None,
) -> tuple[list[Figure], Raw]:
    direct, same_argv = _direct(runtime, daemon, "tiny", model, root, ctx=512, np=1)
    request = chat_request("tiny", LATENCY_TOKENS)
    done: dict[str, list[Completion]] = {"direct": [], "mmd": [], "mmd_tcp": []}
    addresses: dict[str, Address | None] = {
        "direct": direct.spec.socket,
        "mmd": http_socket,
        "mmd_tcp": tcp,
    }
    clients = {name: RawClient(address) for name, address in addresses.items() if address}
    try:
        for _ in range(20):  # warm-up: connections, prompt cache, allocator
            for client in clients.values():
                client.send(request)
        for i in range(sizes.overhead_requests):
            # Alternate which goes first so that neither always follows the other.
            order = ["mmd", "direct"] if i % 2 else ["direct", "mmd"]
            for name in [*order, "mmd_tcp"]:
                if name in clients:
                    done[name].append(clients[name].send(request))
        # mmd's own CPU per request on this path, beside the gRPC path's (overhead rows).
        cpu_ms = server_cpu_ms(daemon_pid(daemon), lambda: clients["mmd"].send(request))
    finally:
        for client in clients.values():
            client.close()
        direct.stop()
    total = {name: [c.total_ms for c in found] for name, found in done.items()}
    first = {name: [c.first_ms for c in found] for name, found in done.items()}
    problems = [] if same_argv else ["the floor's llama-server runs another argv than mmd's child"]
    problems.append(
        token_problem({k: [c.tokens for c in v] for k, v in done.items()}, LATENCY_TOKENS)
    )
    problem = "; ".join(p for p in problems if p)
    mmd_s, direct_s = Spread.of(total["mmd"]), Spread.of(total["direct"])
    added_p50 = mmd_s.median - direct_s.median
    added_p95 = percentile(total["mmd"], 95) - percentile(total["direct"], 95)
    added_first = Spread.of(first["mmd"]).median - Spread.of(first["direct"]).median

    def row(metric: str, value: float, target: str = "-", met: bool | None = None) -> Figure:
        return Figure(
            "http",
            metric,
            "ms",
            Spread.of([value]),
            None,
            target,
            met,
            digits=2,
            added=True,
            problem=problem,
            floor_kind=DIRECT_CLIENT,
        )

    figures = [
        Figure(
            "http",
            f"chat stream, {LATENCY_TOKENS} tokens, p50 [p5-p95]",
            "ms",
            mmd_s,
            direct_s,
            "-",
            None,
            digits=2,
            problem=problem,
            floor_kind=DIRECT_CLIENT,
        ),
        row("added latency via HTTP, p50", added_p50, "< 1 ms", added_p50 < 1.0),
        row("added latency via HTTP, p95", added_p95),
        row("added first-token latency via HTTP, p50", added_first),
        Figure(
            "http",
            "server CPU per request: mmd",
            "ms",
            Spread.of([cpu_ms]),
            None,
            "-",
            None,
            digits=2,
        ),
    ]
    added_tcp = None
    if total["mmd_tcp"]:
        added_tcp = Spread.of(total["mmd_tcp"]).median - direct_s.median
        figures.append(row("added latency via HTTP on TCP 127.0.0.1, p50", added_tcp))
    raw = {
        "model": "embedding 64, 2 blocks",
        "ctx": 512,
        "max_tokens": LATENCY_TOKENS,
        "argv_matches_mmd_child": same_argv,
        "tcp": f"{tcp[0]}:{tcp[1]}" if tcp else None,
        "total_ms": total,
        "first_token_ms": first,
        "tokens": {name: [c.tokens for c in found] for name, found in done.items()},
        "added_p50_ms": added_p50,
        "server_cpu_ms_per_request": cpu_ms,
        "added_p95_ms": added_p95,
        "added_first_token_p50_ms": added_first,
        "added_tcp_p50_ms": added_tcp,
        "problem": problem,
    }
    return figures, raw


Spans = list[tuple[float, float, int]]


async def _round(address: Address, request: bytes, clients: int, requests: int) -> Spans:
    """(end, llama-server's busy s, tokens) per request of one round."""
    remaining = requests
    spans: Spans = []

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            done = await completion_async(address, request)
            busy_ms = done.timings.get("prompt_ms", 0.0) + done.timings.get("predicted_ms", 0.0)
            spans.append((done.end_at, busy_ms / 1000, done.tokens))

    await asyncio.gather(*(worker() for _ in range(clients)))
    return spans


def _throughput(
    root: Path, runtime: Runtime, sizes: Sizes, daemon: Daemon, model: Path, http_socket: Path
) -> tuple[list[Figure], Raw]:
    direct, same_argv = _direct(runtime, daemon, "gen", model, root, ctx=2048, np=8)
    request = chat_request("gen", THROUGHPUT_TOKENS)
    addresses: dict[str, Address] = {"mmd": http_socket, "direct": direct.spec.socket}
    tokens: dict[str, list[int]] = {"mmd": [], "direct": []}
    raw: Raw = {
        "model": "embedding 256, 4 blocks",
        "ctx": 2048,
        "parallel": 8,
        "max_tokens": THROUGHPUT_TOKENS,
        "argv_matches_mmd_child": same_argv,
    }
    rates: dict[int, dict[str, list[float]]] = {}
    try:

        def run(name: str, clients: int, requests: int) -> tuple[int, float, Spans]:
            """(tokens, seconds, spans) of one round on one side."""
            start = time.perf_counter()
            spans = asyncio.run(_round(addresses[name], request, clients, requests))
            elapsed = time.perf_counter() - start
            tokens[name] += [n for _, _, n in spans]
            return sum(n for _, _, n in spans), elapsed, spans

        run("mmd", 8, 8)  # warm-up
        run("direct", 8, 8)
        tokens["mmd"].clear()
        tokens["direct"].clear()
        for clients, requests in LEVELS.items():
            found: dict[str, list[float]] = {"mmd": [], "direct": [], "server": []}
            for r in range(sizes.throughput_rounds):
                # A B B A (then B A A B): a drift in the machine's load during the
                # round weighs on both sides alike.
                a, b = ("mmd", "direct") if r % 2 == 0 else ("direct", "mmd")
                parts: dict[str, list[tuple[int, float, Spans]]] = {a: [], b: []}
                for name in (a, b, b, a):
                    parts[name].append(run(name, clients, requests))
                for name, done in parts.items():
                    found[name].append(sum(t for t, _, _ in done) / sum(e for _, e, _ in done))
                direct_spans = [span for _, _, spans in parts["direct"] for span in spans]
                found["server"].append(busy_rate(direct_spans))
            rates[clients] = found
    finally:
        direct.stop()
    problems = [] if same_argv else ["the floor's llama-server runs another argv than mmd's child"]
    problems.append(token_problem(tokens, THROUGHPUT_TOKENS))
    problem = "; ".join(p for p in problems if p)
    figures: list[Figure] = []
    for clients, found in rates.items():
        ratios = [m / d for m, d in zip(found["mmd"], found["direct"], strict=True)]
        of_server = [m / b for m, b in zip(found["mmd"], found["server"], strict=True) if b]
        label = f"tokens/s via HTTP, {clients} client{'s' if clients > 1 else ''}"
        ratio = Spread.of(ratios).median
        figures += [
            Figure(
                "http",
                label,
                "tok/s",
                Spread.of(found["mmd"]),
                Spread.of(found["direct"]),
                ">= 0.97",
                ratio >= 0.97,
                ratio=ratio,
                digits=0,
                better="higher",
                problem=problem,
                floor_kind=DIRECT_CLIENT,
            ),
            Figure(
                "http",
                f"{label}, vs llama-server's timings",
                "tok/s",
                Spread.of(found["mmd"]),
                Spread.of(found["server"]),
                "-",
                None,
                ratio=Spread.of(of_server).median if of_server else None,
                digits=0,
                better="higher",
                problem=problem,
                floor_kind="llama-server's own prompt_ms + predicted_ms, busy time only",
            ),
        ]
        raw[f"clients_{clients}"] = {
            "requests_per_round": LEVELS[clients],
            "mmd_tokens_per_s": found["mmd"],
            "direct_tokens_per_s": found["direct"],
            "ratios": ratios,
            "llama_server_busy_tokens_per_s": found["server"],
            "ratios_to_llama_server": of_server,
        }
    raw["problem"] = problem
    return figures, raw
