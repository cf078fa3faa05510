"""Gated cross-attention onto memory tokens: the block the built-in injectors share.

A `GatedCrossAttention` adds `tanh(gate) · CrossAttention(RMSNorm(x), RMSNorm(memory tokens))` to a
stream of hidden states (Flamingo-style). Its gate starts at `tanh(gate_init)`, 0 by default, so a
fresh graft leaves the frozen backbone exactly as it was. Rows whose memory is empty get nothing
added, whatever the gate. The block computes in float32 (the graft's dtype) and casts back to the
backbone's dtype at the boundary.

`MemoryTokenInjector` is the common base of the built-ins that attend to memory tokens: one
`MemoryTokens` read per forward pass (`prepare`). `CrossAttentionConfig` holds the options of their
cross-attention blocks.

Legend: b batch, n tokens (queries), k memory tokens, h heads, e head width, d hidden size,
two keys and values stacked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from pydantic import Field
from torch import nn

from graftkit.injector import Injector, InjectorConfig, MemoryTokens, PerPositionReads, state_dtype
from graftkit.memory import Memory
from graftkit.state import MemoryState

GateKind = Literal["scalar", "channel", "token"]
GATE_HELP = (
    "Shape of the tanh gate: 'scalar' (one per block), 'channel' (one per hidden channel) or 'token' "
    "(one per token, computed from the token's hidden state and what it read; zero-initialised weights, "
    "so only gate_init sets its value at the start)."
)
HEADS_HELP = "Attention heads of the cross-attention onto the memory tokens."
DIM_HEAD_HELP = (
    "Width of one attention head; queries, keys and values are projected to heads·dim_head, independent "
    "of the backbone's hidden size (so a 7B backbone does not get d×d projections)."
)
GATE_INIT_HELP = (
    "Initial gate pre-activation: the gate starts at tanh(gate_init). 0.0 means closed, i.e. the grafted model starts out equal to the bare backbone."
)


class CrossAttentionConfig(InjectorConfig):
    """The options of a `GatedCrossAttention` block; the Configs of the injectors built on it subclass this."""

    heads: int = Field(8, ge=1, le=64, description=HEADS_HELP)
    dim_head: int = Field(64, ge=4, le=512, description=DIM_HEAD_HELP)
    gate: GateKind = Field("scalar", description=GATE_HELP)
    gate_init: float = Field(0.0, ge=-10.0, le=10.0, description=GATE_INIT_HELP)


@dataclass
class Recall:
    """What the hooks need from the memory while a `reading` block is open (`Injector.context`).

    Computed once per block: one forward pass in training, a whole generation (prefill and every
    cached step) in decoding. Like the memory tokens, each block's keys and values are derived once.
    """

    tokens: torch.Tensor  # b k d memory tokens, float32
    keep: torch.Tensor  # b, 1.0 where the row's memory holds something, 0.0 where it is empty
    memory: Memory
    state: MemoryState
    kv: dict = field(default_factory=dict)  # per block: keys and values of the memory tokens, computed once


class TanhGate(nn.Module):
    """g = tanh(bias + features · weightᵀ) of width 1 or d; `weight` (token gates only) starts at zero."""

    def __init__(self, width: int, init: float, in_features: int = 0):
        super().__init__()
        self.bias = nn.Parameter(torch.full((width,), float(init)))
        self.weight = nn.Parameter(torch.zeros(width, in_features)) if in_features else None

    def forward(self, features: torch.Tensor | None = None) -> torch.Tensor:
        if self.weight is None:
            return torch.tanh(self.bias)
        return torch.tanh(F.linear(features, self.weight, self.bias))


class CrossAttention(nn.Module):
    """Multi-head attention of hidden states (b n d) over memory tokens (b k d), pre-normed on both sides.

    The memory tokens' keys and values come from `memory_kv` (once per reading, not once per call).

    `extra` (b n d), when given, is one more key/value per query token (e.g. that token's own direct
    memory read), attended to alongside the shared memory tokens.
    """

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.norm_q = nn.RMSNorm(dim, eps=1e-6)
        self.norm_kv = nn.RMSNorm(dim, eps=1e-6)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def memory_kv(self, tokens: torch.Tensor) -> torch.Tensor:
        """Keys and values of the memory tokens (two b h k e)."""
        return rearrange(self.to_kv(self.norm_kv(tokens)), "b k (two h e) -> two b h k e", two=2, h=self.heads)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """x (b n d) attends to the memory tokens' keys and values `kv` (from `memory_kv`)."""
        h = self.heads
        q = rearrange(self.to_q(self.norm_q(x)), "b n (h e) -> b h n e", h=h)
        k, v = kv
        if extra is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            k_own, v_own = rearrange(self.to_kv(self.norm_kv(extra)), "b n (two h e) -> two b h n e", two=2, h=h)
            own = rearrange(einsum(q, k_own, "b h n e, b h n e -> b h n"), "b h n -> b h n 1")
            logits = torch.cat([einsum(q, k, "b h n e, b h k e -> b h n k"), own], dim=-1) / math.sqrt(q.shape[-1])
            weights = logits.softmax(-1)  # b h n (k+1): the shared memory tokens, then the token's own read
            shared, own = weights[..., :-1], weights[..., -1:]
            out = einsum(shared, v, "b h n k, b h k e -> b h n e") + own * v_own
        return self.to_out(rearrange(out, "b h n e -> b n (h e)"))


class GatedCrossAttention(nn.Module):
    """hidden + keep · tanh(gate) · CrossAttention(hidden, memory tokens), in float32, cast back."""

    def __init__(self, dim: int, heads: int, dim_head: int, gate: GateKind, gate_init: float):
        super().__init__()
        self.attn = CrossAttention(dim, heads, dim_head)
        widths = {"scalar": (1, 0), "channel": (dim, 0), "token": (1, 2 * dim)}
        width, in_features = widths[gate]
        self.gate = TanhGate(width, gate_init, in_features)

    def forward(self, hidden: torch.Tensor, recall: Recall, extra: torch.Tensor | None = None) -> torch.Tensor:
        x = hidden.float()
        if self not in recall.kv:  # once per forward pass, or once per generation with a KV cache
            recall.kv[self] = self.attn.memory_kv(recall.tokens)
        read = self.attn(x, recall.kv[self], extra)
        features = torch.cat([self.attn.norm_q(x), read], dim=-1) if self.gate.weight is not None else None
        gate = self.gate(features) * rearrange(recall.keep, "b -> b 1 1")
        return (x + gate * read).to(hidden.dtype)


class MemoryTokenInjector(Injector):
    """Base of the built-in injectors: reads `num_tokens` memory tokens once per forward pass."""

    def __init__(self, config: InjectorConfig, hidden_size: int, num_layers: int):
        super().__init__(config, hidden_size, num_layers)
        self.memory_tokens = MemoryTokens(hidden_size, config.num_tokens)

    def prepare(self, memory: Memory, state: MemoryState) -> Recall:
        tokens = self.memory_tokens(memory, state).float()
        return Recall(tokens=tokens, keep=(~state.is_empty).float().to(tokens.device), memory=memory, state=state)


class DirectRead(PerPositionReads):
    """Base of an injector whose positions can also read the memory themselves (`config.direct_read`): the
    subclass sets `to_query` (a projection d -> d) when it does, None otherwise."""

    to_query: nn.Module | None

    @classmethod
    def reads_each_position(cls, config: InjectorConfig) -> bool:
        return bool(getattr(config, "direct_read", False))

    def read_directly(self, x: torch.Tensor, recall: Recall) -> torch.Tensor | None:
        """Each position's own read (b n d, float32; kept in `reads`) with the query `to_query(x)`, or None
        without direct reads."""
        if self.to_query is None:
            return None
        query = self.to_query(x).to(state_dtype(recall.state))
        self.reads = recall.memory.read(query, recall.state).float()
        return self.reads
