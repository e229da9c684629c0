"""The figures mmd's GPU design rests on, from one llama-server and a synthetic model.

``python scripts/device/figures.py LLAMA_SERVER [--label NAME]`` starts the server three
times, as mmd would place a model: all layers on the GPU (``-ngl 99``), split (half of the
layers), and on the CPU (``-ngl 0 --device none``). For each it prints one JSON line: the
load time, tokens/s for 64 generated tokens, the child's host memory (PSS, and its anonymous
resident part) and GPU memory per device (NVML, per process), its thread count, and the
per-device bytes that mmd reads from the log's buffer-size lines, beside the estimate's
constant for a GPU child's host memory. Where NVML sees no GPU the same runs happen on the
CPU, which proves the script, not the figures.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from mmd.core.footprint import GPU_RUNTIME_HOST_BYTES
from mmd.core.units import MIB
from mmd.host.memory import MemoryProbe
from mmd.runtime.buffers import runtime_bytes
from mmd.runtime.synthetic import write_model

BLOCKS = 8
PLACEMENTS = {
    "gpu": ["-ngl", "99"],
    "split": ["-ngl", str(BLOCKS // 2)],
    "cpu": ["-ngl", "0", "--device", "none"],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def measure(
    server: Path, model: Path, placement: str, work: Path, probe: MemoryProbe
) -> dict[str, object]:
    port = free_port()
    log_path = work / f"{placement}.log"
    command = [
        str(server),
        *("--model", str(model), "--host", "127.0.0.1", "--port", str(port)),
        *("--ctx-size", "2048", "--parallel", "1", "--verbosity", "4", "--no-webui"),
        *PLACEMENTS[placement],
    ]
    started = time.monotonic()
    with log_path.open("wb") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    row: dict[str, object] = {"placement": placement}
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            if child.poll() is not None:
                tail = log_path.read_text(errors="replace").splitlines()[-3:]
                return {**row, "error": f"exit {child.returncode}: {' | '.join(tail)}"}
            if time.monotonic() - started > 120:
                return {**row, "error": "not ready in 120 s"}
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        row["load_s"] = round(time.monotonic() - started, 2)
        answer = httpx.post(
            f"{url}/completion",
            json={"prompt": "one two three", "n_predict": 64, "ignore_eos": True},
            timeout=120,
        ).json()
        row["tokens_per_s"] = round(answer["timings"]["predicted_per_second"], 1)
        usage = probe.process_usage(child.pid)
        row["host_mib"] = round(usage.pop("ram", 0) / MIB)
        row["gpu_mib"] = {device: round(n / MIB) for device, n in usage.items()}
        # Without the file-backed pages of the mapped model, which the kernel can reclaim.
        status = Path(f"/proc/{child.pid}/status").read_text()
        anon_kib = next(
            int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("RssAnon:")
        )
        row["host_anon_mib"] = round(anon_kib / 1024)
        row["threads"] = psutil.Process(child.pid).num_threads()
        logged = runtime_bytes(log_path.read_text(errors="replace"))
        row["buffers_mib"] = {device: round(n / MIB) for device, n in logged.items()}
        row["estimate_gpu_host_mib"] = round(GPU_RUNTIME_HOST_BYTES / MIB)
        return row
    finally:
        child.terminate()
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("server", type=Path)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, MemoryProbe(max_age=0.0) as probe:
        work = Path(tmp)
        model = write_model(work / "figures.gguf", embedding=1024, heads=8, blocks=BLOCKS)
        gpus = [d.id for d in probe.read().devices if d.kind == "gpu"]
        print(json.dumps({"label": args.label, "server": str(args.server), "gpus": gpus}))
        failed = False
        for placement in PLACEMENTS:
            row = {"label": args.label, **measure(args.server, model, placement, work, probe)}
            failed |= "error" in row
            print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
