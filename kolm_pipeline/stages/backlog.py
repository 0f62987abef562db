"""How many kept pairs a namespace gained since its last distill, whoever launched that distill.

The store's `distilled` counter cannot answer it: a corpus marks only the pairs it wrote, so pairs dropped
as duplicates stay "not distilled" for ever and `kept − distilled` never returns to zero. The corpus
stage's receipt can: it records the namespace's counters at the moment the corpus was built, and every
distill (a sensor, the nightly schedule, the UI, `kolm distill`) writes it. Its CID identifies the distill.
"""

from __future__ import annotations

from dataclasses import dataclass

from kolm_pipeline.provenance.errors import RegistryError
from kolm_pipeline.provenance.receipts import read_statement, receipt_cid
from kolm_pipeline.stages.workdir import NamespaceWorkdir


@dataclass(frozen=True)
class DistillBacklog:
    """`kept` now; `kept_at_last_distill` as the last corpus receipt recorded it (0 before the first);
    `last_distill` that receipt's CID (None before the first)."""

    kept: int
    kept_at_last_distill: int
    last_distill: str | None

    @property
    def new_kept(self) -> int:
        """Kept pairs since the last distill; never negative (discards can lower `kept`)."""
        return max(0, self.kept - self.kept_at_last_distill)


def last_distill(workdir: NamespaceWorkdir) -> tuple[str | None, int]:
    """(CID of the namespace's last corpus receipt, kept counter it recorded); (None, 0) if there is none.

    With a store, the receipt is the newest published corpus's (whichever host built it); without, the work
    directory's. An unreadable receipt counts as no distill: the namespace is then distilled again."""
    if workdir.store is not None and (product := workdir.store.latest_product(workdir.task, "corpus")):
        envelope = product.receipt
    else:
        try:
            envelope = workdir.receipt_path("corpus").read_bytes()
        except FileNotFoundError:
            return None, 0
    try:
        counters = read_statement(envelope).get("predicate", {}).get("counters", {})
        kept = int(counters["kept"])
    except (RegistryError, AttributeError, KeyError, TypeError, ValueError):
        return None, 0
    return receipt_cid(envelope), kept


def distill_backlog(kept: int, workdir: NamespaceWorkdir) -> DistillBacklog:
    """The namespace's kept pairs now (`kept`, from the store's counters) and at its last distill."""
    receipt, kept_then = last_distill(workdir)
    return DistillBacklog(kept=kept, kept_at_last_distill=kept_then, last_distill=receipt)


def unrequested_kept(backlog: DistillBacklog, requested_at: int | None, requested_after: str | None) -> int:
    """New kept pairs that no requested distill covers yet.

    A distill requested at `requested_at` kept pairs, when the last distill was `requested_after`, counts as
    done until a newer distill exists (that one, or any other reaching the corpus stage): a run that is
    queued or training is not requested again as more pairs arrive."""
    if requested_at is None or requested_after != backlog.last_distill:
        return backlog.new_kept
    return max(0, backlog.kept - max(backlog.kept_at_last_distill, requested_at))
