"""The base class of the auxiliary training objectives (`graftkit.objectives`)."""

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
