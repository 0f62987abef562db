"""Durable before acknowledged (issue 19, item 3): every capture whose response reached a client is in the
store exactly once afterwards, whether the store goes away mid-traffic (a private PostgreSQL cluster stopped
and started again), the writer dies, or the proxy and its writer are killed with SIGKILL (real processes)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from kolm_pipeline.capture.background import BackgroundServer
from kolm_pipeline.capture.forward import scrub_secret
from kolm_pipeline.capture_server import CAPTURE_ID_HEADER, create_app
from kolm_pipeline.demo.teacher import create_teacher_app
from kolm_pipeline.settings import CaptureConfig, load_settings
from kolm_pipeline.store import CaptureStore
from kolm_pipeline.store.tables import captures

PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin"))


@dataclasses.dataclass
class Cluster:
    """A throwaway PostgreSQL cluster in a temp dir, owned by the `postgres` user when run as root."""

    data: Path
    port: int
    bin: Path

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data / "db"), "-o", options, "-l", str(self.data / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data / "db"), "-m", mode, "-w", "stop")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if not PG_BINS or not (PG_BINS[-1] / "initdb").exists():
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start a private PostgreSQL")
    # Not under pytest's temp root: that is private to root, and the server runs as `postgres`.
    data = Path(tempfile.mkdtemp(prefix="kolm-pg-"))
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    cluster = Cluster(data, _free_port(), PG_BINS[-1])
    cluster._run("initdb", "-D", str(data / "db"), "-U", "postgres", "-A", "trust", "--no-sync")
    cluster.start()
    try:
        yield cluster
    finally:
        with contextlib.suppress(RuntimeError):
            cluster.stop("immediate")
        shutil.rmtree(data, ignore_errors=True)


def _send(client: httpx.Client, url: str, headers: dict[str, str], n: int) -> str | None:
    """One call, plain or streamed; returns the capture id the client was acknowledged with, if any."""
    stream = n % 3 == 0
    body = {"model": "gpt-4o", "stream": stream, "messages": [{"role": "user", "content": f"question {n}"}]}
    try:
        if stream:
            with client.stream("POST", url, json=body, headers=headers) as resp:
                text = b"".join(resp.iter_bytes())
                ok = resp.status_code == 200 and b"[DONE]" in text
                return resp.headers.get(CAPTURE_ID_HEADER) if ok else None
        resp = client.post(url, json=body, headers=headers)
    except httpx.HTTPError:
        return None
    return resp.headers.get(CAPTURE_ID_HEADER) if resp.status_code == 200 else None


class Traffic:
    """Four clients calling the proxy until `stop` is set; `acknowledged` holds the capture ids they received."""

    def __init__(self, url: str, headers: dict[str, str], clients: int = 4) -> None:
        self.url, self.headers = url, headers
        self.acknowledged: list[str] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._counter = iter(range(1_000_000))
        self.workers = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                with self._lock:
                    n = next(self._counter)
                capture_id = _send(client, self.url, self.headers, n)
                if capture_id:
                    with self._lock:
                        self.acknowledged.append(capture_id)


def test_store_down_mid_traffic_loses_nothing(cluster: Cluster, tmp_path: Path) -> None:
    store = CaptureStore(cluster.url)
    key = store.create_tenant("acme")
    config = CaptureConfig(replay_interval_s=0.2, retention_sweep_s=0)
    teacher = BackgroundServer(create_teacher_app({}))
    home = tmp_path / "home"
    settings = load_settings(home).model_copy(update={"upstream_openai": f"{teacher.url}/v1"})
    app = create_app(settings, store, config)
    proxy = BackgroundServer(app)
    url = f"{proxy.url}/v1/capture/openai/chat/completions"
    headers = {"authorization": f"Bearer {key}", "x-kolm-namespace": "support", "x-upstream-api-key": "k-1"}
    traffic = Traffic(url, headers)
    acknowledged, stop, workers = traffic.acknowledged, traffic.stop, traffic.workers
    try:
        for worker in workers:
            worker.start()
        time.sleep(1.0)
        cluster.stop("fast")  # mid-traffic: batches fail, the captures wait in the journal
        down_at = len(acknowledged)
        time.sleep(1.5)
        assert len(acknowledged) > down_at, "the proxy must keep answering while the store is down"
        assert app.state.recorder.unstored() > 0
        cluster.start()
        time.sleep(1.0)
        stop.set()
        for worker in workers:
            worker.join(30)
        app.state.recorder.flush_threadsafe(20)
        assert app.state.recorder.unstored() == 0

        # The store goes down again and the proxy itself stops: the journal on disk carries the captures
        # over to the next proxy process.
        cluster.stop("fast")
        with httpx.Client(timeout=10) as client:
            late = [_send(client, url, headers, 10_000 + n) for n in range(6)]
        assert all(late)
        acknowledged.extend(late)  # type: ignore[arg-type]
        app.state.recorder.flush_threadsafe(0.5)  # cannot finish: the store is down
        proxy.stop()
        assert len(list((home / "capture-log").iterdir())) == 1, "the stopped proxy's journal stays"
        cluster.start()
        second = create_app(settings, CaptureStore(cluster.url), config)
        with BackgroundServer(second):
            _wait_for(lambda: not list((home / "capture-log").iterdir())[1:], 20)  # adopted, stored, removed
    finally:
        stop.set()
        proxy.stop()
        teacher.stop()

    assert app.state.recorder.stats["lost"] == 0
    with store.engine.connect() as conn:
        rows = conn.execute(select(captures.c.request_id, func.count()).group_by(captures.c.request_id)).all()
    stored = dict(rows)
    assert len(acknowledged) > 20
    missing = [capture_id for capture_id in acknowledged if capture_id not in stored]
    assert missing == []
    assert all(count == 1 for count in stored.values())
    # Nothing the client never saw was invented either: the extra rows are calls cut off by the stop.
    assert len(stored) - len(acknowledged) <= 4
    store.close()


def _wait_for(condition: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _proxy_with_a_writer_process(home: Path):
    """A stand-in teacher, a store and a capture app (not yet serving) whose writer is a process of its own."""
    teacher = BackgroundServer(create_teacher_app({}))
    settings = load_settings(home).model_copy(update={"upstream_openai": f"{teacher.url}/v1"})
    store = CaptureStore(settings.store_url)
    key = store.create_tenant("acme")
    app = create_app(settings, store, CaptureConfig(retention_sweep_s=0, writer_poll_s=0.01, replay_interval_s=0.2))
    headers = {"authorization": f"Bearer {key}", "x-kolm-namespace": "support", "x-upstream-api-key": "k-1"}
    return teacher, store, app, headers


def _stored_by_the_writer(recorder, client: httpx.Client, url: str, headers: dict[str, str],
                          acknowledged: list[str | None]) -> None:
    """One capture, stored by the writer process: past its start-up, where it sets its signal actions."""
    acknowledged.append(_send(client, url, headers, 100))
    assert acknowledged[-1]
    recorder.flush_threadsafe()
    assert recorder.unstored() == 0


@pytest.mark.parametrize("ending", ["killed", "terminated"])
def test_writer_process_ending_loses_nothing(ending: str, tmp_path: Path) -> None:
    """The writer process is frozen while captures are journaled, then killed (or asked to stop with
    SIGTERM): none is lost or stored twice; the proxy starts a new writer, which stores them from the journal."""
    teacher, store, app, headers = _proxy_with_a_writer_process(tmp_path / "home")
    recorder = app.state.recorder
    acknowledged: list[str] = []
    try:
        with BackgroundServer(app) as proxy, httpx.Client(timeout=10) as client:
            url = f"{proxy.url}/v1/capture/openai/chat/completions"
            first = recorder.writer_pid
            assert first is not None, "captures are written by a separate process"
            # Frozen once it runs: a writer still starting up has not yet restored SIGTERM's default action.
            _stored_by_the_writer(recorder, client, url, headers, acknowledged)
            os.kill(first, signal.SIGSTOP)
            acknowledged += [_send(client, url, headers, n) for n in range(12)]
            time.sleep(0.2)
            assert recorder.unstored() > 0  # journaled, not stored: the writer is frozen
            os.kill(first, signal.SIGKILL if ending == "killed" else signal.SIGTERM)
            os.kill(first, signal.SIGCONT)
            _wait_for(lambda: recorder.writer_pid not in (None, first))
            acknowledged += [_send(client, url, headers, n) for n in range(12, 18)]
            recorder.flush_threadsafe()
        assert all(acknowledged) and recorder.stats["lost"] == 0
        with store.engine.connect() as conn:
            rows = dict(conn.execute(select(captures.c.request_id, func.count()).group_by(captures.c.request_id)).all())
        assert sorted(rows) == sorted(acknowledged)  # type: ignore[type-var]
        assert set(rows.values()) == {1}
    finally:
        teacher.stop()
        store.close()


def test_a_writer_started_where_sigterm_is_ignored_still_ends_on_sigterm(tmp_path: Path) -> None:
    """A process that ignores SIGTERM passes that on to what it starts (a Dagster step maps SIGTERM to its SIGINT
    handler, which pytest-xdist workers ignore). The writer restores SIGTERM's default action, so SIGTERM still ends
    it at once and the proxy starts a new one."""
    teacher, store, app, headers = _proxy_with_a_writer_process(tmp_path / "home")
    recorder = app.state.recorder
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with BackgroundServer(app) as proxy, httpx.Client(timeout=10) as client:
            writer = recorder.writer_pid
            assert writer is not None
            signal.signal(signal.SIGTERM, previous)
            _stored_by_the_writer(recorder, client, f"{proxy.url}/v1/capture/openai/chat/completions", headers, [])
            os.kill(writer, signal.SIGTERM)
            _wait_for(lambda: recorder.writer_pid not in (None, writer))
    finally:
        signal.signal(signal.SIGTERM, previous)
        teacher.stop()
        store.close()


def test_a_proxy_stopping_stores_what_a_starved_writer_had_not(tmp_path: Path) -> None:
    """The writer runs at SCHED_IDLE, which a process without CAP_SYS_NICE cannot leave: on a host whose cores are
    busy it may get no CPU time at all (frozen here, the same to it). The proxy's stop still ends it at once and
    stores what the journal holds, exactly once, well within a grace period (Kubernetes: 30 s)."""
    teacher, store, app, headers = _proxy_with_a_writer_process(tmp_path / "home")
    recorder = app.state.recorder
    try:
        with BackgroundServer(app) as proxy, httpx.Client(timeout=10) as client:
            url = f"{proxy.url}/v1/capture/openai/chat/completions"
            writer = recorder.writer_pid
            assert writer is not None
            acknowledged = [_send(client, url, headers, 0)]
            _wait_for(lambda: recorder.unstored() == 0)  # the writer is past its start-up
            os.kill(writer, signal.SIGSTOP)
            acknowledged += [_send(client, url, headers, n) for n in range(1, 9)]
            assert all(acknowledged) and recorder.unstored() > 0
            stopping = time.monotonic()
        assert time.monotonic() - stopping < 8  # a stop waiting on the writer took 10 s or more
        with pytest.raises(ProcessLookupError):
            os.kill(writer, 0)
        with store.engine.connect() as conn:
            rows = dict(conn.execute(select(captures.c.request_id, func.count()).group_by(captures.c.request_id)).all())
        assert sorted(rows) == sorted(acknowledged) and set(rows.values()) == {1}  # type: ignore[type-var]
    finally:
        teacher.stop()
        store.close()


def _start_proxy(home: Path, upstream: str, port: int) -> subprocess.Popen[bytes]:
    """`kolm capture serve` as its own process, as production runs it."""
    env = {**os.environ, "KOLM_HOME": str(home), "KOLM_UPSTREAM_OPENAI": f"{upstream}/v1",
           "KOLM_CAPTURE_RETENTION_SWEEP_S": "0", "KOLM_CAPTURE_REPLAY_INTERVAL_S": "0.2"}
    env.pop("KOLM_STORE_URL", None)
    process = subprocess.Popen([sys.executable, "-m", "kolm_pipeline.cli", "capture", "serve", "--host",
                                "127.0.0.1", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else "proxy exited"
        assert time.monotonic() < deadline, "proxy did not start"
        time.sleep(0.1)


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (the writer is started from a worker thread, so the main thread's
    `children` file does not list it)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def test_kill_9_of_the_proxy_and_its_writer_loses_no_acknowledged_capture(tmp_path: Path) -> None:
    """Reported: 100 of 150 acknowledged captures were gone after kill -9 of the proxy (they lived only in
    its memory). Now: traffic from 4 clients, the writer frozen so captures pile up journaled but unstored,
    then SIGKILL to the proxy and its writer; a new proxy on the same KOLM_HOME stores every acknowledged
    capture exactly once and removes the dead proxy's journal."""
    home = tmp_path / "home"
    store = CaptureStore(load_settings(home).store_url)
    key = store.create_tenant("acme")
    teacher = BackgroundServer(create_teacher_app({}))
    port = _free_port()
    proxy = _start_proxy(home, teacher.url, port)
    url = f"http://127.0.0.1:{port}/v1/capture/openai/chat/completions"
    headers = {"authorization": f"Bearer {key}", "x-kolm-namespace": "support", "x-upstream-api-key": "k-1"}
    traffic = Traffic(url, headers)
    acknowledged, stop, workers = traffic.acknowledged, traffic.stop, traffic.workers
    second = None
    try:
        [writer] = _children(proxy.pid)
        for worker in workers:
            worker.start()
        time.sleep(1.0)
        os.kill(writer, signal.SIGSTOP)  # captures keep coming and stay journaled, unstored
        time.sleep(1.0)
        os.kill(proxy.pid, signal.SIGKILL)
        os.kill(writer, signal.SIGKILL)
        stop.set()
        for worker in workers:
            worker.join(30)
        proxy.wait(10)
        with store.engine.connect() as conn:
            stored_before = conn.execute(select(func.count()).select_from(captures)).scalar_one()
        assert len(acknowledged) > 40 and stored_before < len(acknowledged), (stored_before, len(acknowledged))

        second = _start_proxy(home, teacher.url, _free_port())

        def stored() -> dict[str, int]:
            with store.engine.connect() as conn:
                query = select(captures.c.request_id, func.count()).group_by(captures.c.request_id)
                return dict(conn.execute(query).all())

        _wait_for(lambda: set(acknowledged) <= set(stored()), 30)
        rows = stored()
        assert all(count == 1 for count in rows.values())
        assert len(rows) - len(acknowledged) <= len(workers)  # calls cut off by the kill, never acknowledged
        _wait_for(lambda: len(list((home / "capture-log").iterdir())) == 1, 10)  # only the new proxy's own
    finally:
        stop.set()
        for process in (proxy, second):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGINT)
                process.wait(30)
        teacher.stop()
        store.close()
    assert not list((home / "capture-log").iterdir()), "a proxy that stops cleanly removes its journal"


@settings(max_examples=300, deadline=None)
@given(
    key=st.text(alphabet=string.ascii_letters + string.digits + '-_/"\\', min_size=8, max_size=40),
    escaped=st.lists(st.booleans(), min_size=40, max_size=40),
    upper=st.booleans(),
)
# Found by CI (session 12): a key ending in a backslash, whose plain spelling is the start of its \u005c escape.
@example(key="0000000\\", escaped=[False] * 40, upper=False)
def test_the_provider_key_never_reaches_the_journal_however_json_spells_it(
    key: str, escaped: list[bool], upper: bool
) -> None:
    """The journal is on disk, so the provider key is removed before a record is appended: every spelling
    JSON allows (each character itself or as a \\u escape in either case, `/` as `\\/`) is found."""
    spelt = ""
    for char, escape in zip(key, escaped, strict=False):
        if escape or char in '"\\':
            code = f"\\u{ord(char):04x}"
            spelt += code.upper().replace("\\U", "\\u") if upper else code
        else:
            spelt += "\\/" if char == "/" and upper else char
    body = ('{"model": "gpt-4o", "messages": [{"role": "user", "content": "my key is ' + spelt + '!"}]}').encode()
    assert json.loads(body)["messages"][0]["content"] == f"my key is {key}!"  # the body does hold the key
    scrubbed = scrub_secret(body, key)
    assert key not in json.loads(scrubbed)["messages"][0]["content"]
    assert json.loads(scrubbed)["messages"][0]["content"] == "my key is [redacted]!"


def test_a_spool_left_by_an_older_version_is_stored_once(tmp_path: Path) -> None:
    """Upgrading loses nothing: spool files of versions before the journal are stored and removed, and their
    quarantine joins the new one (where retention reaches it)."""
    from kolm_pipeline.capture.batch import _encode
    from kolm_pipeline.store import NewCapture

    home = tmp_path / "home"
    settings = load_settings(home)
    store = CaptureStore(settings.store_url)
    store.create_tenant("acme")
    record = NewCapture(request_id="legacy-1", tenant="acme", namespace="support", provider="openai", model="m",
                        messages=[{"role": "user", "content": "old"}], output_text="fin-ops", latency_us=1,
                        status="ok", http_status=200)
    (settings.spool_dir / "failed").mkdir(parents=True)
    (settings.spool_dir / "0001-a.jsonl").write_text(_encode(record) + "\n")
    (settings.spool_dir / "failed" / "0000-b.jsonl").write_text("{}\n")
    app = create_app(settings, store, CaptureConfig(retention_sweep_s=0, replay_interval_s=0.1))
    with BackgroundServer(app):
        _wait_for(lambda: not list(settings.spool_dir.glob("*.jsonl")), 20)
    assert [row.request_id for row in store.list_captures("acme")] == ["legacy-1"]
    assert (settings.quarantine_dir / "0000-b.jsonl").exists()
    store.close()
