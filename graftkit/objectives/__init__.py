"""Auxiliary training objectives: each adds a weighted term to the two-turn answer loss.

An objective is on when its weight in the recipe's `train` block (`Objective.field`) is above 0. It may
ask for extra batch inputs (`inputs`), and returns its term and the values `metrics.jsonl` logs. The
recipe refuses an objective whose needs the injector, the memory or a task cannot serve.
"""

from __future__ import annotations

from graftkit.objectives.base import Objective
from graftkit.objectives.preserve import PreserveLoss
from graftkit.objectives.read import ReadLoss
from graftkit.objectives.recall import RecallLoss
from graftkit.objectives.write import BackgroundCost, WriteCost

__all__ = ["BackgroundCost", "Objective", "PreserveLoss", "ReadLoss", "RecallLoss", "WriteCost", "build_objectives"]


def build_objectives(cfg, recall_head=None) -> list[Objective]:
    """The objectives a `train` config turns on, in the order their terms are added."""
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
        out.append(PreserveLoss(cfg.preserve_weight, cfg.seed))
    return out
