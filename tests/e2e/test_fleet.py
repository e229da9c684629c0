"""Three mmd nodes in network namespaces behind HAProxy (deploy/haproxy/mmd.cfg).

One test walks through the fleet's life and prints its figures: (a) light traffic
loads each model on one node; (b) a hot model spreads to a second node past the load
bound; (c) a node's mmd is SIGKILLed mid-traffic: its models load elsewhere and every
request is answered; (d) the node comes back and takes its models back; (e) a node
that cannot fit a model hands the request on, and a model that fits nowhere is a 507.
Also: API keys pass through, and a stream passes through unbuffered.

Needs root, haproxy and ip (.ci/run installs them and sets MMD_REQUIRE_FLEET=1 so that
the test must run there); elsewhere it skips with the reason.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until
from fleet import REQUEST_TIMEOUT_S, Answer, Fleet, fleet_unavailable, traffic

from mmd.v1 import mmd_pb2 as pb

pytestmark = [pytest.mark.fleet, pytest.mark.timeout(240)]

LIGHT = [f"m{i}" for i in range(6)]


def registry(model_files: dict[str, Path]) -> str:
    text = ""
    for i, model_id in enumerate(LIGHT):
        path = model_files["tiny" if i % 2 else "tiny2"]
        text += f'[models.{model_id}]\npath = "{path}"\nctx = 4096\nparallel = 2\n\n'
    # One slot: concurrent requests for it wait at its node, which HAProxy counts.
    text += f'[models.hot]\npath = "{model_files["tiny"]}"\nctx = 512\nparallel = 1\n\n'
    # Larger than any node's budget: refused everywhere.
    text += f'[models.huge]\npath = "{model_files["tiny"]}"\nmemory = "64TiB"\n'
    return text


@pytest.fixture
def fleet(tmp_path: Path, model_files: dict[str, Path]) -> Iterator[Fleet]:
    why = fleet_unavailable()
    if why is not None:
        if os.environ.get("MMD_REQUIRE_FLEET") == "1":
            pytest.fail(f"MMD_REQUIRE_FLEET=1 but the fleet cannot run: {why}")
        pytest.skip(why)
    fleet = Fleet(tmp_path, registry(model_files))
    fleet.start()
    try:
        yield fleet
    finally:
        fleet.close()


def accounted(answers: list[Answer]) -> tuple[int, int, list[Answer]]:
    """(answered, refused with a clear error, lost: neither)."""
    ok = sum(a.ok for a in answers)
    refused = sum(a.refused_clearly for a in answers)
    lost = [a for a in answers if not a.ok and not a.refused_clearly]
    return ok, refused, lost


def retries(fleet: Fleet) -> int:
    """Requests HAProxy has sent again (to another node) so far."""
    backend = fleet.stats()["BACKEND"]
    return int(backend["wretr"] or 0) + int(backend["wredis"] or 0)


def test_fleet_behind_haproxy(fleet: Fleet) -> None:
    figures: dict[str, object] = {}
    phases: dict[str, float] = {"start": fleet.started_s}
    began = time.monotonic()

    # API keys pass through to the nodes, which check them (401 is not retried).
    assert fleet.request("m0", key=None).status == 401
    assert fleet.request("m0", key="wrong-key-0123456789").code == "unauthorized"

    # (a) Light traffic, one request at a time: each model is loaded on one node.
    home: dict[str, str] = {}
    for model in [*LIGHT, "hot"] * 2:
        answer = fleet.request(model)
        assert answer.ok, answer
        assert home.setdefault(model, answer.node) == answer.node, (model, answer)
    loads_a = {model: sum(fleet.loads(model).values()) for model in home}
    figures["(a) home node per model"] = home
    figures["(a) loads per model"] = loads_a
    assert set(loads_a.values()) == {1}, loads_a
    assert len(set(home.values())) >= 2, f"every model on one node: {home}"
    phases["a"] = time.monotonic() - began

    # A stream passes through unbuffered: its first piece reaches the client while the node
    # is still generating the rest.
    streamed, arrivals, running = fleet.stream("m0", max_tokens=1000)
    assert streamed.status == 200
    assert streamed.text.rstrip().endswith("data: [DONE]")
    spread_s = arrivals[-1] - arrivals[0]
    figures["stream: pieces, first-to-last s"] = (len(arrivals), round(spread_s, 3))
    assert running == 1, "the stream's first piece came only after its node had finished"
    assert len(arrivals) >= 5, arrivals

    # (b) A hot model: 8 requests at once for a model with one slot. Its node's load
    # passes the bound (2 x the average in flight), and the next node takes some.
    began = time.monotonic()
    hot = traffic(fleet, ["hot"] * 8, clients=8, max_tokens=60)
    assert all(a.ok for a in hot), [a for a in hot if not a.ok]
    hot_nodes = Counter(a.node for a in hot)
    figures["(b) hot: answers per node"] = dict(hot_nodes)
    figures["(b) hot: loads per node"] = fleet.loads("hot")
    assert len(hot_nodes) >= 2, hot_nodes
    assert hot_nodes[home["hot"]] == max(hot_nodes.values()), (home["hot"], hot_nodes)
    assert len(fleet.loads("hot")) >= 2
    phases["b"] = time.monotonic() - began

    # (c) SIGKILL the node that holds the most models, mid-traffic: while three
    # clients keep sending requests for every model, and while it generates a longer
    # non-streamed answer (nothing of it has reached the client yet).
    began = time.monotonic()
    victim_name = Counter(home[m] for m in LIGHT).most_common(1)[0][0]
    victim = next(n for n in fleet.nodes if n.name == victim_name)
    orphans = [m for m in LIGHT if home[m] == victim_name]
    retried_before = retries(fleet)
    plan = [LIGHT[i % len(LIGHT)] for i in range(36)]
    done: list[int] = [0]
    answers: list[Answer] = []

    def progress(count: int) -> None:
        done[0] = count

    sender = threading.Thread(
        target=lambda: answers.extend(
            traffic(fleet, plan, clients=3, on_progress=progress, pause=0.03)
        ),
        daemon=True,
    )
    sender.start()
    assert wait_until(lambda: done[0] >= 3, timeout=REQUEST_TIMEOUT_S)
    long: list[Answer] = []
    in_flight = threading.Thread(
        # 3,500 tokens of a 4,096 context, however the model goes: seconds of work on any
        # machine, so it is surely in flight when its node is killed.
        target=lambda: long.append(fleet.request(orphans[0], max_tokens=3500, every_token=True)),
        daemon=True,
    )
    in_flight.start()
    assert wait_until(
        lambda: bool(long) or victim.daemon.model(orphans[0]).active_requests > 0, timeout=15
    )
    assert not long, f"the long request ended before the kill: {long}"
    killed_at = time.monotonic()
    victim.kill()
    figures["(c) requests answered before the kill"] = done[0]
    fleet.wait_status(victim_name, "DOWN", timeout=15)
    down_at = time.monotonic()
    sender.join(REQUEST_TIMEOUT_S * len(plan))
    in_flight.join(REQUEST_TIMEOUT_S)
    assert len(answers) == len(plan), "the sending threads did not finish"
    assert long, "the request in flight at the kill never returned"
    answers.append(long[0])
    ok, refused, lost = accounted(answers)
    figures["(c) killed"] = f"{victim_name} (home of {orphans})"
    figures["(c) requests: sent, answered, refused, lost"] = (len(answers), ok, refused, len(lost))
    figures["(c) requests HAProxy sent again"] = retries(fleet) - retried_before
    assert not lost, lost
    assert ok == len(answers), [a for a in answers if not a.ok]
    assert long[0].node != victim_name, long[0]
    figures["(c) the answer in flight at the kill: from, s"] = (
        long[0].node,
        round(long[0].seconds, 2),
    )
    figures["(c) HAProxy marked it DOWN after s"] = round(down_at - killed_at, 2)
    slowest = max(a.seconds for a in answers)
    figures["(c) slowest request s"] = round(slowest, 2)
    assert slowest < REQUEST_TIMEOUT_S, "a request hung"
    after = [a for a in answers if a.began > killed_at and a.model in orphans and a.ok]
    assert after, "no request for the dead node's models after the kill"
    first_s = min(a.ended for a in after) - killed_at
    figures["(c) first answer for its models from another node after s"] = round(first_s, 2)
    for model in orphans:
        elsewhere = {n: c for n, c in fleet.loads(model).items() if n != victim_name}
        assert elsewhere, f"{model} never loaded on another node"
    assert all(a.node != victim_name for a in answers if a.began > down_at)
    figures["(c) loads per model by now"] = {m: sum(fleet.loads(m).values()) for m in LIGHT}
    phases["c"] = time.monotonic() - began

    # (d) The node comes back: HAProxy sees it UP, and its models go home to it.
    began = time.monotonic()
    victim.daemon.start()
    fleet.wait_status(victim_name, "UP", timeout=30)
    figures["(d) restarted and back UP in HAProxy after s"] = round(time.monotonic() - began, 2)
    before = {m: victim.starts(m) for m in orphans}
    back = [fleet.request(m) for m in orphans * 2]
    assert all(a.ok for a in back), back
    assert {a.node for a in back} == {victim_name}, [(a.model, a.node) for a in back]
    reloaded = {m: victim.starts(m) - before[m] for m in orphans}
    figures["(d) its models loaded there again"] = reloaded
    assert set(reloaded.values()) == {1}, reloaded
    phases["d"] = time.monotonic() - began

    began = time.monotonic()
    # (e) A node whose budget cannot hold a model hands the request on. Make one
    # model's home node too small for it (unloaded there, a 1 MiB budget), then ask.
    model = LIGHT[0]
    small = next(n for n in fleet.nodes if n.name == home[model])
    small.daemon.stub.UnloadModel(pb.UnloadModelRequest(model_id=model), timeout=30)
    config = small.daemon.config_path.read_text()
    # The node's [budget] table (the test daemons' one core) gets a 1 MiB RAM budget too.
    assert "\n[budget]\n" in config
    config = config.replace("\n[budget]\n", '\n[budget]\nram = "1MiB"\n', 1)
    small.daemon.config_path.write_text(config)
    small.daemon.stub.Reload(pb.ReloadRequest(), timeout=30)
    with small.direct() as direct:
        refused_there = direct.post(
            "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        )
    assert refused_there.status_code == 503, refused_there.text
    assert refused_there.json()["error"]["code"] == "insufficient_memory"
    redispatched = int(fleet.stats()["BACKEND"]["wredis"] or 0)
    handed_on = fleet.request(model)
    assert handed_on.ok, handed_on
    assert handed_on.node != small.name
    figures["(e) home too small: answered by"] = f"{handed_on.node} (home {small.name})"
    assert int(fleet.stats()["BACKEND"]["wredis"] or 0) > redispatched, fleet.stats()["BACKEND"]

    # A model that fits on no node: every node says so, and the client gets the 507.
    huge = fleet.request("huge")
    figures["(e) fits nowhere"] = (huge.status, huge.code)
    assert (huge.status, huge.code) == (507, "insufficient_memory"), huge

    phases["e"] = time.monotonic() - began
    figures["seconds per phase"] = {k: round(v, 1) for k, v in phases.items()}
    print("\nfleet figures:")
    for name, figure in figures.items():
        print(f"  {name}: {figure}")
