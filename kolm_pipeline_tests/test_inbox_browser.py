"""The HTML inbox in a real headless Chromium, driven over the DevTools protocol: load the page, click
Keep on a capture with a real mouse event, and watch the kept counter change."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path
from typing import Any

import httpx
import pytest

from kolm_pipeline_tests.test_capture import Proxy, start_proxy, teacher  # noqa: F401 (fixtures)

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)


class Browser:
    """Just enough of the DevTools protocol: evaluate JavaScript, dispatch mouse events, take screenshots."""

    def __init__(self, ws_url: str) -> None:
        import websocket  # websocket-client

        self._ws = websocket.create_connection(ws_url, timeout=20, suppress_origin=True)
        self._ids = count(1)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        self._ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self._ws.recv())
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def eval(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expression}")

    def click(self, selector: str) -> None:
        box = self.eval(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def close(self) -> None:
        self._ws.close()


@pytest.fixture
def browser() -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    pytest.importorskip("websocket", reason="websocket-client is needed to drive Chromium")
    profile = Path(tempfile.mkdtemp(prefix="kolm-chromium-"))
    process = subprocess.Popen(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--window-size=1280,900",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("chromium did not start")
            time.sleep(0.05)
        port = int(port_file.read_text().splitlines()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        client = Browser(page["webSocketDebuggerUrl"])
        try:
            yield client
        finally:
            client.close()
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(profile, ignore_errors=True)


def test_keep_button_changes_the_counter(
    start_proxy: Callable[..., Proxy],  # noqa: F811
    teacher: str,  # noqa: F811
    browser: Browser,
) -> None:
    proxy = start_proxy(teacher)
    client = proxy.openai()
    for text in ["I was charged twice", "Where is my parcel?", "<img src=x onerror=alert(1)>"]:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": text}])
    proxy.flush()
    first = min(row.id for row in proxy.store.list_captures("acme"))

    browser.send("Page.enable")
    browser.send("Page.navigate", url=f"{proxy.url}/inbox#key={proxy.key}")
    browser.wait_for("document.querySelectorAll('#captures tr').length === 3")
    assert browser.eval("location.hash") == ""  # the key left the address bar at once
    assert browser.eval("document.getElementById('counter-captured').textContent") == "3"
    assert browser.eval("document.getElementById('counter-kept').textContent") == "0"
    assert browser.eval("document.getElementById('switch-retention_days').textContent") == "30"
    # Capture text is shown as text, never run as markup.
    assert browser.eval("document.querySelectorAll('#captures img').length") == 0

    browser.click(f'tr[data-id="{first}"] button[data-action="kept"]')
    browser.wait_for("document.getElementById('counter-kept').textContent === '1'")
    assert browser.eval("document.getElementById('counter-untriaged').textContent") == "2"
    assert browser.eval("document.querySelectorAll('#captures tr').length") == 2  # the kept one left the list
    assert proxy.store.get_capture("acme", first).triage_state == "kept"

    shot = os.environ.get("KOLM_INBOX_SCREENSHOT")
    if shot:
        data = browser.send("Page.captureScreenshot", format="png")["data"]
        Path(shot).write_bytes(base64.b64decode(data))
