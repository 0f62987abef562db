"""Eval-set rotation: the evals follow what users ask now.

A capture tagged `eval-candidate` (`x-kolm-tags: eval-candidate` on the request, or the tag added at triage)
is a question someone wants the student judged on. The corpus carries it marked (`meta.eval_candidate`), and
it is never trained on. On every compile a share of the candidates, newest first, joins the eval split; the
rest wait, still out of training (decontamination also removes training pairs that overlap any of them).
Which candidates rotate in depends only on the corpus and the share, so a recompile of the same corpus gives
the same eval split. The frozen hold-out never rotates: it is the fixed yardstick the collapse tripwire
compares candidates across compiles with.
"""

from __future__ import annotations

import math

from kolm_pipeline.provenance.errors import InvalidInput
from kolm_pipeline.store import EVAL_CANDIDATE_TAG

__all__ = ["EVAL_CANDIDATE_META", "EVAL_CANDIDATE_TAG", "EVAL_ROTATION_SHARE", "capture_ids", "check_share",
           "is_eval_candidate", "rotate"]

EVAL_CANDIDATE_META = "eval_candidate"
EVAL_ROTATION_SHARE = 0.5


def is_eval_candidate(row: dict) -> bool:
    return bool((row.get("meta") or {}).get(EVAL_CANDIDATE_META))


def check_share(share: float) -> float:
    """The rotation share, refused with a clear message unless it is a number in [0, 1]."""
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
        raise InvalidInput(f"eval rotation share must be a number from 0 to 1, got {share!r}")
    return float(share)


def rotate(candidates: list[dict], share: float = EVAL_ROTATION_SHARE) -> tuple[list[int], list[int]]:
    """Indices of the candidates that rotate into eval (the newest ceil(share × n), by capture id, later
    rows first when a row has none) and of those held back, each in corpus order."""
    share = check_share(share)

    def age(index: int) -> tuple[int, int]:
        capture_id = (candidates[index].get("meta") or {}).get("capture_id")
        return (capture_id if isinstance(capture_id, int) else -1, index)

    newest_first = sorted(range(len(candidates)), key=age, reverse=True)
    count = math.ceil(round(share * len(candidates), 9))  # 0.3 × 10 is 3.0000000000000004 in floats
    return sorted(newest_first[:count]), sorted(newest_first[count:])


def capture_ids(rows: list[dict]) -> list[int | None]:
    return [(row.get("meta") or {}).get("capture_id") for row in rows]
