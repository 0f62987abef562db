"""The retention sweep: past its namespace's window, a capture's text goes from every place kolm wrote it.

One function, `sweep_retention`, run by the `triaged_captures` asset at the start of every distill and by
`kolm retention sweep` (cron it where no distill runs daily):

1. the store (store/retention.py): bodies, correction and model name become HMAC digests, tags go, and
   a SQLite file is rewritten (VACUUM) and its write-ahead file emptied;
2. each namespace's work directory: a text file of a cycle (`corpus.jsonl`, `recipe/` with its splits and
   diagnostics, `case_previews.json`, `base_answers.json` (the bare base's answers may quote their input), a
   `recipe.partial`/`recipe.old` left by an interrupted write) is removed
   as soon as one capture it holds has expired or is gone; the next distill writes it again from the captures
   still inside the window. The frozen hold-out lives across cycles, so it loses only its expired rows; once
   fewer than half of the rows it was drawn with are left it is removed and the next recipe draws a new one
   (the tripwire then stops comparing with a hold-out score measured on other rows);
3. the capture path's quarantine (records the store refused): its own `Quarantine.expire`, at the cutoff of
   the shortest window in use;
4. published work products holding expired text, in the object store (`sweep_products`), and captured images no
   capture inside its window refers to any more (`sweep_images`).
The capture journal holds only captures not stored yet; it and its retention are the capture path's
(capture/journal.py).

Which capture a text came from is read from the rows themselves (`meta.capture_id`); a row that names none (a
hold-out written by hand, say) is judged by its file's age, and goes once the file is older than the window.
A recipe's diagnostics quote corpus rows outside its splits, so a recipe is judged with the corpus it was made
from, and removed when that corpus is not the one beside it any more.

What holds no capture text, so nothing here touches it: `evaluation.json` and the `evals.json` of every `.kolm`
(and its MLflow copy) keep scores and case digests only, `judge_verdicts.json` (the free-text judge's verdicts by
digest), receipts, adapters, the tripwire state, Dagster metadata and MLflow parameters.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from kolm_pipeline.capture.batch import Quarantine
from kolm_pipeline.capture.images import image_store
from kolm_pipeline.corpus.build import corpus_cid
from kolm_pipeline.evaluate.tripwire import forget_holdout_baseline
from kolm_pipeline.provenance.atomic import write_atomic, write_json_atomic
from kolm_pipeline.provenance.cid import cid_for_bytes
from kolm_pipeline.provenance.errors import RegistryError
from kolm_pipeline.provenance.objectstore import open_store
from kolm_pipeline.provenance.products import Products
from kolm_pipeline.settings import Settings
from kolm_pipeline.stages.workdir import NamespaceWorkdir
from kolm_pipeline.store.namespaces import split_partition_key

logger = logging.getLogger(__name__)
SPLIT_FILES = ("train.jsonl", "eval.jsonl", "holdout.jsonl")
# A frozen hold-out shrunk by retention below this share of the rows it was drawn with is drawn anew: fewer
# rows make the tripwire's comparison with the last good cycle noise.
MIN_HOLDOUT_SHARE = 0.5


@dataclass(frozen=True)
class RetentionSweep:
    """What one sweep did: captures expired per partition, work files removed or rewritten per partition (paths
    relative to the namespace's work directory), quarantined records removed, and whether the store's file was
    rewritten afterwards (SQLite: False while another connection kept it busy; the next sweep retries)."""

    expired: dict[str, int]
    work_files: dict[str, list[str]] = field(default_factory=dict)
    quarantined: int = 0
    scrubbed: bool = True
    images: int = 0


@dataclass(frozen=True)
class _Rows:
    """The capture ids of a text file's rows; `unknown` counts rows that name none."""

    ids: frozenset[int]
    unknown: int = 0

    def held_by(self, live: set[int], fresh: bool) -> bool:
        """Whether every row's capture still holds its text; rows naming no capture only while the file is
        `fresh` (written inside the namespace's window)."""
        return (fresh or not self.unknown) and self.ids <= live


def _capture_id(row: object) -> int | None:
    meta = row.get("meta") if isinstance(row, dict) else None
    value = meta.get("capture_id") if isinstance(meta, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _jsonl_ids(lines: Iterable[bytes]) -> list[int | None]:
    ids: list[int | None] = []
    for line in lines:
        try:
            ids.append(_capture_id(json.loads(line)))
        except ValueError:
            ids.append(None)
    return ids


def _rows(ids: Iterable[int | None]) -> _Rows:
    ids = list(ids)
    return _Rows(frozenset(i for i in ids if i is not None), sum(1 for i in ids if i is None))


def text_rows(*documents: bytes | None) -> tuple[list[int], int]:
    """The captures whose text JSONL `documents` hold, and how many of their rows name none: what a published
    product records for retention (`work_products.capture_ids`, `unnamed_rows`)."""
    rows = _rows(i for data in documents for i in _jsonl_ids(_lines(data)))
    return sorted(rows.ids), rows.unknown


def case_text_rows(data: bytes) -> tuple[list[int], int]:
    """`text_rows` of a file of cases (`case_previews.json`)."""
    rows = _case_rows(data)
    return sorted(rows.ids), rows.unknown


def _fresh(path: Path, cutoff: datetime) -> bool:
    """Whether `path` was written after `cutoff`: what rows naming no capture are judged by."""
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, UTC) >= cutoff
    except FileNotFoundError:
        return True


def _read(path: Path) -> bytes | None:
    """The file's bytes, or None when there is none (a stage may replace or remove it while the sweep runs)."""
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _lines(data: bytes | None) -> list[bytes]:
    return [line for line in (data or b"").splitlines() if line.strip()]


def _recipe_rows(recipe: Path, in_progress: bool) -> _Rows:
    """The capture ids of a recipe's splits. `in_progress`: a directory the recipe stage may be writing right now
    (`recipe.partial`, or `recipe.old` for the instant of the swap), whose last line may be half written: a line
    that does not parse is skipped there, not counted as naming no capture."""
    ids: list[int | None] = []
    for name in SPLIT_FILES:
        ids += _jsonl_ids(_lines(_read(recipe / name)))
    return _rows(i for i in ids if i is not None or not in_progress)


def _recipe_corpus(recipe: Path) -> str | None:
    try:
        value = json.loads((recipe / "spec.json").read_text()).get("corpus_cid")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _case_rows(data: bytes) -> _Rows:
    try:
        cases = json.loads(data).get("cases")
    except (ValueError, AttributeError):
        return _Rows(frozenset(), unknown=1)
    if not isinstance(cases, list):
        return _Rows(frozenset(), unknown=1)
    return _rows(case.get("capture_id") if isinstance(case, dict) else None for case in cases)


@dataclass(frozen=True)
class _HoldoutNote:
    """How many rows the frozen hold-out was drawn with; `cid` is the file it describes, so a note left by a
    hold-out someone deleted by hand is not applied to the next one."""

    drawn: int
    cid: str

    @classmethod
    def read(cls, path: Path) -> _HoldoutNote | None:
        try:
            value = json.loads(path.read_bytes())
            return cls(drawn=int(value["drawn"]), cid=str(value["cid"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def _drawn_note(workdir: NamespaceWorkdir) -> Path:
    return workdir.root / "holdout.frozen.drawn.json"


def _sweep_frozen_holdout(workdir: NamespaceWorkdir, store, cutoff: datetime) -> list[str]:
    """Drop the frozen hold-out's rows whose capture expired; remove it when too few are left to compare."""
    path, note_path = workdir.frozen_holdout, _drawn_note(workdir)
    data = _read(path)
    if data is None:
        note_path.unlink(missing_ok=True)
        return []
    lines = _lines(data)
    ids = _jsonl_ids(lines)
    live = store.captures_with_text(workdir.tenant, workdir.namespace, [i for i in ids if i is not None])
    fresh = _fresh(path, cutoff)
    kept = [line for line, capture in zip(lines, ids, strict=True) if capture in live or (capture is None and fresh)]
    if len(kept) == len(lines):
        return []
    note = _HoldoutNote.read(note_path)
    drawn = note.drawn if note is not None and note.cid == cid_for_bytes(data) else len(lines)
    if len(kept) < MIN_HOLDOUT_SHARE * drawn:
        path.unlink()
        note_path.unlink(missing_ok=True)
        forget_holdout_baseline(workdir.tripwire_ledger(store), workdir.task)
        return [path.name]
    remaining = b"\n".join(kept) + b"\n"
    written = path.stat()
    write_atomic(path, remaining)
    os.utime(path, (written.st_atime, written.st_mtime))  # its rows are no younger for having lost some
    write_json_atomic(note_path, {"drawn": drawn, "cid": cid_for_bytes(remaining)})
    return [path.name]


def sweep_workdir(workdir: NamespaceWorkdir, store, cutoff: datetime) -> list[str]:
    """Remove or rewrite the namespace's work files that hold text of a capture past its window (module
    docstring), `cutoff` being the start of that window; returns what changed, relative to the work directory."""
    root = workdir.root
    corpus_data = _read(workdir.corpus)
    # Files of cases, each naming the capture a case came from: gone as soon as one of those has expired.
    case_files = {path: data for path in (workdir.case_previews, workdir.base_answers)
                  if (data := _read(path)) is not None}
    corpus = _rows(_jsonl_ids(_lines(corpus_data)))
    recipes = [path for path in (workdir.recipe, root / "recipe.partial", root / "recipe.old") if path.is_dir()]
    recipe_rows = {path: _recipe_rows(path, in_progress=path != workdir.recipe) for path in recipes}
    case_rows = {path: _case_rows(data) for path, data in case_files.items()}
    wanted = corpus.ids | frozenset().union(*(rows.ids for rows in [*case_rows.values(), *recipe_rows.values()]))
    live = store.captures_with_text(workdir.tenant, workdir.namespace, wanted)

    changed: list[str] = []
    corpus_ok = corpus_data is not None and corpus.held_by(live, _fresh(workdir.corpus, cutoff))
    if corpus_data is not None and not corpus_ok:
        workdir.corpus.unlink(missing_ok=True)
        changed.append(workdir.corpus.name)
    current_corpus = corpus_cid(corpus_data) if corpus_ok else None
    for path, rows in recipe_rows.items():
        # Diagnostics quote corpus rows beyond the splits, so a recipe stands only with its corpus beside it: the
        # one it was made from, or, for a recipe being written, the corpus it is being made from.
        orphan = current_corpus is None or (path == workdir.recipe and _recipe_corpus(path) != current_corpus)
        if orphan or not rows.held_by(live, _fresh(path, cutoff)):
            shutil.rmtree(path, ignore_errors=True)  # the recipe stage may be swapping it in at this instant
            changed.append(f"{path.name}/")
    for path, rows in case_rows.items():
        if not rows.held_by(live, _fresh(path, cutoff)):
            path.unlink(missing_ok=True)
            changed.append(path.name)
    return changed + _sweep_frozen_holdout(workdir, store, cutoff)


def _kept_holdout(product, products: Products, scratch: Path, live: set[int], fresh: bool) -> bytes | None:
    """The rows of a published frozen hold-out still inside the window; None when too few are left to compare, or
    when its object is gone already."""
    path = scratch / f"{product.cid}.jsonl"
    try:
        lines = _lines(products.fetch_file(product.cid, path).read_bytes())
    except RegistryError:
        return None
    finally:
        path.unlink(missing_ok=True)
    ids = _jsonl_ids(lines)
    kept = [line for line, capture in zip(lines, ids, strict=True) if capture in live or (capture is None and fresh)]
    if not kept or len(kept) < MIN_HOLDOUT_SHARE * (product.drawn_rows or len(lines)):
        return None
    return b"\n".join(kept) + b"\n"


def _republish_holdout(settings: Settings, store, products: Products, scratch: Path, product, live: set[int],
                       fresh: bool) -> None:
    """The task's newest frozen hold-out without its expired rows, as a new product (its text no younger than
    the rows it keeps); none when too few rows are left: the next recipe draws a new one."""
    kept = _kept_holdout(product, products, scratch, live, fresh)
    if kept is None:
        forget_holdout_baseline(NamespaceWorkdir(settings, product.task).tripwire_ledger(store), product.task)
        return
    staging = scratch / f"holdout-{product.id}.jsonl"
    write_atomic(staging, kept)
    try:
        ids, unnamed = text_rows(kept)
        store.record_product(product.task, "holdout", products.put_file(staging), False, capture_ids=ids,
                             unnamed_rows=unnamed, drawn_rows=product.drawn_rows, created_at=product.created_at)
    finally:
        staging.unlink(missing_ok=True)


def sweep_products(settings: Settings, store, now: datetime) -> dict[str, list[str]]:
    """Remove from the object store every published product holding text of a capture past its window (the same
    rule as the work files: one capture expired or gone, or rows naming none once the product is older than the
    window). The task's newest frozen hold-out loses only its expired rows: published again without them, as a new
    product, unless fewer than half the rows it was drawn with are left. An object that is gone already counts as
    removed; one another live row names (the same bytes published twice) stays for it. Returns what went, by task."""
    now = now if now.tzinfo is not None else now.replace(tzinfo=UTC)
    products = Products(open_store(settings.artifacts_url, settings.artifacts_dir))
    scratch = settings.home / "retention"
    scratch.mkdir(parents=True, exist_ok=True)
    removed: dict[str, list[str]] = {}
    cutoffs: dict[str, datetime] = {}
    for product in store.products_holding_text():
        tenant, namespace = split_partition_key(product.task)
        if product.task not in cutoffs:
            cutoffs[product.task] = now - timedelta(days=store.namespace_settings(tenant, namespace).retention_days)
        created = product.created_at if product.created_at.tzinfo else product.created_at.replace(tzinfo=UTC)
        fresh = created >= cutoffs[product.task]
        live = store.captures_with_text(tenant, namespace, product.capture_ids)
        if set(product.capture_ids) <= live and (fresh or not product.unnamed_rows):
            continue
        newest = store.latest_product(product.task, product.stage)
        if product.stage == "holdout" and newest is not None and newest.id == product.id:
            _republish_holdout(settings, store, products, scratch, product, live, fresh)
        if not store.product_cid_in_use(product.cid, other_than=product.id):
            try:
                products.delete(product.cid, product.directory, scratch)
            except RegistryError as exc:  # the object store failed: the row stays for the next sweep
                logger.error("retention could not remove %s %s: %s", product.stage, product.cid, exc)
                continue
        store.mark_product_removed(product.id)
        removed.setdefault(product.task, []).append(f"{product.stage} {product.cid}")
    return removed


def namespace_workdirs(settings: Settings) -> list[NamespaceWorkdir]:
    """The work directory of every namespace that has one."""
    if not settings.work_dir.is_dir():
        return []
    found = []
    for path in sorted(settings.work_dir.iterdir()):
        try:
            split_partition_key(path.name)
        except ValueError:
            continue
        if path.is_dir():
            found.append(NamespaceWorkdir(settings, path.name))
    return found


def sweep_retention(settings: Settings, store, now: datetime | None = None) -> RetentionSweep:
    """Apply every namespace's retention window at `now` (default: the store's clock) to the store and to the
    work directories under `settings`; see the module docstring for what goes where."""
    now = now if now is not None else store.clock()
    now = now if now.tzinfo is not None else now.replace(tzinfo=UTC)  # naive times are UTC, as in the store
    expired = store.apply_retention(now=now, scrub=False)
    work_files: dict[str, list[str]] = {}
    for workdir in namespace_workdirs(settings):
        window = store.namespace_settings(workdir.tenant, workdir.namespace).retention_days
        changed = sweep_workdir(workdir, store, now - timedelta(days=window))
        if changed:
            work_files[workdir.partition] = changed
    for task, gone in sweep_products(settings, store, now).items():
        work_files.setdefault(task, []).extend(gone)
    shortest = min([store.default_retention_days,
                    *(switches.retention_days for switches in store.all_namespace_settings().values())])
    images = sweep_images(settings, store, now - timedelta(days=shortest))
    # Hook of the capture path's own retention: a quarantined record is kept as long as the strictest window.
    quarantined = Quarantine(settings.quarantine_dir).expire(now - timedelta(days=shortest))
    return RetentionSweep(expired=expired, work_files=work_files, quarantined=quarantined,
                          scrubbed=store.scrub() if expired else True, images=images)


def sweep_images(settings: Settings, store, unreferenced_before: datetime) -> int:
    """Remove the captured images no capture inside its window refers to any more (capture/images.py), and those
    no capture ever came to refer to (the store refused the record, which went to the quarantine) once they are
    older than `unreferenced_before` (the strictest window, as the quarantine); returns how many."""
    images = image_store(settings)
    dead = store.dead_image_digests()
    gone = store.forget_dead_images(dead) if dead else []  # references first: a new capture keeps its image
    for digest in gone:
        images.delete(digest)
    referenced = store.referenced_images()
    orphans = [digest for digest, written in images.stored().items()
               if digest not in referenced and written < unreferenced_before]
    for digest in orphans:
        images.delete(digest)
    return len(gone) + len(orphans)
