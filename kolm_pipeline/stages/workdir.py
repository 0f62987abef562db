"""Where one namespace's stage outputs live, and the receipt chain that ties them together.

Every stage writes its output under `KOLM_HOME/work/<tenant.namespace>/` and appends a signed receipt
naming the previous one, so the deployment can ship the whole chain inside the `.kolm` artifact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kolm_pipeline.provenance.atomic import write_atomic
from kolm_pipeline.provenance.cid import cid_for_bytes, cid_for_file
from kolm_pipeline.provenance.keys import ensure_tenant_keys, load_private_key
from kolm_pipeline.provenance.receipts import make_receipt, receipt_cid
from kolm_pipeline.settings import Settings
from kolm_pipeline.store.namespaces import split_partition_key

STAGE_ORDER = ("corpus", "recipe", "adapter", "evaluation")


def directory_cid(path: Path) -> str:
    """CID of a directory: of a canonical index of its files' CIDs, so any changed byte changes it."""
    index = {
        str(file.relative_to(path)): cid_for_file(file) for file in sorted(path.rglob("*")) if file.is_file()
    }
    return cid_for_bytes(json.dumps(index, sort_keys=True).encode())


@dataclass(frozen=True)
class NamespaceWorkdir:
    """Paths of one namespace's pipeline outputs."""

    settings: Settings
    partition: str
    base_dir: Path | None = None

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

    def receipt_path(self, stage: str) -> Path:
        return self.receipts / f"{STAGE_ORDER.index(stage) + 1:02d}-{stage}.dsse.json"

    def signer(self) -> tuple[object, str]:
        keyid = ensure_tenant_keys(self.settings.keys_dir, self.tenant)
        return load_private_key(self.settings.keys_dir, self.tenant), keyid

    def write_receipt(self, stage: str, subject_name: str, subject_cid: str, predicate: dict) -> str:
        """Sign this stage's receipt, chained to the previous stage's; later stages' receipts are
        removed because they no longer describe this chain. Returns the receipt's CID."""
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
