"""Where one namespace's stage outputs live, and the receipt chain that ties them together.

Every stage writes its output under `KOLM_HOME/work/<tenant.namespace>/` and appends a signed receipt
naming the previous one, so the deployment can ship the whole chain inside the `.kolm` artifact.

With a store, that directory is only this host's working copy: each stage also publishes its product to the
object store under its CID (`provenance/products.py`, written once, never overwritten) and records it with its
receipt in the store (`work_products`), and each stage starts by pulling the chain it reads (`pull`): the
products its upstream receipts name, fetched by CID and checked, wherever they were made. So a run pod, a
training pod or an operator's laptop needs no shared filesystem, and two runs never overwrite each other's
products. Without a store (`kolm compile`'s scratch directory) nothing is published.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from kolm_pipeline.provenance.atomic import write_atomic
from kolm_pipeline.provenance.cid import cid_for_file
from kolm_pipeline.provenance.errors import RegistryError, UserError
from kolm_pipeline.provenance.keys import ensure_tenant_keys, keyid_for, load_private_key
from kolm_pipeline.provenance.objectstore import open_store
from kolm_pipeline.provenance.products import Products, directory_cid
from kolm_pipeline.provenance.receipts import make_receipt, read_statement, receipt_cid
from kolm_pipeline.settings import Settings
from kolm_pipeline.store.namespaces import split_partition_key

STAGE_ORDER = ("corpus", "recipe", "adapter", "evaluation")
# Products published beside the stages' (no receipt of their own): the evaluation's case texts, which `kolm diff`
# shows, and the frozen hold-out, which lives across cycles.
SIDE_PRODUCTS = ("previews", "holdout")

__all__ = ["SIDE_PRODUCTS", "STAGE_ORDER", "NamespaceWorkdir", "ProductMissing"]


class ProductMissing(UserError):
    """A product the chain names is gone: removed by retention, or never reached the object store."""


@dataclass(frozen=True)
class NamespaceWorkdir:
    """Paths of one namespace's pipeline outputs; with `store`, published and pulled by CID (module docstring)."""

    settings: Settings
    partition: str
    base_dir: Path | None = None
    store: Any = None

    @property
    def tenant(self) -> str:
        return split_partition_key(self.partition)[0]

    @property
    def namespace(self) -> str:
        return split_partition_key(self.partition)[1]

    @property
    def task(self) -> str:
        """Adapters are served per task; a namespace's task is named after its partition key."""
        return self.partition

    @property
    def root(self) -> Path:
        return (self.base_dir or self.settings.work_dir) / self.partition

    @property
    def corpus(self) -> Path:
        return self.root / "corpus.jsonl"

    @property
    def recipe(self) -> Path:
        return self.root / "recipe"

    @property
    def frozen_holdout(self) -> Path:
        return self.root / "holdout.frozen.jsonl"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation.json"

    @property
    def case_previews(self) -> Path:
        """The texts of the last evaluation's cases; evaluation.json itself holds none (it ships in the `.kolm`)."""
        return self.root / "case_previews.json"

    @property
    def base_answers(self) -> Path:
        """The bare base's answers by case, reused by the next evaluation (evaluate/evaluation.py: BaseAnswers)."""
        return self.root / "base_answers.json"

    @property
    def judge_verdicts(self) -> Path:
        """The free-text judge's verdicts by digest of the case and answer (evaluate/judge.py); no text."""
        return self.root / "judge_verdicts.json"

    @property
    def legacy_tripwire_state(self) -> Path:
        """Where the tripwire state was kept before it moved into the store (migration 11)."""
        return self.root / "tripwire.json"

    def tripwire_ledger(self, store):
        """The store, as the task's tripwire ledger, after importing a state file an older release left in the
        work directory (once: the file is removed when the store holds it, so a halt is never lost)."""
        legacy = self.legacy_tripwire_state
        if legacy.is_file():
            old = json.loads(legacy.read_text())

            def merged(state: dict | None) -> dict | None:
                if state is None:
                    return old
                cleared_later = (state.get("cleared_at") or 0) > (old.get("halted_at") or 0)
                if old.get("halted") and not state.get("halted") and not cleared_later:  # the halt is kept
                    return {**state, **{k: old[k] for k in ("halted", "halt_reasons", "halted_at") if k in old}}
                return None

            store.update_tripwire_state(self.task, merged)
            legacy.unlink(missing_ok=True)  # another process may have imported it at the same time
        return store

    @property
    def receipts(self) -> Path:
        return self.root / "receipts"

    @cached_property
    def products(self) -> Products:
        """The object store products go to: the artifacts' (KOLM_ARTIFACTS_URL, default KOLM_HOME/artifacts)."""
        return Products(open_store(self.settings.artifacts_url, self.settings.artifacts_dir))

    def product_path(self, stage: str) -> tuple[Path, bool]:
        """Where this host keeps `stage`'s product, and whether it is a directory."""
        return {"corpus": (self.corpus, False), "recipe": (self.recipe, True), "adapter": (self.adapter, True),
                "evaluation": (self.evaluation, False), "previews": (self.case_previews, False),
                "holdout": (self.frozen_holdout, False)}[stage]

    def publish(self, stage: str, *, receipt: bytes | None = None, capture_ids: list[int] | None = None,
                unnamed_rows: int = 0, drawn_rows: int | None = None):
        """Put `stage`'s local product in the object store and record it (with its receipt) in the store; None
        without a store."""
        if self.store is None:
            return None
        path, directory = self.product_path(stage)
        cid = self.products.put_dir(path) if directory else self.products.put_file(path)
        return self.store.record_product(self.task, stage, cid, directory, receipt=receipt,
                                         receipt_cid=receipt_cid(receipt) if receipt is not None else None,
                                         capture_ids=capture_ids, unnamed_rows=unnamed_rows,
                                         drawn_rows=drawn_rows)

    def _materialize(self, product) -> None:
        """This host's copy of `product`, fetched by CID unless the local one already has that CID."""
        if product.removed_at is not None:
            raise ProductMissing(
                f"{self.task}: the {product.stage} {product.cid} was removed by retention (a capture it holds "
                f"expired); run the distill again to rebuild it from the captures still inside the window")
        path, directory = self.product_path(product.stage)
        if path.exists() and (directory_cid(path) if directory else cid_for_file(path)) == product.cid:
            return
        try:
            self.products.fetch(product.cid, path, directory)
        except RegistryError as exc:
            raise ProductMissing(f"{self.task}: cannot fetch the {product.stage} {product.cid}: {exc}") from None

    def pull_latest(self, stage: str) -> bool:
        """This host's copy of the task's newest product of `stage` alone (a side product, or an evaluation to
        show); False when there is none (never published, or removed by retention: the local copy then goes too)."""
        if self.store is None:
            return self.product_path(stage)[0].exists()
        product = self.store.latest_product(self.task, stage)
        if product is None:
            return self.product_path(stage)[0].exists()  # made before products were published: used as it is
        if product.removed_at is not None:
            path, directory = self.product_path(stage)
            if directory:
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            return False
        self._materialize(product)
        return True

    def pull(self, stage: str) -> None:
        """Make this host's copies of `stage`'s newest product and of every product its receipt chain names
        (with their receipts) the ones the store recorded, fetching by CID what differs. Nothing recorded yet:
        the local work directory (an older release's) is used as it is."""
        if self.store is None:
            return
        product = self.store.latest_product(self.task, stage)
        while product is not None:
            self._materialize(product)
            receipt_file = self.receipt_path(product.stage)
            if not receipt_file.is_file() or receipt_file.read_bytes() != product.receipt:
                write_atomic(receipt_file, product.receipt)
            previous = read_statement(product.receipt)["predicate"].get("previous_receipt")
            if previous is None:
                return
            found = self.store.product_by_receipt(self.task, previous)
            if found is None:
                raise ProductMissing(f"{self.task}: the receipt {previous} before the {product.stage} names no "
                                     "recorded product")
            product = found

    def receipt_path(self, stage: str) -> Path:
        return self.receipts / f"{STAGE_ORDER.index(stage) + 1:02d}-{stage}.dsse.json"

    def signer(self) -> tuple[object, str]:
        """The tenant's signing key and its id. Keys from KOLM_KEYS_DIR (a mounted Secret) are only read: a tenant
        missing there is an error, never a new key one pod alone would sign with."""
        if self.settings.keys_path is not None:
            key = load_private_key(self.settings.keys_dir, self.tenant)
            return key, keyid_for(key.public_key())
        keyid = ensure_tenant_keys(self.settings.keys_dir, self.tenant)
        return load_private_key(self.settings.keys_dir, self.tenant), keyid

    def write_receipt(self, stage: str, subject_name: str, subject_cid: str, predicate: dict,
                      capture_ids: list[int] | None = None, unnamed_rows: int = 0) -> str:
        """Sign this stage's receipt, chained to the previous stage's; later stages' receipts are
        removed because they no longer describe this chain. With a store, the product is published with it
        (`capture_ids`/`unnamed_rows`: what capture text it holds, for retention). Returns the receipt's CID."""
        index = STAGE_ORDER.index(stage)
        previous = None
        if index > 0:
            before = self.receipt_path(STAGE_ORDER[index - 1])
            if not before.is_file():
                raise FileNotFoundError(f"{before}: the {STAGE_ORDER[index - 1]} stage has not run")
            previous = receipt_cid(before.read_bytes())
        for later in STAGE_ORDER[index + 1 :]:
            self.receipt_path(later).unlink(missing_ok=True)
        key, keyid = self.signer()
        envelope = make_receipt(
            stage=stage,
            subject_name=subject_name,
            subject_cid=subject_cid,
            predicate={"task": self.task, "tenant": self.tenant, "namespace": self.namespace, **predicate},
            previous_cid=previous,
            private_key=key,
            keyid=keyid,
        )
        write_atomic(self.receipt_path(stage), envelope)
        self.publish(stage, receipt=envelope, capture_ids=capture_ids, unnamed_rows=unnamed_rows)
        return receipt_cid(envelope)

    def chain(self) -> list[bytes]:
        """The receipts of the current cycle, in order; all four must exist."""
        envelopes = []
        for stage in STAGE_ORDER:
            path = self.receipt_path(stage)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: the {stage} stage has not run in this cycle")
            envelopes.append(path.read_bytes())
        return envelopes
