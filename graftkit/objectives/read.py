"""`train.read_loss`: the memory's reads over the question should name the answer, through the backbone's decoder.

Legend: b batch, n tokens, d hidden size.
"""

from __future__ import annotations

import torch

from graftkit.objectives.base import Objective
from graftkit.recall import input_reads


def read_loss(graft, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How well the memory's reads over the question name the answer, with the frozen backbone's own decoder.

    Each question position's read (the injector's `reads`, b n d) goes through the backbone's final norm
    and LM head; the loss is -log of the answer's first token's probability averaged over the row's
    question positions (padding and answer positions excluded), so one position that recalls the answer
    suffices: typically the name asked about. It reaches the memory without passing through the frozen
    layers, where the answer loss's signal is weak.
    """
    reads = input_reads(graft, labels.shape[1], "train.read_loss")
    scored = labels != -100
    first = scored.int().argmax(-1)  # rows end with their answers: index of the first answer token
    rows = torch.arange(labels.shape[0], device=labels.device)
    target = labels[rows, first]
    question = attention_mask.bool() & ~scored
    logp = torch.log_softmax(graft.backbone.logits(reads).float(), dim=-1)  # b n vocab
    at = logp.gather(-1, target[:, None, None].expand(-1, logp.shape[1], 1)).squeeze(-1)  # b n
    at = at.masked_fill(~question, float("-inf"))
    mixture = torch.logsumexp(at, dim=-1) - question.sum(-1).clamp(min=1).float().log()
    return -mixture.mean()


class ReadLoss(Objective):
    field = "read_loss"

    def forward(self, graft, hidden, hidden_mask, batch):
        value = read_loss(graft, batch["attention_mask"], batch["labels"])
        return value, {"read_loss": value}
