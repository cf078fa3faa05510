"""Per-channel standardisation of the hidden states a graft writes into its memory.

A frozen LLM's hidden states share a large common direction: on SmolLM2-135M at layer 8 the mean
vector's norm is about 70% of a token's (a few "massive activation" channels), and two tokens have a
mean |cosine| of about 0.5. Keys projected from such states overlap as much, and an associative memory
cannot keep them apart: writes interfere and Titans' step cap shrinks every update. Subtracting the
per-channel mean and dividing by the per-channel standard deviation brings the mean |cosine| to about
0.14 before the memory's own projections (`research/write_stats.py` measures both).

The statistics belong to the backbone and the write layer, not to the data of a run: a graft measures
them once when it is built, on a fixed passage of the vendored training book, and they travel with
the graft's tensors (checkpoints, exports). They are buffers, not trained.

Legend: b batch, n tokens, d hidden size.
"""

from __future__ import annotations

import torch
from torch import nn

from graftkit.data.books import load_books

#: Tokens of calibration text (one segment at most `segment_tokens` long is run through the backbone).
CALIBRATION_TOKENS = 1024


class WriteNorm(nn.Module):
    """x ↦ (x − mean) · inv_std per channel; the identity until `calibrate` is called."""

    mean: torch.Tensor  # buffers (d)
    inv_std: torch.Tensor

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("inv_std", torch.ones(dim))

    @torch.no_grad()
    def calibrate(self, hidden: torch.Tensor) -> None:
        """Set the statistics from example hidden states (n d, or b n d with every position real)."""
        flat = hidden.reshape(-1, hidden.shape[-1]).float()
        std = flat.std(0)
        floor = std.median().clamp(min=1e-6) * 1e-3  # a channel that never moves is not blown up
        self.mean.copy_(flat.mean(0))
        self.inv_std.copy_(1.0 / std.clamp(min=floor))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Standardised hidden states (b n d), in the dtype of `hidden`."""
        return ((hidden - self.mean.to(hidden.dtype)) * self.inv_std.to(hidden.dtype)).to(hidden.dtype)


def calibration_text() -> str:
    """The fixed passage graft statistics are measured on: the start of the first vendored training book."""
    return load_books("train")[0].text[:8_000]
