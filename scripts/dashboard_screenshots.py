"""Screenshots of the web dashboard for the README: docs/dashboard-desktop.png (1280x800) and
docs/dashboard-phone.png (390x844, the whole page).

Starts a throwaway mmd with an HTTP listener (real llama-server children, CPU only) on
the demo's SmolLM2-135M-Instruct, which writes the real answers the pictures show, and
synthetic models beside it; opens the page at both widths in Debian's Chromium (driven by
Playwright; nothing is downloaded), loads two models, sends a few requests from another
client and one from the page's prompt box, then takes the pictures. SmolLM2 comes from
the wheel `make demo` installs (see scripts/demo_model.py).

    python scripts/dashboard_screenshots.py [--out docs] [--browser /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from demo_model import smollm2  # scripts/ is on the path when this script runs

from mmd.runtime.synthetic import write_model

CONFIG = """
[daemon]
socket = "{root}/run/mmd.sock"
log_dir = "{root}/logs"
state_dir = "{root}/state"

[http]
listen = ["127.0.0.1:{port}"]

[models.smol]
path = "{smol}"
role = "chat"
ctx = 4096
parallel = 2
keep_alive = "15m"

[models.coder]
path = "{root}/coder.gguf"
keep_alive = "5m"

[models.embedder]
path = "{root}/embedder.gguf"
embedding = true

[models.summarizer]
path = "{root}/summarizer.gguf"
"""
PROMPTS = [
    "Write a haiku about memory.",
    "List three prime numbers.",
    "What is a cache?",
    "Name a colour.",
]
PAGE_PROMPT = "Why is the sky blue?"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_daemon(root: Path, port: int) -> subprocess.Popen[bytes]:
    write_model(root / "coder.gguf", seed=1)
    write_model(root / "embedder.gguf", embedding=128, seed=2)
    write_model(root / "summarizer.gguf", seed=4)
    config = root / "mmd.toml"
    config.write_text(CONFIG.format(root=root, port=port, smol=smollm2()))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("MMD_CONFIG", None)
    log = (root / "daemon.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "mmd", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"mmd exited: {(root / 'daemon.log').read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"mmd did not serve in time: {(root / 'daemon.log').read_text()}")


def activity(url: str) -> None:
    """Two models loaded, a few requests of each kind finished."""
    for model in ("smol", "coder"):
        httpx.post(f"{url}/load", json={"model": model}, timeout=60).raise_for_status()
    for index, prompt in enumerate(PROMPTS):
        body = {
            "model": "smol" if index % 2 == 0 else "coder",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 24 + 8 * index,
        }
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).raise_for_status()
        time.sleep(0.3)
    body = {"model": "embedder", "input": ["memory", "budget"]}
    httpx.post(f"{url}/v1/embeddings", json=body, timeout=60).raise_for_status()
    httpx.post(f"{url}/unload", json={"model": "embedder"}, timeout=60).raise_for_status()


def ask_from_the_page(page: Any) -> None:
    page.select_option("#try-model", "smol")
    page.fill("#try-max", "64")
    page.fill("#try-prompt", PAGE_PROMPT)
    page.click("#try-send")
    page.wait_for_selector("#try-stats:has-text('tokens')", timeout=180_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--browser", type=Path, default=Path("/usr/bin/chromium"))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="mmds-", dir="/tmp"))  # a short socket path
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_daemon(root, port)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(args.browser), args=["--no-sandbox"]
            )
            shots = [
                ("dashboard-desktop.png", {"width": 1280, "height": 800}, 1, False),
                ("dashboard-phone.png", {"width": 390, "height": 844}, 2, True),
            ]
            pages = []
            for name, viewport, scale, full in shots:
                context = browser.new_context(
                    viewport=viewport, device_scale_factor=scale, color_scheme="light"
                )
                page = context.new_page()
                page.goto(url + "/")
                page.wait_for_selector("#conn[data-state=connected]", timeout=10_000)
                pages.append((page, name, full))
            activity(url)
            for page, _, _ in pages:
                ask_from_the_page(page)
            time.sleep(1.5)  # a memory sample with the loaded models
            for page, name, full in pages:
                page.evaluate("document.activeElement && document.activeElement.blur()")
                page.evaluate("window.scrollTo(0, 0)")
                # The answer box follows the text as it streams; show it from its start.
                page.evaluate("document.getElementById('try-output').scrollTop = 0")
                page.screenshot(path=str(args.out / name), full_page=full)
                print(args.out / name)
            browser.close()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
