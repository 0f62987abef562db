"""The write path survives the store going away: a private PostgreSQL cluster is stopped mid-traffic and
started again; every capture whose response reached a client is in the store exactly once afterwards."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from kolm_pipeline.capture.background import BackgroundServer
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
    acknowledged: list[str] = []
    lock = threading.Lock()
    counter = iter(range(1_000_000))
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                with lock:
                    n = next(counter)
                capture_id = _send(client, url, headers, n)
                if capture_id:
                    with lock:
                        acknowledged.append(capture_id)

    workers = [threading.Thread(target=traffic) for _ in range(4)]
    try:
        for worker in workers:
            worker.start()
        time.sleep(1.0)
        cluster.stop("fast")  # mid-traffic: in-flight batches fail, the proxy spools
        down_at = len(acknowledged)
        time.sleep(1.5)
        assert len(acknowledged) > down_at, "the proxy must keep answering while the store is down"
        assert app.state.recorder.spooled() > 0
        cluster.start()
        time.sleep(1.0)
        stop.set()
        for worker in workers:
            worker.join(30)
        app.state.recorder.flush_threadsafe()
        deadline = time.monotonic() + 20
        while app.state.recorder.spooled() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert app.state.recorder.spooled() == 0

        # The store goes down again and the proxy itself stops: the spool on disk carries the captures
        # over to the next proxy process.
        cluster.stop("fast")
        with httpx.Client(timeout=10) as client:
            late = [_send(client, url, headers, 10_000 + n) for n in range(6)]
        assert all(late)
        acknowledged.extend(late)  # type: ignore[arg-type]
        proxy.stop()
        assert app.state.recorder.spooled() >= len(late)
        cluster.start()
        second = create_app(settings, CaptureStore(cluster.url), config)
        with BackgroundServer(second):
            deadline = time.monotonic() + 20
            while second.state.recorder.spooled() and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        stop.set()
        proxy.stop()
        teacher.stop()

    assert app.state.recorder.stats["spooled"] > 0 and app.state.recorder.stats["lost"] == 0
    with store.engine.connect() as conn:
        rows = conn.execute(select(captures.c.request_id, func.count()).group_by(captures.c.request_id)).all()
    stored = dict(rows)
    assert len(acknowledged) > 20
    missing = [capture_id for capture_id in acknowledged if capture_id not in stored]
    assert missing == []
    assert all(count == 1 for count in stored.values())
    # Nothing the client never saw was invented either: the extra rows are calls cut off by the stop.
    assert len(stored) - len(acknowledged) <= 4
    assert not list((home / "spool").glob("*.jsonl"))
    store.close()


def _wait_for(condition: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("ending", ["killed", "terminated"])
def test_writer_process_ending_loses_nothing(ending: str, tmp_path: Path) -> None:
    """Captures sit in a writer process that is frozen and then killed (or asked to stop with SIGTERM):
    none is lost or stored twice; the proxy writes what the writer never acknowledged and starts a new one."""
    home = tmp_path / "home"
    teacher = BackgroundServer(create_teacher_app({}))
    settings = load_settings(home).model_copy(update={"upstream_openai": f"{teacher.url}/v1"})
    store = CaptureStore(settings.store_url)
    key = store.create_tenant("acme")
    app = create_app(settings, store, CaptureConfig(retention_sweep_s=0, batch_linger_s=0.01))
    recorder = app.state.recorder
    headers = {"authorization": f"Bearer {key}", "x-kolm-namespace": "support", "x-upstream-api-key": "k-1"}
    acknowledged: list[str] = []
    try:
        with BackgroundServer(app) as proxy, httpx.Client(timeout=10) as client:
            url = f"{proxy.url}/v1/capture/openai/chat/completions"
            first = recorder.writer_pid
            assert first is not None, "captures are written by a separate process"
            os.kill(first, signal.SIGSTOP)
            acknowledged += [_send(client, url, headers, n) for n in range(12)]
            time.sleep(0.2)  # the batches are on their way to the frozen writer, not acknowledged
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


def test_records_held_for_the_writer_leave_the_collectors_care(tmp_path: Path) -> None:
    """The proxy keeps every finished call until the writer acknowledges it. What it keeps holds no
    container, so the garbage collector stops tracking it at its first pass instead of walking it again at
    each of the collections it lives through."""
    import asyncio
    import gc

    from kolm_pipeline.capture.batch import Pending
    from kolm_pipeline.capture.recorder import Recorder

    async def held() -> list[object]:
        recorder = Recorder(CaptureStore(f"sqlite:///{tmp_path / 'captures.db'}"), separate_process=False)
        await recorder.start()
        recorder.begin()
        recorder.submit(
            Pending("r", "t", "n", "openai", "m", b"{}", ("a", "b"), False, "sk", "reply", 200, b"{}", 1, 0.0)
        )
        outbox = list(recorder._outbox)
        await recorder.stop()
        return outbox

    [record] = asyncio.run(held())
    gc.collect()
    assert not gc.is_tracked(record)
