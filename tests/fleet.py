"""mmd nodes, each in a network namespace of its own, behind a real HAProxy.

Shared by the fleet test (tests/test_fleet.py) and the fleet benchmark (bench/); like
daemon_proc, it imports nothing from pytest.

The namespaces, a bridge between them and every address on it are made here and
removed by ``Fleet.close()``. Nothing is added to the machine's own namespace: the
nodes' addresses (a private 10.x /24) exist only inside the namespaces, HAProxy
reaches them through the hub namespace (its ``namespace`` server keyword), and the
client reaches HAProxy on loopback. So traffic can go nowhere but to these nodes.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from daemon_proc import Daemon, llama_children

from mmd.v1 import mmd_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "deploy" / "haproxy" / "mmd.cfg"
KEY = "fleet-key-0123456789abcdef"
NODE_PORT = 8080
# A bound on each request (a shared 2-core machine can be slow), never a wait.
REQUEST_TIMEOUT_S = 60.0
# Every node runs its models on the CPU, whatever GPUs the machine has.
CPU_ONLY_ENV = {"CUDA_VISIBLE_DEVICES": "", "GGML_VK_VISIBLE_DEVICES": ""}


def fleet_unavailable() -> str | None:
    """Why a fleet cannot run on this machine; None when it can."""
    if os.geteuid() != 0:
        return "needs root (it makes network namespaces)"
    for tool, package in (("haproxy", "haproxy"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian's {package}; .ci/run installs it)"
    version = subprocess.run(["haproxy", "-v"], capture_output=True, text=True, check=False)
    words = version.stdout.split()
    if len(words) < 3 or tuple(int(p) for p in words[2].split(".")[:2] if p.isdigit()) < (2, 6):
        return f"needs HAProxy 2.6 or later (balance hash <expr>), found {version.stdout[:40]!r}"
    probe = f"mmdprobe{os.getpid()}{secrets.token_hex(2)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"cannot make network namespaces here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Network:
    """A hub namespace holding a bridge, and one namespace per node with a veth pair to
    the bridge and an address of its own. Names are unique to this run."""

    def __init__(self, count: int) -> None:
        tag = f"mmdf{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.hub = f"{tag}h"
        self.names = [f"{tag}n{i + 1}" for i in range(count)]
        # Any private /24 will do: it exists only inside these namespaces.
        self.subnet = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
        self.made: list[str] = []

    def address(self, index: int) -> str:
        return f"{self.subnet}.{11 + index}"

    def create(self) -> None:
        try:
            self._add(self.hub)
            _ip("-n", self.hub, "link", "set", "lo", "up")
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "addr", "add", f"{self.subnet}.1/24", "dev", "br0")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            for index, name in enumerate(self.names):
                self._add(name)
                veth = f"v{index + 1}"
                _ip("-n", self.hub, "link", "add", veth, "type", "veth", "peer", "name", "eth0")
                _ip("-n", self.hub, "link", "set", "eth0", "netns", name)
                _ip("-n", self.hub, "link", "set", veth, "master", "br0", "up")
                _ip("-n", name, "addr", "add", f"{self.address(index)}/24", "dev", "eth0")
                _ip("-n", name, "link", "set", "eth0", "up")
                _ip("-n", name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def _add(self, name: str) -> None:
        _ip("netns", "add", name)
        self.made.append(name)

    def close(self) -> None:
        """Remove every namespace made (with them go their links, bridge and addresses)."""
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        self.made.clear()


@dataclass
class Node:
    """One mmd in its namespace: [http] on its own address (and a Unix socket the test
    uses to reach it directly), API keys, and 503 for a model that does not fit."""

    name: str
    netns: str
    address: str
    daemon: Daemon

    @property
    def http_socket(self) -> Path:
        return self.daemon.root / "run" / "http.sock"

    def starts(self, model: str) -> int:
        """How many times this node started the model's llama-server (loads begun)."""
        log = self.daemon.root / "logs" / f"{model}.log"
        try:
            return sum(1 for line in log.read_text().splitlines() if line.startswith("--- mmd "))
        except FileNotFoundError:
            return 0

    def kill(self) -> None:
        """SIGKILL mmd (its llama-server children die with it: they run with
        PR_SET_PDEATHSIG)."""
        assert self.daemon.process is not None
        self.daemon.stop(signal.SIGKILL)

    def direct(self) -> httpx.Client:
        """A client of this node alone, over its Unix socket (no network)."""
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.http_socket)),
            base_url="http://node",
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=REQUEST_TIMEOUT_S,
        )


def node_config(address: str, models: str, socket_path: Path, budget: str = "") -> str:
    return (
        "[scheduler]\n"
        'default_keep_alive = "10m"\n'
        'min_headroom = "0"\n'
        f"{budget}\n"
        "[http]\n"
        f'listen = ["{address}:{NODE_PORT}", "unix:{socket_path}"]\n'
        f'api_keys = ["{KEY}"]\n'
        "insufficient_memory_status = 503\n\n" + models
    )


def render_haproxy(nodes: list[Node], hub: str, stats_socket: Path, balance: str = "hash") -> str:
    """deploy/haproxy/mmd.cfg with these nodes as its servers (reached through the hub
    namespace), an admin socket for the figures, and for ``balance="roundrobin"`` the
    naive alternative: the same config without model-affine hashing."""
    text = TEMPLATE.read_text()
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("server "):
            continue  # the template's example servers
        if balance == "roundrobin" and stripped.startswith(
            ("balance hash", "hash-type", "hash-balance-factor")
        ):
            line = "    balance roundrobin" if stripped.startswith("balance") else ""
        lines.append(line)
        if stripped == "global":
            lines.append(f'    stats socket "{stats_socket}" mode 600 level admin')
    for node in nodes:
        lines.append(f"    server {node.name} {node.address}:{NODE_PORT} namespace {hub}")
    return "\n".join(lines) + "\n"


@dataclass
class Answer:
    """One request through HAProxy, as the client saw it."""

    model: str
    status: int  # 0: no HTTP answer at all (the connection broke)
    node: str = ""  # X-Mmd-Node: the node that answered
    code: str = ""  # the error's code (an OpenAI-shaped error body)
    text: str = ""  # the answer's text
    error: str = ""  # what broke, for status 0
    began: float = 0.0
    ended: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.code

    @property
    def refused_clearly(self) -> bool:
        """An HTTP error whose body says what went wrong (no byte of an answer)."""
        return self.status >= 400 and bool(self.code)

    @property
    def seconds(self) -> float:
        return self.ended - self.began


@dataclass
class Fleet:
    """``count`` mmd nodes with the registry ``models`` behind HAProxy on loopback."""

    root: Path
    models: str
    count: int = 3
    balance: str = "hash"
    budgets: dict[int, str] = field(default_factory=dict)  # node index -> a [budget] table
    network: Network = field(init=False)
    nodes: list[Node] = field(default_factory=list)
    haproxy: subprocess.Popen[bytes] | None = None
    port: int = 0
    client: httpx.Client | None = None
    started_s: float = 0.0  # seconds from start() until every node was UP in HAProxy

    @property
    def stats_socket(self) -> Path:
        return self.root / "haproxy.sock"

    @property
    def haproxy_log(self) -> Path:
        return self.root / "haproxy.log"

    def start(self) -> Fleet:
        began = time.monotonic()
        self.network = Network(self.count)
        self.network.create()
        try:
            for index, netns in enumerate(self.network.names):
                root = self.root / f"node{index + 1}"
                address = self.network.address(index)
                config = node_config(
                    address, self.models, root / "run" / "http.sock", self.budgets.get(index, "")
                )
                daemon = Daemon(
                    root,
                    config,
                    extra_env=dict(CPU_ONLY_ENV),
                    wrapper=("ip", "netns", "exec", netns),
                    start_timeout=60.0,
                )
                self.nodes.append(Node(f"node{index + 1}", netns, address, daemon))
            for node in self.nodes:
                node.daemon.start(wait=False)
            for node in self.nodes:
                node.daemon.wait_serving()
            self._start_haproxy()
            self.wait_all("UP", timeout=30)
            self.started_s = time.monotonic() - began
        except BaseException:
            self.close()
            raise
        return self

    def _start_haproxy(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        config = self.root / "haproxy.cfg"
        config.write_text(
            render_haproxy(self.nodes, self.network.hub, self.stats_socket, self.balance)
        )
        env = {
            **os.environ,
            "MMD_FRONT": f"127.0.0.1:{self.port}",
            "MMD_HEALTH_KEY": KEY,
        }
        checked = subprocess.run(
            ["haproxy", "-c", "-q", "-f", str(config)], env=env, capture_output=True, text=True
        )
        if checked.returncode:
            raise RuntimeError(f"haproxy refused {config}: {checked.stdout}{checked.stderr}")
        with self.haproxy_log.open("ab") as log:
            self.haproxy = subprocess.Popen(
                ["haproxy", "-db", "-f", str(config)], env=env, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 15
        while not self.stats_socket.exists():  # HAProxy makes it once it has started
            if self.haproxy.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not start: {self.haproxy_log.read_text()}")
            time.sleep(0.02)
        self.client = httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}",
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=REQUEST_TIMEOUT_S,
        )

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.terminate()
            try:
                self.haproxy.wait(10)
            except subprocess.TimeoutExpired:
                self.haproxy.kill()
                self.haproxy.wait()
        for node in self.nodes:
            node.daemon.stop()
        for proc in llama_children(str(self.root)):
            with contextlib.suppress(Exception):
                proc.kill()
        self.network.close()

    # --- HAProxy's view ------------------------------------------------------------

    def stats(self) -> dict[str, dict[str, str]]:
        """HAProxy's ``show stat`` for the backend: its servers by name, and BACKEND."""
        with socket.socket(socket.AF_UNIX) as admin:
            admin.settimeout(5)
            admin.connect(str(self.stats_socket))
            admin.sendall(b"show stat\n")
            data = b""
            while chunk := admin.recv(65536):
                data += chunk
        text = data.decode().lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {row["svname"]: row for row in rows if row["pxname"] == "mmd_nodes"}

    def status(self, node: str) -> str:
        return self.stats()[node]["status"].split()[0]

    def wait_status(self, node: str, status: str, timeout: float) -> float:
        """Seconds until HAProxy shows ``node`` as ``status`` (UP, DOWN)."""
        began = time.monotonic()
        while self.status(node) != status:
            if time.monotonic() - began > timeout:
                raise AssertionError(f"{node} not {status} after {timeout} s: {self.stats()}")
            time.sleep(0.05)
        return time.monotonic() - began

    def wait_all(self, status: str, timeout: float) -> None:
        for node in self.nodes:
            self.wait_status(node.name, status, timeout)

    # --- traffic ----------------------------------------------------------------------

    def request(
        self, model: str, max_tokens: int = 8, key: str | None = KEY, *, every_token: bool = False
    ) -> Answer:
        """One non-streamed chat through HAProxy; never raises (a broken connection is
        status 0 with the error). ``every_token``: all ``max_tokens``, past end-of-text."""
        assert self.client is not None
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": max_tokens,
        }
        if every_token:
            body["ignore_eos"] = True  # llama-server's own field, passed through
        headers = {} if key == KEY else {"Authorization": f"Bearer {key}" if key else ""}
        answer = Answer(model, 0, began=time.monotonic())
        try:
            response = self.client.post("/v1/chat/completions", json=body, headers=headers)
        except httpx.HTTPError as err:
            answer.error = f"{type(err).__name__}: {err}"
        else:
            answer.status = response.status_code
            answer.node = response.headers.get("X-Mmd-Node", "")
            _read_body(answer, response.content)
        answer.ended = time.monotonic()
        return answer

    def stream(self, model: str, max_tokens: int) -> tuple[Answer, list[float], int]:
        """One streamed chat: the answer, when each piece of the body arrived, and how many
        requests the nodes were still running when the first piece arrived (a stream that
        HAProxy held back until the end would arrive with none running)."""
        assert self.client is not None
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": max_tokens,
            "ignore_eos": True,  # llama-server's own field: all max_tokens, however it goes
            "stream": True,
        }
        answer = Answer(model, 0, began=time.monotonic())
        arrivals: list[float] = []
        pieces: list[bytes] = []
        running = 0
        with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
            answer.status = response.status_code
            answer.node = response.headers.get("X-Mmd-Node", "")
            for chunk in response.iter_raw():
                if not arrivals:
                    running = self.running_requests()
                arrivals.append(time.monotonic())
                pieces.append(chunk)
        answer.ended = time.monotonic()
        answer.text = b"".join(pieces).decode()
        return answer, arrivals, running

    def running_requests(self) -> int:
        """Requests the live nodes are running now, from each one's gRPC socket."""
        return sum(
            node.daemon.stub.GetHealth(pb.GetHealthRequest(), timeout=5).active_inferences
            for node in self.nodes
            if node.daemon.process is not None and node.daemon.process.poll() is None
        )

    def loads(self, model: str) -> dict[str, int]:
        """Loads begun per node for ``model`` (nodes that never loaded it left out)."""
        return {node.name: n for node in self.nodes if (n := node.starts(model))}


def _read_body(answer: Answer, content: bytes) -> None:
    try:
        payload: Any = json.loads(content)
    except ValueError:
        answer.error = f"not JSON: {content[:200]!r}"
        return
    if not isinstance(payload, dict):
        answer.error = f"not an object: {content[:200]!r}"
    elif isinstance(payload.get("error"), dict):
        answer.code = str(payload["error"].get("code") or "")
        answer.text = str(payload["error"].get("message") or "")
    else:
        choices = payload.get("choices") or [{}]
        answer.text = str(choices[0].get("message", {}).get("content", ""))


def traffic(
    fleet: Fleet,
    plan: list[str],
    clients: int,
    max_tokens: int = 8,
    on_progress: Any = None,
    pause: float = 0.0,
) -> list[Answer]:
    """Send one request per entry of ``plan`` (model ids, in order) from ``clients``
    threads, each waiting ``pause`` seconds after each answer; every answer, in the
    plan's order. ``on_progress(done)`` runs in the sending thread after each answer."""
    answers: list[Answer | None] = [None] * len(plan)
    lock = threading.Lock()
    cursor = iter(range(len(plan)))
    done = [0]

    def worker() -> None:
        while True:
            with lock:
                index = next(cursor, None)
            if index is None:
                return
            answers[index] = fleet.request(plan[index], max_tokens)
            with lock:
                done[0] += 1
                count = done[0]
            if on_progress is not None:
                on_progress(count)
            time.sleep(pause)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(REQUEST_TIMEOUT_S * len(plan))
    return [
        a if a is not None else Answer(m, 0, error="never sent")
        for a, m in zip(answers, plan, strict=True)
    ]


@contextlib.contextmanager
def running_fleet(root: Path, models: str, **kw: Any) -> Iterator[Fleet]:
    fleet = Fleet(root, models, **kw)
    fleet.start()
    try:
        yield fleet
    finally:
        fleet.close()
