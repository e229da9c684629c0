"""mmd's benchmarks: each figure against its floor, measured in the same run.

Runs a real mmd (``python -m mmd``) and real llama-server children on synthetic
models in a temporary directory; the floor of each figure is the same work done
without mmd (llama-server started directly with the argv mmd builds, a bare
interpreter, ...). Prints a table and writes every number to
``bench/results/latest.json``. Each row's verdict is met, missed, info (no target)
or "floor invalid": mmd beat its floor by more than 2%, or added less than
nothing, so the floor was not one (bench/verdicts.py). Timings are
informational: nothing here fails.

    .venv/bin/python bench/run.py [--quick] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil
from bench_cores import cores
from bench_daemon import ScaleSizes, daemon_footprint, estimate_error, scale
from bench_fleet import fleet_balance
from bench_http import http_path
from bench_requests import Sizes, cli_latency, request_overhead, swap_latency, throughput
from bench_router import router_peer
from harness import Figure, Runtime

RESULTS = Path(__file__).resolve().parent / "results"

Benchmark = Callable[[Path, Runtime, Any], tuple[list[Figure], dict[str, Any]]]
BENCHMARKS: dict[str, tuple[Benchmark, bool]] = {  # name: (function, takes ScaleSizes)
    "overhead": (request_overhead, False),
    "throughput": (throughput, False),
    "http": (http_path, False),
    "swap": (swap_latency, False),
    "cli": (cli_latency, False),
    "footprint": (daemon_footprint, True),
    "estimate": (estimate_error, True),
    "scale": (scale, True),
    # Real models (the demo extra's), against llama-server's defaults and its router mode.
    "cores": (cores, False),
    "router": (router_peer, False),
    "fleet": (fleet_balance, False),
}


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "load_average": list(os.getloadavg()),
    }


def versions(runtime: Runtime) -> dict[str, str]:
    found = {"python": platform.python_version(), "llama-server": runtime.version}
    for package in ("mmd", "grpcio", "protobuf", "httpx", "aiohttp", "psutil"):
        try:
            found[package] = version(package)
        except Exception:
            found[package] = "unknown"
    return found


def cell(figure: Figure, which: str) -> str:
    spread = figure.mmd if which == "mmd" else figure.floor
    if spread is None:
        return "-"
    unit = f" {figure.unit}" if figure.unit else ""
    return spread.text(figure.digits) + unit


def table(figures: list[Figure]) -> str:
    rows = [("benchmark", "metric", "mmd", "floor", "ratio", "target", "result")]
    for f in figures:
        verdict, _ = f.judged()
        ratio = f"{f.ratio:.3f}" if f.ratio is not None else "-"
        if f.note:
            ratio += f" ({f.note})"
        rows.append(
            (f.benchmark, f.metric, cell(f, "mmd"), cell(f, "floor"), ratio, f.target, verdict)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def footnotes(figures: list[Figure]) -> str:
    """What each floor (or peer) is, and why a row's floor is invalid or a peer row has
    no comparison."""
    kinds: dict[str, list[str]] = {}
    for f in figures:
        if f.floor_kind and f.floor_kind not in kinds.setdefault(f.benchmark, []):
            kinds[f.benchmark].append(f.floor_kind)
    lines = [f"floors, {name}: {'; '.join(found)}" for name, found in kinds.items() if found]
    for f in figures:
        verdict, why = f.judged()
        if verdict == "floor invalid":
            lines.append(f"floor invalid, {f.benchmark} / {f.metric}: {why}")
        elif why:  # a peer row without a comparison: the peer could not run, or why not
            lines.append(f"{verdict}, {f.benchmark} / {f.metric}: {why}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument(
        "--only", action="append", choices=sorted(BENCHMARKS), help="run only these (repeatable)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args()
    names = args.only or list(BENCHMARKS)
    sizes, scale_sizes = (
        (Sizes.quick(), ScaleSizes.quick()) if args.quick else (Sizes(), ScaleSizes())
    )
    runtime = Runtime.resolve()
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "quick": args.quick,
        "machine": machine(),
        "versions": versions(runtime),
        "figures": [],
        "raw": {},
        "errors": {},
        "seconds": {},
    }
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="mmd-bench-") as tmp:
        for name in names:
            function, takes_scale = BENCHMARKS[name]
            print(f"running {name} ...", file=sys.stderr, flush=True)
            began = time.perf_counter()
            try:
                found, raw = function(Path(tmp), runtime, scale_sizes if takes_scale else sizes)
            except Exception as err:
                traceback.print_exc()
                report["errors"][name] = f"{type(err).__name__}: {err}"
                continue
            finally:
                report["seconds"][name] = round(time.perf_counter() - began, 1)
            figures += found
            report["raw"][name] = raw
            print(table(found), file=sys.stderr, flush=True)
            print(footnotes(found), file=sys.stderr, flush=True)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    report["figures"] = [figure.as_dict() for figure in figures]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    m = report["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, {report['date']}; mmd {report['versions']['mmd']}")
    print(table(figures))
    print(footnotes(figures))
    print(f"\nmedian [spread]; every number in {args.out}")
    if report["errors"]:
        print(f"errors: {report['errors']}")


if __name__ == "__main__":
    main()
