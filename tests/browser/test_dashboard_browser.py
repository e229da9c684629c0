"""The web dashboard in a real browser (Debian's Chromium, driven by Playwright) against the
real daemon with real llama-server children on synthetic models.

Skipped where /usr/bin/chromium is missing, unless MMD_REQUIRE_BROWSER is set (CI sets it
where it installed the browser): then they fail. Nothing is downloaded: Playwright drives
the system's browser.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Daemon, llama_children

CHROMIUM = Path("/usr/bin/chromium")
REQUIRED = bool(os.environ.get("MMD_REQUIRE_BROWSER"))

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists() and not REQUIRED,
        reason=f"{CHROMIUM} not installed (.ci/run installs Debian's chromium)",
    ),
]

# How long the page may take to show what the daemon did (it is pushed, not polled).
SHOWN_S = 1.0
KEY = "dashboard-test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def config(models: dict[str, Path], port: int, keys: str = "") -> str:
    # alert_percent: any machine uses more than 1% of its memory, so RAM's gauge is in alert.
    return f"""
[http]
listen = ["127.0.0.1:{port}"]
{keys}

[budget]
alert_percent = 1

[models.chat]
path = "{models["tiny"]}"
parallel = 2
keep_alive = "5m"

[models.helper]
path = "{models["tiny2"]}"
"""


class Served:
    """A daemon with an HTTP listener on a fixed port (a restart keeps the page's URL)."""

    def __init__(self, models: dict[str, Path], keys: str = "") -> None:
        # A short root: the Unix socket's path must stay under 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="mmdb-", dir="/tmp"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.daemon = Daemon(
            self.root, config(models, self.port, keys), extra_env={"CUDA_VISIBLE_DEVICES": ""}
        )
        self.headers = {"Authorization": f"Bearer {KEY}"} if keys else {}

    def start(self) -> Served:
        self.daemon.start()
        return self

    def post(self, path: str, body: dict[str, Any], timeout: float = 60) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.headers, timeout=timeout)

    def models(self) -> dict[str, dict[str, Any]]:
        response = httpx.get(self.url + "/models", headers=self.headers, timeout=10)
        response.raise_for_status()
        return {m["id"]: m for m in response.json()}

    def close(self) -> None:
        self.daemon.stop()
        leftovers = llama_children(str(self.root))
        for proc in leftovers:
            proc.kill()
        shutil.rmtree(self.root, ignore_errors=True)
        assert not leftovers, f"llama-server children survived their daemon: {leftovers}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(f"MMD_REQUIRE_BROWSER is set but {CHROMIUM} is missing")
    if REQUIRED:
        import playwright.sync_api as sync_api
    else:
        sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def served(model_files: dict[str, Path]) -> Iterator[Served]:
    served = Served(model_files).start()
    yield served
    served.close()


class Page:
    """One browser tab on the dashboard, failing the test on a script error."""

    def __init__(self, browser: Any, url: str) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda err: self.errors.append(str(err)))
        self.page.goto(url + "/")

    def connected(self, timeout: float = 10) -> None:
        self.page.wait_for_selector("#conn[data-state=connected]", timeout=timeout * 1000)

    def row(self, model: str) -> Any:
        return self.page.locator(f"tr[data-model={model}]")

    def wait_state(self, model: str, state: str, timeout: float = 30) -> None:
        self.page.wait_for_selector(
            f"tr[data-model={model}][data-state={state}]", timeout=timeout * 1000
        )

    def log(self, kind: str, text: str = "") -> Any:
        return self.page.locator(f"#log li.k-{kind}", has_text=text)

    def wait_count(self, locator: Any, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while locator.count() < count:
            assert time.monotonic() < deadline, f"{count} entries not shown in {timeout} s"
            self.page.wait_for_timeout(20)

    def close(self) -> None:
        self.context.close()
        assert not self.errors, f"script errors on the page: {self.errors}"


@pytest.fixture
def page(browser: Any, served: Served) -> Iterator[Page]:
    tab = Page(browser, served.url)
    tab.connected()
    yield tab
    tab.close()


def test_load_prompt_elsewhere_and_unload_from_the_page(page: Page, served: Served) -> None:
    # The registry is there, unloaded models included (the snapshot holds loaded ones only).
    page.wait_state("chat", "unloaded")
    page.wait_state("helper", "unloaded")
    # Memory: RAM's gauge, past alert_percent, in the alert colour.
    ram = page.page.locator(".device[data-device=ram]")
    assert "alert" in (ram.get_attribute("class") or "")
    assert ram.locator(".alert-badge").is_visible()
    assert "% used" in ram.locator(".device-used").inner_text()
    page.row("chat").get_by_role("button", name="Load chat").click()
    page.wait_state("chat", "ready")
    assert page.log("ready", "chat").count() == 1
    placement = page.row("chat").locator(".cell-placement")
    assert "cpu" in placement.inner_text()
    assert "cores " in placement.inner_text()  # the child's own cores (the CPU budget)
    assert "of" in (placement.get_attribute("title") or "")  # "2 of 2 cores: ..."
    assert served.models()["chat"]["state"] == "ready"

    # A request from another client shows in the log within a second of its answer.
    requests = page.log("request", "chat")
    before = requests.count()
    answer = served.post(
        "/v1/chat/completions",
        {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
    )
    assert answer.status_code == 200, answer.text
    page.wait_count(requests, before + 1, SHOWN_S)
    entry = requests.first.inner_text()
    assert "first token" in entry
    assert "tok/s" in entry
    assert "8 tokens" in entry

    page.row("chat").get_by_role("button", name="Unload chat").click()
    page.wait_state("chat", "unloaded")
    assert page.log("unloaded", "chat").count() == 1
    assert served.models()["chat"]["state"] == "unloaded"


def test_the_prompt_box_streams_an_answer(page: Page, served: Served) -> None:
    page.wait_state("helper", "unloaded")
    page.page.select_option("#try-model", "helper")  # unloaded: it loads on use
    page.page.fill("#try-max", "12")
    page.page.fill("#try-prompt", "hello")
    page.page.click("#try-send")
    page.page.wait_for_selector("#try-stats:has-text('tokens')", timeout=30_000)
    assert page.page.inner_text("#try-output").strip()
    assert "12 tokens" in page.page.inner_text("#try-stats")
    page.wait_count(page.log("request", "helper"), 1, SHOWN_S)
    page.wait_state("helper", "ready")
    assert served.post("/unload", {"model": "helper"}).status_code == 200
    page.wait_state("helper", "unloaded", SHOWN_S)


def test_a_killed_child_shows_as_a_crash(page: Page, served: Served) -> None:
    assert served.post("/load", {"model": "chat"}).status_code == 200
    page.wait_state("chat", "ready", SHOWN_S)
    pid = served.models()["chat"]["pid"]
    assert pid > 0
    os.kill(pid, signal.SIGKILL)
    page.wait_count(page.log("crash", "chat"), 1, 5)
    page.wait_state("chat", "failed", SHOWN_S)
    entry = page.log("crash", "chat").first.inner_text()
    assert "crashed" in entry
    assert "SIGKILL" in entry  # the exit status, as mmctl events prints it


def test_disconnected_while_the_daemon_is_away_then_resumed(page: Page, served: Served) -> None:
    served.daemon.stop()
    page.page.wait_for_selector("#conn[data-state=disconnected]", timeout=10_000)
    assert "disconnected" in page.page.inner_text("#conn")
    served.daemon.start()
    # The page retries with backoff (at most 4 s apart) and draws the new daemon's state.
    page.connected(timeout=15)
    page.wait_state("chat", "unloaded")
    assert served.post("/load", {"model": "chat"}).status_code == 200
    page.wait_state("chat", "ready", SHOWN_S)


def test_with_api_keys_the_page_asks_for_the_key(
    browser: Any, model_files: dict[str, Path]
) -> None:
    keyed = Served(model_files, keys=f'api_keys = ["{KEY}"]').start()
    tab = None
    try:
        # The page itself is public; everything it shows needs the key.
        assert httpx.get(keyed.url + "/", timeout=10).status_code == 200
        refused = httpx.post(keyed.url + "/load", json={"model": "chat"}, timeout=10)
        assert refused.status_code == 401
        tab = Page(browser, keyed.url)
        dialog = tab.page.locator("#key-dialog")
        dialog.wait_for(state="visible", timeout=10_000)
        assert tab.page.inner_text("#conn") != "connected"
        tab.page.fill("#key-input", "wrong-key")
        tab.page.click("#key-form button[type=submit]")
        tab.page.wait_for_selector("#key-message.refused", timeout=10_000)
        tab.page.fill("#key-input", KEY)
        tab.page.click("#key-form button[type=submit]")
        tab.connected()
        assert not dialog.is_visible()
        assert tab.page.evaluate("localStorage.getItem('mmd.apiKey')") == KEY

        tab.row("chat").get_by_role("button", name="Load chat").click()
        tab.wait_state("chat", "ready")
        assert keyed.models()["chat"]["state"] == "ready"

        # The same POST from the page without the key is refused, and so is one naming
        # another site as its origin (a cross-site form or script).
        status = tab.page.evaluate(
            """async () => (await fetch('/unload', {method: 'POST',
                headers: {'Content-Type': 'application/json'},
                body: JSON.stringify({model: 'chat'})})).status"""
        )
        assert status == 401
        cross = httpx.post(
            keyed.url + "/unload",
            json={"model": "chat"},
            headers={**keyed.headers, "Origin": "http://evil.example"},
            timeout=10,
        )
        assert cross.status_code == 403
        assert keyed.models()["chat"]["state"] == "ready"
        # A reload keeps the key: no question this time.
        tab.page.reload()
        tab.connected()
        assert not dialog.is_visible()
    finally:
        if tab is not None:
            tab.close()
        keyed.close()
