"""The loss kolm trains with: answer tokens only, weighted by provenance, scored without full logits.

trl's default loss projects every position through the LM head on CPU (it compacts to the labelled
positions only on Triton devices). Distillation pairs are mostly prompt: a routed ticket is ~80 tokens
with a 2-token answer, and the 49k-way projection of the prompt positions is wasted work. Here the model
is asked for the logits of the positions that predict an answer token only (`logits_to_keep` with an
index tensor, which every transformers causal LM honours, softcapping and scaling included), and each
answer token's loss is multiplied by its pair's provenance weight.

For a closed-vocabulary task (the examples carry `label_choices`, ``examples.py``), an answer token's loss is over
the tokens the label set allows where it stands, not the whole vocabulary: constrained decoding only ever chooses
among those, so training spends itself on telling the labels apart (the label loss). A token where the label is
already decided has nothing to choose and no loss; a token off the label trie keeps the whole-vocabulary loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from trl import SFTTrainer

from kolm_pipeline.train.examples import CHOICES_COLUMN

WEIGHTS_COLUMN = "token_weights"
# Logits of tokens that are not among a position's choices, in the label loss: finite, so a position with no
# choices (whose result is not used) has no NaN gradient either.
_EXCLUDED = -1e4


class WeightedCollator:
    """trl's collator plus the per-token weights, laid out exactly like its `labels` (padded or packed)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        extra = (WEIGHTS_COLUMN, CHOICES_COLUMN)
        weights = [torch.tensor(example[WEIGHTS_COLUMN], dtype=torch.float32) for example in examples]
        batch = self.inner([{k: v for k, v in example.items() if k not in extra} for example in examples])
        padding_free = getattr(self.inner, "padding_free", False)
        rows = [torch.cat(weights)] if padding_free else weights
        laid_out = torch.zeros(batch["labels"].shape, dtype=torch.float32)
        for index, row in enumerate(rows):
            laid_out[index, : row.numel()] = row
        batch[WEIGHTS_COLUMN] = laid_out.masked_fill(batch["labels"] == -100, 0.0)
        if examples and CHOICES_COLUMN in examples[0]:
            per_token = [[choices for example in examples for choices in example[CHOICES_COLUMN]]] if padding_free \
                else [example[CHOICES_COLUMN] for example in examples]
            widest = max(1, *(len(choices) for row in per_token for choices in row))
            # -1 where a position has no (more) choices.
            laid_out_choices = torch.full((*batch["labels"].shape, widest), -1, dtype=torch.long)
            for index, row in enumerate(per_token):
                for position, choices in enumerate(row):
                    if choices:
                        laid_out_choices[index, position, : len(choices)] = torch.tensor(choices)
            batch[CHOICES_COLUMN] = laid_out_choices
        return batch


class AnswerLossTrainer(SFTTrainer):
    """SFTTrainer on pre-tokenized examples (`train.examples`) with the answer-only weighted loss."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.data_collator = WeightedCollator(self.data_collator)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        extra = [column for column in (WEIGHTS_COLUMN, CHOICES_COLUMN) if column not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *extra]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        weights = inputs.pop(WEIGHTS_COLUMN)
        choices = inputs.pop(CHOICES_COLUMN, None)
        targets, target_weights = labels[:, 1:], weights[:, 1:]
        scored = (targets != -100).any(dim=0).nonzero().flatten()
        outputs = model(**inputs, use_cache=False, logits_to_keep=scored)
        logits = outputs.logits.float()
        targets, target_weights = targets[:, scored], target_weights[:, scored]
        per_token = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="none"
        ).view_as(targets)
        if choices is not None:
            per_token = _label_loss(logits, targets, choices[:, 1:][:, scored], per_token)
        answer_tokens = (targets != -100).sum()
        denominator = num_items_in_batch if num_items_in_batch is not None else answer_tokens
        loss = (per_token * target_weights).sum() / torch.as_tensor(denominator, device=logits.device).clamp(min=1)
        return (loss, outputs) if return_outputs else loss


def _label_loss(logits: torch.Tensor, targets: torch.Tensor, choices: torch.Tensor,
                whole_vocabulary: torch.Tensor) -> torch.Tensor:
    """Each position's loss over its choices (cross-entropy of the target among them) where there are several,
    none where the label is already decided (one choice), ``whole_vocabulary``'s where it has none."""
    count = (choices >= 0).sum(-1)
    among = logits.gather(-1, choices.clamp(min=0)).masked_fill(choices < 0, _EXCLUDED)
    target_logit = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    restricted = torch.logsumexp(among, dim=-1) - target_logit
    return torch.where(count >= 2, restricted,
                       torch.where(count == 1, torch.zeros_like(restricted), whole_vocabulary))
