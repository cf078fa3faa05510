"""A deliberately simple memory: the running mean of every written vector, scaled by a learned gain.

Legend: b rows, n written tokens, m query tokens, d model width.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from pydantic import Field
from torch import nn

from graftkit.memory import Memory, MemoryConfig
from graftkit.state import MemoryState


class MeanMemory(Memory):
    """Mean of all written vectors times a learned gain (graftkit-test-plugin; a test fixture, not a useful memory)."""

    name = "test_mean"

    class Config(MemoryConfig):
        gain_init: float = Field(1.0, description="Initial value of the learned gain applied to what is read.")

    def __init__(self, config: Config):
        super().__init__(config)
        self.gain = nn.Parameter(torch.tensor(float(config.gain_init)))

    def _init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {"sum": torch.zeros(batch_size, self.dim, device=device, dtype=dtype)}

    def _write(self, x: torch.Tensor, state: MemoryState, mask: torch.Tensor | None) -> MemoryState:
        if mask is not None:
            x = x * rearrange(mask, "b n -> b n 1").to(x.dtype)
        return state.replace(sum=state["sum"] + x.sum(dim=1))

    def _read(self, q: torch.Tensor, state: MemoryState) -> torch.Tensor:
        count = state.tokens_written.clamp(min=1).to(q.dtype)
        mean = state["sum"] / rearrange(count, "b -> b 1")
        return self.gain * repeat(mean, "b d -> b m d", m=q.shape[1])
