"""Serving runtime: the base model plus the active adapter of each task, swapped in the background.

A watcher thread polls the task pointers (``adapters/<task>``). When one names a new artifact it
verifies the archive (signatures, receipt chain, CIDs, base model), extracts the adapter, loads it
under a CID-derived name and warms it, and only then routes new requests to it. Requests already
running hold a lease on the adapter they started with and finish on it (closed-vocabulary requests are
bound to an adapter when their batch runs, so those still queued at the flip get the new one); a
replaced adapter is unloaded once its grace period is over and no lease is left. Requests never wait
for a load.

With ``registry`` (``kolm serve --follow registry``) the runtime follows the store's registry instead of pointer
files: each task's champion is its newest ``swap``/``rollback`` row, the artifact is fetched by CID from the
object store (``KOLM_ARTIFACTS_URL``) into this host's cache and verified with the public keys published in the
store (and any in ``KOLM_HOME/keys``). Replicas that share only PostgreSQL and the object store converge within a
poll. An artifact that cannot be fetched or verified is refused: the previous adapter keeps serving and
``/healthz`` says why.

Every answer is also shown to the live monitor (``serve/monitor.py``), which rolls a task back when its
adapter does worse in service than its evaluation said; the watcher then swaps back like for any move.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kolm_pipeline.corpus.json_grammar import JsonSchemaProblem, json_grammar
from kolm_pipeline.provenance.errors import DeployRefused, RegistryError
from kolm_pipeline.provenance.keys import load_public_keys, tenant_key_from_text
from kolm_pipeline.registry.artifact import extract_adapter, verify_kolm
from kolm_pipeline.registry.manage import local_artifact
from kolm_pipeline.registry.swap import read_pointer, validate_task
from kolm_pipeline.serve.backends import Backend, BackendError
from kolm_pipeline.serve.lease import Lease, LoadedAdapter
from kolm_pipeline.serve.monitor import Cut, LiveMonitor, MonitorConfig, Profile, roll_back_on_trip
from kolm_pipeline.settings import Settings
from kolm_pipeline.store import CaptureStore

log = logging.getLogger("kolm.serve")


class UnknownTask(Exception):
    """No adapter serves the requested task (never deployed, or its artifact was refused)."""


class ArtifactRefused(Exception):
    """The artifact a pointer names cannot be served; the message says what failed."""


# A refused artifact is verified again after this long (a key may have been published since); one that could not
# be fetched from the object store is fetched again after FETCH_RETRY_S.
REFUSAL_RETRY_S = 30.0
FETCH_RETRY_S = 5.0
_UNFETCHED = (0, 0)


def adapter_name(cid: str) -> str:
    """The name an artifact's adapter is loaded under: derived from its CID, so it never collides."""
    return f"kolm-{cid}"


@dataclass
class _Refusal:
    cid: str
    stamp: tuple[int, int]
    reason: str
    at: float = field(default_factory=time.time)
    since: float = field(default_factory=time.monotonic)  # for the retry delays
    retry: bool = True  # a refusal a later attempt may lift (a key published since, the object store back)


class ServingRuntime:
    """Routes each task to its active adapter and keeps that adapter in step with the task's pointer."""

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        *,
        poll_interval: float = 0.1,
        grace_seconds: float = 5.0,
        monitor: MonitorConfig | None = None,
        registry: CaptureStore | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.backend = backend
        self.poll_interval = poll_interval
        self.grace_seconds = grace_seconds
        self.cache_dir = settings.home / "serve-cache"
        self._state = threading.Lock()
        self._active: dict[str, LoadedAdapter] = {}
        self._retired: list[LoadedAdapter] = []
        self._refused: dict[str, _Refusal] = {}
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._sync_lock = threading.Lock()
        config = monitor or MonitorConfig()
        self.monitor = LiveMonitor(config, lambda trip: roll_back_on_trip(settings, trip)) if config.enabled else None

    # --- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the backend and every task's current adapter, then watch the pointers in the background."""
        if self._watcher is not None:
            return
        self.backend.start()
        self.sync()
        self._stop.clear()
        self._watcher = threading.Thread(target=self._watch, name="kolm-serve-watcher", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        if self.monitor is not None:
            self.monitor.wait()  # a rollback under way finishes: registry row, pointer and alert agree
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)
            self._watcher = None
        self.backend.close()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad sync
                log.exception("pointer sync failed")

    # --- requests ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, task: str) -> Iterator[Lease]:
        """The task's active adapter, held so it is not unloaded until the block ends."""
        held = self.acquire(task)
        try:
            yield held
        finally:
            held.release()

    def _active_for(self, task: str) -> LoadedAdapter:
        """The task's active adapter; called holding ``_state``."""
        adapter = self._active.get(task)
        if adapter is None:
            refusal = self._refused.get(task)
            if refusal is not None:
                raise UnknownTask(f"task {task!r} has no servable adapter: {refusal.reason}")
            raise UnknownTask(f"no adapter is deployed for task {task!r}")
        return adapter

    def peek(self, task: str) -> LoadedAdapter:
        """The task's active adapter right now, without holding it (to choose how to answer)."""
        with self._state:
            return self._active_for(task)

    def acquire(self, task: str) -> Lease:
        """A lease on the task's active adapter; release it when the request is done."""
        with self._state:
            adapter = self._active_for(task)
            adapter.in_flight += 1
            return Lease(adapter, self._state)

    def release(self, lease: Lease) -> None:
        lease.release()

    def observe(self, task: str, cid: str, response_id: str, messages: list[dict], text: str,
                owner: str = "", cut: Cut | None = None) -> None:
        """Show one answer served to ``owner`` (a digest of the caller's key) to the live monitor (``cut``: how it was
        cut short, see ``LiveMonitor.observe``); monitoring never fails a request."""
        if self.monitor is None:
            return
        try:
            self.monitor.observe(task, cid, response_id, messages, text, owner, cut)
        except Exception:  # noqa: BLE001 - the answer was already given; log and go on
            log.exception("live monitor could not observe response %s", response_id)

    def tenant_of(self, task: str) -> str | None:
        """The tenant whose artifact serves ``task`` now; None when no adapter serves it."""
        with self._state:
            adapter = self._active.get(task)
            return adapter.tenant if adapter is not None else None

    def status(self) -> dict:
        """Active adapters, adapters draining after a swap, and artifacts refused (with the reason)."""
        with self._state:
            return {
                "tasks": {task: {"cid": a.cid, "adapter": a.name, "labels": a.labels, "in_flight": a.in_flight,
                                 "tenant": a.tenant}
                          for task, a in sorted(self._active.items())},
                "draining": [{"task": a.task, "cid": a.cid, "in_flight": a.in_flight} for a in self._retired],
                "refused": {task: {"cid": r.cid, "reason": r.reason} for task, r in sorted(self._refused.items())},
            }

    # --- keeping up with the pointers --------------------------------------------------------------------

    def _pointers(self) -> dict[str, Path | None]:
        """Every task pointer and the artifact it names now (None: keep the task as it is)."""
        if self.registry is not None:
            return self._champions()
        found: dict[str, Path | None] = {}
        adapters_dir = self.settings.adapters_dir
        if not adapters_dir.is_dir():
            return found
        for entry in os.scandir(adapters_dir):
            if entry.name.startswith(".") or not entry.is_symlink():
                continue
            try:
                target = read_pointer(adapters_dir, validate_task(entry.name))
            except RegistryError as exc:
                log.warning("ignoring pointer %s: %s", entry.path, exc)
                continue
            if target is not None:
                found[entry.name] = target
        return found

    def _champions(self) -> dict[str, Path | None]:
        """Every task's champion in the registry, fetched into this host's artifact cache. A task whose artifact
        cannot be fetched is refused and kept as it is (None: its current adapter, if any, keeps serving); the
        fetch is tried again at the next poll."""
        found: dict[str, Path | None] = {}
        for task, cid in self.registry.champions().items():
            if cid is None:
                continue
            with self._state:
                refusal = self._refused.get(task)
            if refusal is not None and refusal.cid == cid and refusal.stamp == _UNFETCHED \
                    and time.monotonic() - refusal.since < FETCH_RETRY_S:
                found[task] = None  # not fetched a moment ago: keep the task as it is, try again later
                continue
            try:
                found[task] = local_artifact(self.settings, validate_task(task), cid)
            except (DeployRefused, RegistryError, OSError) as exc:
                if refusal is None or (refusal.cid, refusal.reason) != (cid, str(exc)):  # said once per reason
                    log.error("cannot fetch %s for task %s: %s", cid, task, exc)
                with self._state:
                    self._refused[task] = _Refusal(cid=cid, stamp=_UNFETCHED, reason=str(exc))
                found[task] = None
        return found

    def _public_keys(self) -> dict:
        """The keys artifacts are verified with: those in ``KOLM_HOME/keys``, and with ``registry`` those published
        in the store (a local key wins on a clash)."""
        keys = {}
        if self.registry is not None:
            for keyid, (tenant, text) in self.registry.public_keys().items():
                try:
                    derived, key = tenant_key_from_text(tenant, text)
                except RegistryError as exc:
                    log.warning("ignoring a published key: %s", exc)
                    continue
                if derived == keyid:
                    keys[keyid] = key
        return {**keys, **load_public_keys(self.settings.keys_dir)}

    def sync(self) -> None:
        """Bring every task in line with its pointer, then unload drained adapters. One sync at a time."""
        with self._sync_lock:
            pointers = self._pointers()
            for task, target in pointers.items():
                if target is None:
                    continue
                cid = target.name.removesuffix(".kolm")
                with self._state:
                    current = self._active.get(task)
                    if current is not None and current.cid == cid:
                        self._refused.pop(task, None)  # pointed back at what serves: nothing is refused now
                        continue
                self._switch(task, target, cid)
            for task in set(self._active) - set(pointers):
                self._retire(task, None)
                log.info("task %s has no pointer any more; its adapter drains", task)
            self._unload_drained()

    def _switch(self, task: str, target: Path, cid: str) -> None:
        try:
            stat = target.stat()
        except OSError:
            return  # swapped again while we looked; the next poll sees the new target
        stamp = (stat.st_mtime_ns, stat.st_size)
        refusal = self._refused.get(task)
        # A signature that did not verify is checked again after a while (its key may have been published since);
        # anything else refused stays refused until the artifact changes.
        if refusal is not None and refusal.cid == cid and refusal.stamp == stamp \
                and (not refusal.retry or time.monotonic() - refusal.since < REFUSAL_RETRY_S):
            return
        began = time.perf_counter()
        try:
            self._prepare(task, target, cid)
        except (ArtifactRefused, BackendError) as exc:
            reason = str(exc)
            with self._state:
                self._refused[task] = _Refusal(cid=cid, stamp=stamp, reason=reason,
                                               retry="does not verify" in reason)
            if refusal is None or (refusal.cid, refusal.reason) != (cid, reason):  # said once, not every retry
                log.error("refusing %s for task %s: %s", target, task, exc)
            return
        log.info("task %s now served by %s (loaded and warmed in %.2f s)", task, cid, time.perf_counter() - began)

    def _prepare(self, task: str, target: Path, cid: str) -> None:
        """Verify, extract, load and warm, then route the task to the new adapter; raises ArtifactRefused
        naming what failed (and then nothing was routed)."""
        began = time.perf_counter()
        report = verify_kolm(target, self._public_keys())
        if not report.ok:
            raise ArtifactRefused(f"{target.name} does not verify: {'; '.join(report.problems)}")
        if report.cid != cid:
            raise ArtifactRefused(f"{target.name} holds content with CID {report.cid}, not the CID its name claims")
        artifact = report.artifact
        manifest = artifact.manifest
        if manifest.get("task") != task:
            raise ArtifactRefused(f"{target.name} is an artifact of task {manifest.get('task')!r}, not {task!r}")
        base = manifest.get("base_model") if isinstance(manifest.get("base_model"), dict) else {}
        digest = base.get("digest")
        if self.backend.base_digest and digest and digest != self.backend.base_digest:
            raise ArtifactRefused(f"{target.name} was trained on base {base.get('id')} ({digest}), but this runtime "
                                  f"serves a base with digest {self.backend.base_digest}")
        vision = manifest.get("vision") if isinstance(manifest.get("vision"), dict) else {}
        served_processor = getattr(self.backend, "processor_digest", None)
        if vision.get("processor_digest") and served_processor and vision["processor_digest"] != served_processor:
            raise ArtifactRefused(f"{target.name} was trained with another processor (templates, image processing) "
                                  f"than this runtime's base has ({vision['processor_digest']} ≠ {served_processor})")
        labels = manifest.get("labels") if manifest.get("verifier") == "closed_vocab" else None
        json_schema = manifest.get("json_schema") if manifest.get("verifier") == "json_schema" else None
        if json_schema is not None:
            try:
                json_grammar(json_schema)
            except JsonSchemaProblem as exc:
                raise ArtifactRefused(f"{target.name} (recipe {manifest.get('recipe_cid')}): {exc}") from None
        name = adapter_name(cid)
        with self._state:
            draining = next((a for a in self._retired if a.name == name), None)
        if draining is not None:  # swapped back within its grace period: still loaded, keep its leases
            self._retire(task, draining)
            return
        verified = time.perf_counter()
        cache = self.cache_dir / cid
        if not (cache / "adapter_config.json").is_file():
            shutil.rmtree(cache, ignore_errors=True)
            try:
                extract_adapter(target, cache, verified=report)
            except RegistryError as exc:
                if not (cache / "adapter_config.json").is_file():  # not another runtime extracting it too
                    raise ArtifactRefused(str(exc)) from exc
        extracted = time.perf_counter()
        room = manifest.get("max_new_tokens")
        adapter = LoadedAdapter(task=task, cid=cid, name=name, labels=labels or None, json_schema=json_schema,
                                max_new_tokens=room if isinstance(room, int) and not isinstance(room, bool)
                                and room > 0 else None,
                                loaded_at=time.time(),
                                tenant=str(manifest.get("tenant") or ""),
                                profile=Profile.from_artifact(manifest, artifact.evals))
        # Routed while the warm-up still holds the model: no queued request can start on the old one between.
        self.backend.load(name, cache, labels, ready=lambda: self._retire(task, adapter), json_schema=json_schema)
        log.info("%s: verified in %.2f s, extracted in %.2f s, loaded, warmed and routed in %.2f s", cid,
                 verified - began, extracted - verified, time.perf_counter() - extracted)

    def _retire(self, task: str, replacement: LoadedAdapter | None) -> None:
        """Route new requests to ``replacement``; the old adapter drains and is unloaded later."""
        with self._state:
            old = self._active.pop(task, None)
            if replacement is not None:
                self._retired = [a for a in self._retired if a is not replacement]
                replacement.retired_at = None
                self._active[task] = replacement
                self._refused.pop(task, None)
            if old is not None and (replacement is None or old.name != replacement.name):
                old.retired_at = time.monotonic()
                self._retired.append(old)
            if self.monitor is not None:  # in the same step, so every answer of the new adapter is seen
                if replacement is not None:
                    self.monitor.activate(task, replacement.cid, replacement.profile)
                else:
                    self.monitor.deactivate(task)

    def _unload_drained(self) -> None:
        now = time.monotonic()
        with self._state:
            active_names = {a.name for a in self._active.values()}
            done = [a for a in self._retired
                    if a.in_flight == 0 and now - (a.retired_at or now) >= self.grace_seconds]
            self._retired = [a for a in self._retired if a not in done]
        for adapter in done:
            if adapter.name in active_names:
                continue
            try:
                self.backend.unload(adapter.name)
                log.info("unloaded %s (task %s)", adapter.name, adapter.task)
            except BackendError as exc:
                log.warning("could not unload %s: %s", adapter.name, exc)
