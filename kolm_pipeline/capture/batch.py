"""Turning finished calls into stored captures: the record the proxy puts in its journal (`Pending`'s fields
as a plain tuple), building a `NewCapture` from one (reply parsed, PII redacted) and the `BatchWriter` that
stores a batch, telling an unreachable store (wait and retry: the records stay in the journal) from a record
the store refuses (quarantined alone, with its reason).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from kolm_pipeline.capture.images import CapturedImage, ImageError, ImageStore, drop_reference, externalize
from kolm_pipeline.capture.providers import PROVIDERS
from kolm_pipeline.capture.redact import Redactor
from kolm_pipeline.provenance import jsontext
from kolm_pipeline.provenance.errors import RegistryError
from kolm_pipeline.store import CaptureStore, NewCapture

logger = logging.getLogger(__name__)

REDACTED = "[redacted]"
# The store cannot be reached (its connection, its lock): wait and retry. A data error (`DataError`,
# `IntegrityError`, ...) is not an outage: it is the record's, and the record is quarantined alone.
STORE_DOWN = (OperationalError, InterfaceError, PoolTimeout, ConnectionError)
STATS = ("written", "quarantined", "lost")
MODEL_COLUMN = 255  # the store's `model` column


class Pending(NamedTuple):
    """A finished call, as plain data, as the proxy journals it. `outcome` is `failure` (no reply: `reply`
    is empty), `reply` (a complete body) or `stream` (the raw event stream as far as it came). The provider
    key is already removed from every field (`forward.scrub_secret`)."""

    request_id: str
    tenant: str
    namespace: str
    provider: str
    model: str
    request: bytes
    tags: tuple[str, ...]
    streamed: bool
    outcome: str
    http_status: int
    reply: bytes
    latency_us: int
    created_at: float
    # The CID of the adapter that answered in the teacher's place (student routing); None: the teacher did.
    # Last and defaulted, so records journaled before it existed still read.
    served_by: str | None = None


def build(pending: Pending | tuple[Any, ...]) -> NewCapture:
    """The capture record of a finished call (not yet PII-redacted)."""
    (
        request_id, tenant, namespace, provider_name, model, request, tags, streamed, outcome,
        http_status, reply, latency_us, created_at, served_by,
    ) = pending if len(pending) == len(Pending._fields) else Pending(*pending)  # fmt: skip
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
    return NewCapture(
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
        served_by=served_by,
    )


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


def _encode(record: NewCapture) -> str:
    data = asdict(record)
    data["created_at"] = record.created_at.isoformat() if record.created_at else None
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def decode_record(line: str) -> NewCapture:
    """A record of a quarantine file (or of a spool file left by an older version)."""
    data: dict[str, Any] = json.loads(line)
    if data.get("created_at"):
        data["created_at"] = datetime.fromisoformat(data["created_at"])
    return NewCapture(**data)


class Quarantine:
    """Records the store refused, set aside with the reason (`<name>.jsonl` and `<name>.reason`); the
    reason names the error types, never the text. Records here are redacted already. Retention removes
    them with everything else past the window (see docs/security.md)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def put(self, data: bytes, suffix: str, exc: Exception | str) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex}"
        path = self.directory / f"{name}{suffix}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        if isinstance(exc, Exception):
            cause = getattr(exc, "orig", None) or exc
            exc = f"{type(exc).__name__}: {type(cause).__name__}"
        (self.directory / f"{name}.reason").write_text(f"{exc}\n", "utf-8")
        return path

    def files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(path for path in self.directory.iterdir() if path.suffix in (".jsonl", ".bin"))

    def expire(self, cutoff: datetime) -> int:
        """Delete what was quarantined before `cutoff` (its reasons too); returns how many records' files.
        Retention passes the cutoff of the shortest window in use: a quarantined file is kept for debugging
        at most as long as the strictest namespace keeps text."""
        removed = 0
        if not self.directory.is_dir():
            return 0
        for path in self.directory.iterdir():
            if path.is_file() and datetime.fromtimestamp(path.stat().st_mtime, UTC) < cutoff:
                path.unlink(missing_ok=True)
                removed += path.suffix != ".reason"
        return removed


class BatchWriter:
    """Builds, redacts and stores batches of finished calls. `write` answers whether the batch is done with
    (stored, or refused record by record and quarantined): False means the store cannot be reached and the
    batch must be written again later."""

    def __init__(
        self,
        store: CaptureStore | Callable[[], CaptureStore],
        quarantine: Quarantine | None,
        settings_ttl: float = 5.0,
        images: ImageStore | None = None,
    ) -> None:
        self._store = store if isinstance(store, CaptureStore) else None
        self._open_store = None if isinstance(store, CaptureStore) else store
        self.quarantine = quarantine
        self._settings_ttl = settings_ttl
        self._redactors: dict[tuple[str, str], tuple[Redactor, float]] = {}
        self._default_redactor = Redactor()
        self._lock = threading.Lock()
        self.stats = dict.fromkeys(STATS, 0)
        self.images = images

    def store(self) -> CaptureStore | None:
        """The store, opened on first use in the writer process (None while the database is down)."""
        if self._store is None and self._open_store is not None:
            try:
                self._store = self._open_store()
            except STORE_DOWN as exc:
                logger.warning("capture store unavailable (%s); captures wait in the journal", type(exc).__name__)
        return self._store

    def _redactor(self, store: CaptureStore, tenant: str, namespace: str) -> Redactor:
        """The namespace's redactor, re-read every few seconds."""
        now = time.monotonic()
        cached = self._redactors.get((tenant, namespace))
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            entities = store.namespace_settings(tenant, namespace).redact_entities
            redactor = self._default_redactor if entities is None else Redactor(entities)
        except ValueError:
            redactor = self._default_redactor
        self._redactors[(tenant, namespace)] = (redactor, now + self._settings_ttl)
        return redactor

    def _with_stored_images(self, store: CaptureStore, record: NewCapture,
                            taken: dict[tuple[str, str], tuple[int, set[str]]],
                            stored: dict[str, CapturedImage]) -> NewCapture:
        """The record with its inline images in the image store and references in their place (before redaction:
        it never scans image bytes). An image beyond the namespace's byte limit (`taken`: what this batch stored
        so far, by namespace), or with no image store, is not kept: its reference says so."""
        messages, images, _urls = externalize(record.messages)
        if not images:
            return record
        where = (record.tenant, record.namespace)
        kept: dict[str, tuple[str, str, int]] = {}
        limit = store.namespace_settings(*where).image_bytes_limit
        for image in images:
            if image.digest in kept:
                continue
            if self.images is None:
                messages = drop_reference(messages, image, "no-image-store")
                continue
            if where not in taken:
                taken[where] = (store.image_bytes(*where), store.live_image_digests(*where))
            used, held = taken[where]
            if image.digest not in held:  # an image the namespace holds already costs nothing more
                if used + image.size > limit:
                    messages = drop_reference(messages, image, "namespace-image-limit")
                    continue
                taken[where] = (used + image.size, held | {image.digest})
            self.images.put(image)
            stored[image.digest] = image
            kept[image.digest] = (image.digest, image.media_type, image.size)
        return replace(record, messages=messages, images=list(kept.values()))

    def write(self, batch: list[Pending] | list[tuple[Any, ...]]) -> bool:
        """Build, redact and store `batch` (`Pending`s, or their fields as plain tuples)."""
        store = self.store()
        if store is None:
            return False
        records = []
        taken: dict[tuple[str, str], tuple[int, set[str]]] = {}
        stored: dict[str, CapturedImage] = {}
        try:
            for pending in batch:
                try:
                    record = build(pending)
                except Exception as exc:  # a record that cannot be built must not take the batch with it
                    self._set_aside(lambda pending=pending: repr(tuple(pending)).encode(), ".bin", exc)
                    continue
                try:
                    record = self._with_stored_images(store, record, taken, stored)
                except (RegistryError, OSError) as exc:  # the image store is down: the batch waits in the journal
                    logger.warning("image store unavailable (%s); captures wait in the journal", type(exc).__name__)
                    return False
                except ImageError as exc:  # journaled before the door checked images: this record alone
                    self._set_aside(lambda pending=pending: repr(tuple(pending)).encode(), ".bin", str(exc))
                    continue
                record = self._redactor(store, record.tenant, record.namespace).capture(record)
                if len(record.model) > MODEL_COLUMN:  # placeholders can be longer than what they replace
                    record = replace(record, model=record.model[:MODEL_COLUMN])
                records.append(record)
        except STORE_DOWN:  # reading a namespace's redaction settings
            return False
        if not self.store_records(records):
            return False
        try:  # retention may have removed an image between its upload and the reference that keeps it now
            for image in stored.values():
                if not self.images.exists(image.digest):
                    self.images.put(image)
        except (RegistryError, OSError) as exc:
            logger.error("could not check the stored images again (%s)", type(exc).__name__)
        return True

    def store_records(self, records: list[NewCapture]) -> bool:
        """Store built records; a batch the store refuses for a data reason is written record by record and
        each record refused is quarantined alone."""
        store = self.store()
        if store is None:
            return False
        with self._lock:
            try:
                store.insert_captures_once(records)
                self.stats["written"] += len(records)
                return True
            except STORE_DOWN as exc:
                logger.warning("capture store unavailable (%s); %d capture(s) wait in the journal",
                               type(exc).__name__, len(records))
                return False
            except Exception as exc:  # a data error: find the records refused, write the rest
                logger.error("capture store refused a batch of %d (%s); writing it record by record",
                             len(records), type(exc).__name__)
            for record in records:
                try:
                    store.insert_captures_once([record])
                    self.stats["written"] += 1
                except STORE_DOWN:
                    return False  # the records stored so far are skipped when the batch comes again
                except Exception as exc:
                    self._set_aside(lambda record=record: _encode(record).encode("utf-8") + b"\n", ".jsonl", exc)
        return True

    def _set_aside(self, data: Callable[[], bytes], suffix: str, exc: Exception | str) -> None:
        """Quarantine one record (or a torn piece of journal) with the reason, and count it."""
        self.stats["quarantined"] += 1
        logger.error("capture quarantined: %s", exc if isinstance(exc, str) else type(exc).__name__)
        if self.quarantine is None:
            return
        try:
            self.quarantine.put(data(), suffix, exc)
        except OSError as error:
            logger.error("could not quarantine a capture: %s", type(error).__name__)

    def set_aside_bytes(self, data: bytes, reason: str) -> None:
        """Quarantine bytes of the journal that are not a whole record (a torn frame)."""
        self._set_aside(lambda: data, ".bin", reason)
