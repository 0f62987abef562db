"""Writing finished calls to the store in batches: the record format the proxy hands over (`Pending`'s fields as
a plain tuple), turning one into a `NewCapture` (key scrubbed, PII redacted), the `BatchWriter` that stores or
spools a batch, and the frames the proxy and its writer process exchange. Both `recorder.py` (the proxy's side)
and `writer.py` (the writer process) build on this module; neither imports the other's internals.
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from kolm_pipeline.capture.providers import PROVIDERS
from kolm_pipeline.capture.redact import Redactor
from kolm_pipeline.capture.spool import Spool
from kolm_pipeline.provenance import jsontext
from kolm_pipeline.store import CaptureStore, NewCapture

logger = logging.getLogger(__name__)

REDACTED = "[redacted]"
# The store cannot be reached (its connection, its lock): spool and retry. A data error (`DataError`,
# `IntegrityError`, ...) is not an outage: it is the record's, and the record is quarantined alone.
STORE_DOWN = (OperationalError, InterfaceError, PoolTimeout, ConnectionError)
FRAME_HEADER = struct.Struct("!I")
_STATS = ("written", "spooled", "replayed", "lost", "quarantined")


class Pending(NamedTuple):
    """A finished call, as plain data: no field is a container (tags are a tuple), so the plain tuple of its
    fields that the proxy holds until the writer acknowledges it leaves the garbage collector's care.
    `outcome` is `failure` (no reply: `reply` is empty), `reply` (a complete body) or `stream` (the raw
    event stream as far as it came). `secret` (the provider key) is scrubbed from every text of the record
    and then dropped: it never reaches the store, the spool or a log."""

    request_id: str
    tenant: str
    namespace: str
    provider: str
    model: str
    request: bytes
    tags: tuple[str, ...]
    streamed: bool
    secret: str
    outcome: str
    http_status: int
    reply: bytes
    latency_us: int
    created_at: float


def scrub(value: Any, secret: str) -> Any:
    """Replace every occurrence of `secret` in the strings of a JSON-like value."""
    if isinstance(value, str):
        return value.replace(secret, REDACTED)
    if isinstance(value, list):
        return [scrub(item, secret) for item in value]
    if isinstance(value, dict):
        return {scrub(k, secret): scrub(v, secret) for k, v in value.items()}
    return value


def build(pending: Pending | tuple[Any, ...]) -> NewCapture:
    """The capture record of a finished call, with the provider key scrubbed (not yet PII-redacted).
    `pending` may be the plain tuple of `Pending`'s fields, as the writer receives it."""
    (
        request_id, tenant, namespace, provider_name, model, request, tags, streamed, secret, outcome,
        http_status, reply, latency_us, created_at,
    ) = pending  # fmt: skip
    provider = PROVIDERS[provider_name]
    messages = provider.messages(jsontext.loads(request))
    status, output, prompt_tokens, completion_tokens = "error", "", None, None
    if outcome == "reply" and 200 <= http_status < 300:
        try:
            completion = provider.completion(jsontext.loads_replies(reply))
        except (ValueError, RecursionError):
            pass
        else:
            status, output = "ok", jsontext.storable(completion.output_text)
            prompt_tokens, completion_tokens = completion.prompt_tokens, completion.completion_tokens
    elif outcome == "stream":
        state = provider.new_stream()
        state.feed(reply)
        if not state.failed:
            status = "ok" if state.complete else "incomplete"
            output = jsontext.storable(state.text)
        prompt_tokens, completion_tokens = state.prompt_tokens, state.completion_tokens
    record = NewCapture(
        request_id=request_id,
        tenant=tenant,
        namespace=namespace,
        provider=provider_name,
        model=model,
        messages=messages,
        output_text=output,
        latency_us=latency_us,
        status=status,
        http_status=http_status,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        tags=list(tags),
        streamed=streamed,
        created_at=datetime.fromtimestamp(created_at, UTC),
    )
    # Model and messages come from the request body. Without escapes every string parsed from it is a
    # piece of its bytes, so a key not in the bytes is in none of them; with escapes, scrub to be sure.
    in_request = bool(secret) and (b"\\" in request or secret.encode("utf-8") in request)
    if secret and (in_request or secret in output or any(secret in tag for tag in record.tags)):
        record = replace(
            record,
            model=record.model.replace(secret, REDACTED),
            messages=scrub(record.messages, secret),
            output_text=output.replace(secret, REDACTED),
            tags=[tag.replace(secret, REDACTED) for tag in record.tags],
        )
    return record


@dataclass(frozen=True)
class StoreSpec:
    """How to open the proxy's store again in another process (the same database, the same defaults)."""

    url: str
    default_retention_days: int
    source_weights: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, store: CaptureStore) -> StoreSpec | None:
        """None for a store another process cannot open (in-memory SQLite)."""
        url = make_url(store.engine.url)
        if url.get_backend_name() == "sqlite":
            if url.database in (None, "", ":memory:") or url.database.startswith("file:"):
                return None
            url = url.set(database=os.path.abspath(url.database))
        return cls(
            url.render_as_string(hide_password=False),
            store.default_retention_days,
            dict(store.source_weights),
        )

    def open(self) -> CaptureStore:
        return CaptureStore(
            self.url, default_retention_days=self.default_retention_days, source_weights=self.source_weights
        )


class BatchWriter:
    """Builds, redacts and writes batches of finished calls; spools a batch when the store is down and
    replays the spool once it answers. Runs in the writer process, and in the proxy as its fallback."""

    def __init__(
        self,
        store: CaptureStore | Callable[[], CaptureStore],
        spool: Spool | None,
        retry_interval: float = 1.0,
        settings_ttl: float = 5.0,
    ) -> None:
        self._store = store if isinstance(store, CaptureStore) else None
        self._open_store = None if isinstance(store, CaptureStore) else store
        self.spool = spool
        self._retry_interval = retry_interval
        self._settings_ttl = settings_ttl
        self._down_until = 0.0
        self._replay_lock = threading.Lock()
        self._redactors: dict[tuple[str, str], tuple[Redactor, float]] = {}
        self._default_redactor = Redactor()
        self.stats = dict.fromkeys(_STATS, 0)

    def _store_now(self) -> CaptureStore | None:
        """The store, opened on first use in the writer process (and retried while the database is down)."""
        if self._store is None and self._open_store is not None and self._store_up():
            try:
                self._store = self._open_store()
            except STORE_DOWN as exc:
                self._mark_down()
                logger.warning("capture store unavailable (%s); spooling meanwhile", type(exc).__name__)
        return self._store

    def _store_up(self) -> bool:
        return time.monotonic() >= self._down_until

    def _mark_down(self) -> None:
        self._down_until = time.monotonic() + self._retry_interval

    def _redactor(self, tenant: str, namespace: str) -> Redactor:
        """The namespace's redactor, re-read every few seconds; every entity while the store is down."""
        now = time.monotonic()
        cached = self._redactors.get((tenant, namespace))
        if cached is not None and cached[1] > now:
            return cached[0]
        store = self._store_now()
        if store is None or not self._store_up():
            return cached[0] if cached is not None else self._default_redactor
        try:
            entities = store.namespace_settings(tenant, namespace).redact_entities
            redactor = self._default_redactor if entities is None else Redactor(entities)
        except ValueError:
            redactor = self._default_redactor
        except STORE_DOWN:
            self._mark_down()
            return cached[0] if cached is not None else self._default_redactor
        self._redactors[(tenant, namespace)] = (redactor, now + self._settings_ttl)
        return redactor

    def _build(self, batch: list[Pending] | list[tuple[Any, ...]]) -> list[NewCapture]:
        records = []
        for pending in batch:
            try:
                record = build(pending)
                records.append(self._redactor(record.tenant, record.namespace).capture(record))
            except Exception as exc:  # a record that cannot be built must not take the batch with it
                self.stats["lost"] += 1
                logger.error("could not build a capture record: %s", type(exc).__name__)
        return records

    def write(self, batch: list[Pending] | list[tuple[Any, ...]]) -> None:
        """Build, redact and write `batch` (`Pending`s, or their fields as plain tuples), or spool it."""
        records = self._build(batch)
        if not records:
            return
        store = self._store_now()
        if store is not None and self._store_up():
            try:
                store.insert_captures_once(records)
                self.stats["written"] += len(records)
                return
            except STORE_DOWN as exc:
                self._mark_down()
                logger.warning(
                    "capture store unavailable (%s); spooling %d capture(s)", type(exc).__name__, len(records)
                )
            except Exception as exc:  # a data error: find the records refused, write the rest
                logger.error("capture store refused a batch of %d (%s); writing it record by record",
                             len(records), type(exc).__name__)
                records = self._write_one_by_one(store, records)
                if not records:
                    return
        self._spool(records)

    def _write_one_by_one(self, store: CaptureStore, records: list[NewCapture]) -> list[NewCapture]:
        """Write each record in a transaction of its own; quarantine each one the store refuses, with the
        reason. Returns the records left to spool when the store goes down meanwhile."""
        for index, record in enumerate(records):
            try:
                store.insert_captures_once([record])
                self.stats["written"] += 1
            except STORE_DOWN:
                self._mark_down()
                return records[index:]
            except Exception as exc:
                self._quarantine_records([record], exc)
        return []

    def _quarantine_records(self, records: list[NewCapture], exc: Exception) -> None:
        self.stats["quarantined"] += len(records)
        if self.spool is None:
            logger.error("capture refused by the store (%s) and no spool to quarantine it in", type(exc).__name__)
            return
        try:
            self._quarantine(self.spool.write(records), exc)
        except (OSError, ValueError) as error:
            logger.error("could not quarantine a refused capture: %s", type(error).__name__)

    def _spool(self, records: list[NewCapture]) -> None:
        if self.spool is None:
            self.stats["lost"] += len(records)
            logger.error("no spool configured; %d capture(s) lost", len(records))
            return
        try:
            self.spool.write(records)
            self.stats["spooled"] += len(records)
        except OSError as exc:
            self.stats["lost"] += len(records)
            logger.error("could not spool %d capture(s): %s", len(records), type(exc).__name__)

    def replay(self) -> int:
        """Write spooled batches back, oldest first; returns how many captures were replayed."""
        if self.spool is None:
            return 0
        store = self._store_now()
        if store is None:
            return 0
        replayed = 0
        with self._replay_lock:
            for path in self.spool.files():
                try:
                    records = self.spool.read(path)
                except (OSError, ValueError, TypeError) as exc:
                    self._quarantine(path, exc)
                    continue
                try:
                    store.insert_captures_once(records)
                except STORE_DOWN:
                    self._mark_down()
                    break
                except Exception:  # a data error: the records the store refuses are quarantined, one by one
                    before = self.stats["written"]
                    if self._write_one_by_one(store, records):
                        break  # down meanwhile: the file stays; stored ids are skipped when it is replayed
                    self.stats["written"] = before  # counted as replayed below, not as written
                self.spool.remove(path)
                self._down_until = 0.0
                replayed += len(records)
        self.stats["replayed"] += replayed
        if replayed:
            logger.info("replayed %d spooled capture(s)", replayed)
        return replayed

    def _quarantine(self, path: Path, exc: Exception) -> None:
        """A file the store refuses for a reason other than being down is set aside with the reason, not
        retried (`failed/NAME` and `failed/NAME.reason`); the reason names the error, never the record."""
        target = path.parent / "failed" / path.name
        target.parent.mkdir(exist_ok=True, mode=0o700)
        path.replace(target)
        reason = getattr(exc, "orig", None) or exc
        target.with_name(target.name + ".reason").write_text(f"{type(exc).__name__}: {type(reason).__name__}\n")
        logger.error("spooled batch %s refused (%s); moved to %s", path.name, type(exc).__name__, target.parent)


@dataclass(frozen=True)
class WriterOptions:
    """What the writer process needs: where to write, where to spool, how many records per transaction."""

    store: StoreSpec
    spool_dir: Path | None
    batch_size: int
    retry_interval: float
    settings_ttl: float


def frame(message: Any) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME_HEADER.pack(len(payload)) + payload
