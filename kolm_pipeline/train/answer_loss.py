"""The loss kolm trains with: answer tokens only, weighted by provenance, scored without full logits.

trl's default loss projects every position through the LM head on CPU (it compacts to the labelled
positions only on Triton devices). Distillation pairs are mostly prompt: a routed ticket is ~80 tokens
with a 2-token answer, and the 49k-way projection of the prompt positions is wasted work. Here the model
is asked for the logits of the positions that predict an answer token only (`logits_to_keep` with an
index tensor, which every transformers causal LM honours, softcapping and scaling included), and each
answer token's loss is multiplied by its pair's provenance weight.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from trl import SFTTrainer

WEIGHTS_COLUMN = "token_weights"


class WeightedCollator:
    """trl's collator plus the per-token weights, laid out exactly like its `labels` (padded or packed)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        weights = [torch.tensor(example[WEIGHTS_COLUMN], dtype=torch.float32) for example in examples]
        batch = self.inner([{k: v for k, v in example.items() if k != WEIGHTS_COLUMN} for example in examples])
        rows = [torch.cat(weights)] if getattr(self.inner, "padding_free", False) else weights
        laid_out = torch.zeros(batch["labels"].shape, dtype=torch.float32)
        for index, row in enumerate(rows):
            laid_out[index, : row.numel()] = row
        batch[WEIGHTS_COLUMN] = laid_out.masked_fill(batch["labels"] == -100, 0.0)
        return batch


class AnswerLossTrainer(SFTTrainer):
    """SFTTrainer on pre-tokenized examples (`train.examples`) with the answer-only weighted loss."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.data_collator = WeightedCollator(self.data_collator)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if WEIGHTS_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, WEIGHTS_COLUMN]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        weights = inputs.pop(WEIGHTS_COLUMN)
        targets, target_weights = labels[:, 1:], weights[:, 1:]
        scored = (targets != -100).any(dim=0).nonzero().flatten()
        outputs = model(**inputs, use_cache=False, logits_to_keep=scored)
        logits = outputs.logits.float()
        targets, target_weights = targets[:, scored], target_weights[:, scored]
        per_token = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="none"
        ).view_as(targets)
        answer_tokens = (targets != -100).sum()
        denominator = num_items_in_batch if num_items_in_batch is not None else answer_tokens
        loss = (per_token * target_weights).sum() / torch.as_tensor(denominator, device=logits.device).clamp(min=1)
        return (loss, outputs) if return_outputs else loss
