"""Auxiliary training objectives: each adds a weighted term to the two-turn answer loss.

An objective is on when its weight in the recipe's `train` block (`Objective.field`) is above 0. It may
ask for extra batch inputs (`inputs`), and returns its term and the values `metrics.jsonl` logs. The
recipe refuses an objective whose needs the injector, the memory or a task cannot serve.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class Objective(nn.Module):
    """One weighted term of the training loss."""

    #: the `train` field holding its weight
    field: ClassVar[str]
    #: logged values averaged over the last 50 steps rather than reported per step
    windowed: ClassVar[tuple[str, ...]] = ()

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def inputs(self, graft, task, samples, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra batch tensors this objective needs for `samples` (of one `task`); none by default."""
        return {}

    def forward(self, graft, hidden, hidden_mask, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the term, {name: value to log}) for a pass whose turn-2 forward has just run."""
        raise NotImplementedError


def build_objectives(cfg, recall_head=None) -> list[Objective]:
    """The objectives a `train` config turns on, in the order their terms are added."""
    from graftkit.objectives.read import ReadLoss
    from graftkit.objectives.recall import RecallLoss
    from graftkit.objectives.write import BackgroundCost, WriteCost

    out: list[Objective] = []
    if cfg.read_loss:
        out.append(ReadLoss(cfg.read_loss))
    if cfg.recall_weight:
        out.append(RecallLoss(cfg.recall_weight, recall_head))
    if cfg.write_cost:
        out.append(WriteCost(cfg.write_cost))
    if cfg.background_cost:
        out.append(BackgroundCost(cfg.background_cost))
    if cfg.preserve_weight:
        from graftkit.objectives.preserve import PreserveLoss

        out.append(PreserveLoss(cfg.preserve_weight, cfg.seed))
    return out
