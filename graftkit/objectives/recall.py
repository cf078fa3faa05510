"""`train.recall_weight`: the recall head goes on classifying the memory's reads of each training question.

Legend: b batch, n tokens, d hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graftkit.objectives.base import Objective
from graftkit.recall import RecallHead, input_reads


def recall_logprobs(graft, head: RecallHead, attention_mask: torch.Tensor, labels: torch.Tensor, backs) -> torch.Tensor:
    """The recall head's log p(answer) (b answers) from the reads of a training pass, whose rows end with answers."""
    reads = input_reads(graft, labels.shape[1], "train.recall_weight").float()
    scored = labels != -100
    ends = scored.int().argmax(-1)  # index of each row's first answer token: its question part ends there
    return head(reads, attention_mask.bool() & ~scored, ends, backs)


class RecallLoss(Objective):
    field = "recall_weight"
    windowed = ("aux_recall_acc",)

    def __init__(self, weight: float, head: RecallHead):
        super().__init__(weight)
        self.head = head

    def inputs(self, graft, task, samples, hidden):
        return {"recall_targets": self.head.targets(samples), "recall_backs": self.head.backs(graft.backbone, samples)}

    def forward(self, graft, hidden, hidden_mask, batch):
        logp = recall_logprobs(graft, self.head, batch["attention_mask"], batch["labels"], batch["recall_backs"])
        loss = F.nll_loss(logp, batch["recall_targets"])
        return loss, {"aux_recall_loss": loss, "aux_recall_acc": (logp.argmax(-1) == batch["recall_targets"]).float().mean()}
