"""The work products every stage wrote, by task: what each is (CID, file or directory), its signed receipt, and
which captures' text it holds (for retention). The bytes are in the object store (provenance/products.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select, update

from kolm_pipeline.store.base import StoreBase
from kolm_pipeline.store.tables import work_products


@dataclass(frozen=True)
class WorkProduct:
    """One product row; `capture_ids` None: it holds no capture text."""

    id: int
    task: str
    stage: str
    cid: str
    directory: bool
    receipt_cid: str | None
    receipt: bytes | None
    capture_ids: list[int] | None
    unnamed_rows: int
    drawn_rows: int | None
    created_at: datetime
    removed_at: datetime | None

    @classmethod
    def of(cls, row) -> WorkProduct:
        return cls(id=row.id, task=row.task, stage=row.stage, cid=row.cid, directory=bool(row.directory),
                   receipt_cid=row.receipt_cid, receipt=row.receipt.encode("ascii") if row.receipt else None,
                   capture_ids=json.loads(row.capture_ids) if row.capture_ids is not None else None,
                   unnamed_rows=row.unnamed_rows or 0, drawn_rows=row.drawn_rows, created_at=row.created_at,
                   removed_at=row.removed_at)


class WorkProductQueries(StoreBase):
    """Record products, find a task's newest of a stage or the one a receipt names, and retire them."""

    def record_product(self, task: str, stage: str, cid: str, directory: bool, *, receipt: bytes | None = None,
                       receipt_cid: str | None = None, capture_ids: list[int] | None = None,
                       unnamed_rows: int = 0, drawn_rows: int | None = None,
                       created_at: datetime | None = None) -> WorkProduct:
        """Record a published product; `created_at` (default now) is when its text was written (a hold-out
        republished without its expired rows keeps its first one: its other rows are no younger)."""
        values = {"task": task, "stage": stage, "cid": cid, "directory": directory, "receipt_cid": receipt_cid,
                  "receipt": receipt.decode("ascii") if receipt is not None else None,
                  "capture_ids": json.dumps(sorted(set(capture_ids))) if capture_ids is not None else None,
                  "unnamed_rows": unnamed_rows, "drawn_rows": drawn_rows, "created_at": created_at or self._now()}
        with self.engine.begin() as conn:
            row_id = conn.execute(insert(work_products).values(**values)).inserted_primary_key[0]
            return WorkProduct.of(conn.execute(select(work_products).where(work_products.c.id == row_id)).one())

    def _newest(self, *where) -> WorkProduct | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(work_products).where(*where).order_by(work_products.c.id.desc()).limit(1)).first()
        return WorkProduct.of(row) if row is not None else None

    def latest_product(self, task: str, stage: str) -> WorkProduct | None:
        """The task's newest product of `stage` (removed by retention or not: the caller says what that means)."""
        return self._newest(work_products.c.task == task, work_products.c.stage == stage)

    def product_by_receipt(self, task: str, receipt_cid: str) -> WorkProduct | None:
        """The task's product that the receipt `receipt_cid` signed."""
        return self._newest(work_products.c.task == task, work_products.c.receipt_cid == receipt_cid)

    def products_holding_text(self, task: str | None = None) -> list[WorkProduct]:
        """Products still in the object store that hold capture text (all tasks, or `task`'s)."""
        t = work_products.c
        query = select(work_products).where(t.capture_ids.is_not(None), t.removed_at.is_(None))
        if task is not None:
            query = query.where(t.task == task)
        with self.engine.connect() as conn:
            return [WorkProduct.of(row) for row in conn.execute(query.order_by(t.id))]

    def product_cid_in_use(self, cid: str, other_than: int) -> bool:
        """Whether a product row other than `other_than`, not removed, names `cid` (the same bytes, published twice)."""
        t = work_products.c
        with self.engine.connect() as conn:
            return conn.execute(select(t.id).where(t.cid == cid, t.id != other_than, t.removed_at.is_(None))
                                .limit(1)).first() is not None

    def mark_product_removed(self, product_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(work_products).where(work_products.c.id == product_id)
                         .values(removed_at=self._now()))
