"""Send GetHealth to a daemon every INTERVAL seconds until SIGTERM; write the latencies.

Runs as its own process so that the benchmark's own load (thousands of open calls)
cannot delay the probe: a slow answer is then the daemon's event loop stalling.

    python bench/probe.py SOCKET OUT.json [--interval 0.01]
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path
from types import FrameType

import grpc

from mmd.v1 import mmd_pb2 as pb
from mmd.v1 import mmd_pb2_grpc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("socket", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--interval", type=float, default=0.01)
    args = parser.parse_args()
    stopping = False

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    samples: list[tuple[float, float]] = []  # (monotonic time sent, latency ms)
    with grpc.insecure_channel(f"unix:{args.socket}") as channel:
        stub = mmd_pb2_grpc.ModelManagerStub(channel)
        stub.GetHealth(pb.GetHealthRequest(), timeout=30)
        print("ready", flush=True)
        while not stopping:
            sent = time.monotonic()
            try:
                stub.GetHealth(pb.GetHealthRequest(), timeout=60)
            except grpc.RpcError:
                break
            latency = time.monotonic() - sent
            samples.append((sent, latency * 1000))
            time.sleep(max(0.0, args.interval - latency))
    args.out.write_text(json.dumps(samples))


if __name__ == "__main__":
    main()
