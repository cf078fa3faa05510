"""`train.write_cost` and `train.background_cost`: a price on what the memory writes.

Legend: b batch, n tokens.
"""

from __future__ import annotations

import torch

from graftkit.objectives.base import Objective


def write_mass(graft, hidden: torch.Tensor, hidden_mask: torch.Tensor) -> torch.Tensor:
    """The memory's write strengths summed over each context's written tokens, averaged over rows and heads."""
    strengths = graft.write_strengths(hidden)  # b n heads
    return (strengths * hidden_mask[..., None].to(strengths.dtype)).sum(1).mean()


def background_tokens(tokenizer, task, samples, n_tokens: int, known: dict | None = None) -> torch.Tensor:
    """(b n_tokens) 1.0 on the context tokens that lie outside the samples' facts (as `task.fact_mask` says),
    else 0. `known` (sample uid -> mask) keeps each sample's mask, so a sample drawn again is not tokenized again."""
    rows = torch.zeros(len(samples), n_tokens)
    for row, sample in zip(rows, samples):
        mask = known.get(sample.uid) if known is not None else None
        if mask is None:
            offsets = tokenizer(sample.context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            mask = torch.from_numpy(~task.fact_mask(sample, offsets))
            if known is not None:
                known[sample.uid] = mask
        row[: min(len(mask), n_tokens)] = mask[:n_tokens].float()
    return rows


class WriteCost(Objective):
    field = "write_cost"

    def forward(self, graft, hidden, hidden_mask, batch):
        mass = write_mass(graft, hidden, hidden_mask)
        return mass, {"write_mass": mass}


class BackgroundCost(Objective):
    field = "background_cost"

    def __init__(self, weight: float):
        super().__init__(weight)
        self.known: dict = {}  # sample uid -> its book-text mask

    def inputs(self, graft, task, samples, hidden):
        return {"background": background_tokens(graft.backbone.tokenizer, task, samples, hidden.shape[1], self.known).to(hidden.device)}

    def forward(self, graft, hidden, hidden_mask, batch):
        mass = write_mass(graft, hidden, hidden_mask * batch["background"])
        return mass, {"background_mass": mass}
