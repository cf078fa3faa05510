"""`additive_read`: every input embedding queries the memory directly and adds what it reads, gated.

For each token embedding x (b n d), with the memory state bound for this forward pass:

    y = x + keep · tanh(gate) ⊙ W_out · memory.read(W_q · x, state)

`gate` is one pre-activation per hidden channel, `gate_init` (0.0: closed) at init, so a fresh graft
leaves the frozen backbone exactly as it was; `keep` is 0 for rows whose memory is still empty. The hook
sits on the embedding module, so it also applies to each new token of cached generation, and it does
nothing outside `Injector.reading(...)` (turn 1, or the bare backbone), where `self.context` is None.

Legend: b batch, n tokens, d hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from pydantic import Field
from torch import nn

from graftkit.errors import GraftkitError
from graftkit.injector import Injector, InjectorConfig
from graftkit.memory import Memory
from graftkit.state import MemoryState


@dataclass
class Bound:
    """What the hook needs during one forward pass (`Injector.context`)."""

    memory: Memory
    state: MemoryState
    keep: torch.Tensor  # b: 1.0 where the row's memory holds something


class AdditiveRead(Injector):
    """Adds a tanh-gated projection of a direct memory read to every input embedding (example plugin)."""

    name = "additive_read"

    class Config(InjectorConfig):
        gate_init: float = Field(
            0.0,
            ge=-10.0,
            le=10.0,
            description="Initial gate pre-activation per channel; the gate is tanh(gate), so 0.0 starts closed "
            "(the grafted model equals the bare backbone).",
        )
        query_scale: float = Field(1.0, gt=0.0, description="Scale of the query projection's initial weights (1.0: PyTorch's default init).")

    config: Config

    def __init__(self, config: Config, hidden_size: int, num_layers: int):
        super().__init__(config, hidden_size, num_layers)
        self.to_query = nn.Linear(hidden_size, hidden_size, bias=False)
        self.to_out = nn.Linear(hidden_size, hidden_size, bias=False)
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.gate = nn.Parameter(torch.full((hidden_size,), float(config.gate_init)))
        with torch.no_grad():
            self.to_query.weight.mul_(config.query_scale)

    def attach(self, backbone) -> None:
        if self.attached:
            raise GraftkitError(f"injector {self.name!r} is already attached to a backbone; call detach() first")
        if backbone.hidden_size != self.hidden_size:
            raise GraftkitError(f"injector: built for hidden size {self.hidden_size}, the backbone has {backbone.hidden_size}")
        self.hook(backbone.embedding, self._on_embedding)  # removed by detach()

    def prepare(self, memory: Memory, state: MemoryState) -> Bound:
        return Bound(memory=memory, state=state, keep=(~state.is_empty).float())

    def _on_embedding(self, module, args, output):
        bound = self.context
        if bound is None:  # not inside graft.reading(...): leave the backbone alone
            return None
        x = output.float()
        dtype = next((t.dtype for t in bound.state.tensors.values() if t.is_floating_point()), torch.float32)
        read = bound.memory.read(self.to_query(self.norm(x)).to(dtype), bound.state).float()
        keep = rearrange(bound.keep.to(x.device), "b -> b 1 1")
        return (x + keep * torch.tanh(self.gate) * self.to_out(read)).to(output.dtype)
