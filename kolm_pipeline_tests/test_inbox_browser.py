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
    # The kept one leaves the list: refresh() shows the counters first and the list after its own request.
    browser.wait_for("document.querySelectorAll('#captures tr').length === 2")
    assert proxy.store.get_capture("acme", first).triage_state == "kept"

    shot = os.environ.get("KOLM_INBOX_SCREENSHOT")
    if shot:
        data = browser.send("Page.captureScreenshot", format="png")["data"]
        Path(shot).write_bytes(base64.b64decode(data))


def _type(browser: Browser, selector: str, text: str, enter: bool = False) -> None:
    """Focus a field with a click, replace its text as typed text, and optionally press Enter."""
    browser.click(selector)
    browser.eval(f"document.querySelector({json.dumps(selector)}).select()")
    browser.send("Input.insertText", text=text)
    if enter:
        for kind in ("keyDown", "keyUp"):
            browser.send("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                         **({"text": "\r"} if kind == "keyDown" else {}))


def test_dataset_view_keeps_and_corrects_with_a_key_from_the_cli(kolm_settings, ticket_store, browser, capsys) -> None:
    """A newcomer's path to the data: `kolm tenant key` issues a key, the inbox lists the namespace's captures a
    page at a time, filters them by text, keeps one and corrects another; the store has both, with the key's id
    as the actor, and the correction redacted as the namespace redacts captures."""
    import re

    from kolm_pipeline.capture.background import BackgroundServer
    from kolm_pipeline.capture_server import create_app
    from kolm_pipeline.cli import main
    from kolm_pipeline.settings import CaptureConfig
    from kolm_pipeline.store import CaptureFilter

    assert main(["tenant", "create", "acme"]) == 0
    assert main(["tenant", "key", "acme", "--actor", "newcomer"]) == 0
    out = capsys.readouterr().out
    key = re.search(r"kolm key \(shown once, store it now\): (kolm_\S+)", out.splitlines()[-1]).group(1)
    key_id = re.search(r"key ([0-9a-f]{8}) issued for tenant acme", out).group(1)
    searched = ticket_store.find_captures("acme", CaptureFilter(namespace="support", search="REFUND"), limit=1000)
    assert 0 < searched.total < 160

    server = BackgroundServer(create_app(kolm_settings, ticket_store, CaptureConfig(retention_sweep_s=0)))
    try:
        browser.send("Page.enable")
        browser.send("Page.navigate", url=f"{server.url}/inbox#key={key}")
        browser.wait_for("document.querySelectorAll('#captures tr').length === 50")
        assert browser.eval("document.getElementById('page').textContent") == "1–50 of 160"
        assert browser.eval("document.getElementById('counter-captured').textContent") == "160"
        browser.click("#next")
        browser.wait_for("document.getElementById('page').textContent === '51–100 of 160'")

        _type(browser, "#search", "refund", enter=True)
        browser.wait_for(f"document.getElementById('page').textContent === '1–{searched.total} of {searched.total}'")
        shown = browser.eval("[...document.querySelectorAll('#captures tr')].map(r => Number(r.dataset.id))")
        assert shown == [capture.id for capture in searched.captures]
        kept_id, corrected_id = shown[0], shown[1]

        browser.click(f'tr[data-id="{kept_id}"] button[data-action="kept"]')
        browser.wait_for("document.getElementById('counter-kept').textContent === '1'")
        # refresh() shows the counters before the list's next page arrives: the row leaves the view just after.
        browser.wait_for(f"!document.querySelector('tr[data-id=\"{kept_id}\"]')")

        browser.click(f'tr[data-id="{corrected_id}"] button[data-action="correct"]')
        browser.wait_for("Boolean(document.querySelector('tr.editor textarea'))")
        _type(browser, "tr.editor textarea", "fin-ops (refund asked by jane.doe@example.com)")
        browser.click('tr.editor button[data-action="save-correction"]')
        browser.wait_for(f"(document.querySelector('tr[data-id=\"{corrected_id}\"] td.output') || {{}}).textContent"
                         " === 'correctedfin-ops (refund asked by <EMAIL>)'")
        assert browser.eval("document.getElementById('message').textContent") == (
            "correction saved (redacted before it was stored)")
    finally:
        server.stop()

    kept = ticket_store.get_capture("acme", kept_id)
    assert (kept.triage_state, kept.triaged_by) == ("kept", f"key:{key_id}")
    corrected = ticket_store.get_capture("acme", corrected_id)
    assert corrected.feedback_output == "fin-ops (refund asked by <EMAIL>)"
    [audit] = [row for row in ticket_store.audit_rows("acme", "support") if row.action == "feedback.set"]
    assert (audit.actor, audit.detail["id"], audit.detail["correction"]) == (f"key:{key_id}", corrected_id, True)


def test_student_disagreements_are_listed_for_triage(
    start_proxy: Callable[..., Proxy],  # noqa: F811
    teacher: str,  # noqa: F811
    browser: Browser,
) -> None:
    """Issue 23: with the namespace routed `shadow`, the page shows the routing figures and lists the requests
    where the deployed adapter disagreed with the teacher, each with both answers and a Keep button."""
    from kolm_pipeline.store.student_routing import Comparison

    proxy = start_proxy(teacher)
    client = proxy.openai()
    for text in ["I was charged twice", "Where is my parcel?"]:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": text}])
    proxy.flush()
    charged, parcel = sorted(proxy.store.list_captures("acme"), key=lambda c: c.id)
    cid = "bafkreiexampleadapter"
    proxy.store.add_registry_row(task="acme.support", from_cid=None, to_cid=cid, k_before=None, k_after=None,
                                 decision="swap", actor="test", details={})
    proxy.store.set_switches("acme", "support", "test", routing="shadow")
    proxy.store.add_comparisons([
        Comparison("acme", "support", charged.request_id, cid, "shadow", 1.0, 0.9, "fin-ops", 9000, 3000),
        Comparison("acme", "support", parcel.request_id, cid, "shadow", 0.0, 0.4, "<b>billing</b>", 9000, 3000),
    ])

    browser.send("Page.enable")
    browser.send("Page.navigate", url=f"{proxy.url}/inbox#key={proxy.key}")
    browser.wait_for("document.querySelectorAll('#disagreements tr').length === 1")
    assert browser.eval("document.getElementById('switch-routing').textContent") == "shadow"
    assert "agreement 0.500 over 2 compared" in browser.eval("document.getElementById('routing').textContent")
    row = f'#disagreements tr[data-id="{parcel.id}"]'
    cells = browser.eval(f"[...document.querySelectorAll('{row} td')].map(td => td.textContent)")
    assert cells[:6] == [str(parcel.id), "shadow", "0.00", "0.400", parcel.output_text, "<b>billing</b>"]
    assert browser.eval("document.querySelectorAll('#disagreements b').length") == 0  # text, never markup

    # The captures list renders after the disagreements (above them): wait for it, then bring the button into view,
    # so the click lands where the button is.
    browser.wait_for("document.querySelectorAll('#captures tr').length === 2")
    browser.eval(f"document.querySelector('{row} button').scrollIntoView({{block: 'center'}})")
    browser.click(f'{row} button')  # Keep
    browser.wait_for("document.getElementById('counter-kept').textContent === '1'")
    assert proxy.store.get_capture("acme", parcel.id).triage_state == "kept"
