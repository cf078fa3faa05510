"""Attention-slot memory: a fixed set of learned slots per head that absorb the written tokens by
attention and are read by attention.

Each slot holds a key and a value (per head). Writing runs over the input in chunks of `chunk_size`
tokens, so the attention matrices stay `slots × chunk_size` whatever the length:

    a[s, t]  = softmax over slots of τ_w · k̂_s·k̂_t        each token is shared out among the slots
    mass_s   = Σ_t a[s, t]                                 how much of the chunk the slot took
    r_s      = Σ_t a[s, t] (k_t, v_t) / mass_s             what the slot read (key and value)
    i_s, f_s = sigmoid(gates(slot value, read value))      per-slot input and forget gates
    ρ_s      = 1 − exp(−mass_s)                            write strength: 0 for a slot that took nothing
    slot_s  ← (1 − ρ_s (1 − f_s)) slot_s + ρ_s i_s r_s

Normalising over slots (as in Slot Attention) makes tokens compete for slots, so distinct tokens
land in distinct slots. Reading: each query attends over the slot keys (τ_r · q̂·k̂_s, softmax over
slots) and returns the weighted slot values, merged over heads and projected to d.

Masked positions take no attention (a = 0), so they leave every slot as it was; a chunk with no
unmasked token is a no-op. Writing in two calls equals one call when the split falls on a chunk
boundary of the first call (the slots are updated once per chunk).

Legend: b rows, n written tokens, m query tokens, d model width, h heads, e dim_head, s slots,
k chunks, c tokens inside a chunk, g gates (input, forget), w temperatures (write, read).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, repeat
from pydantic import Field
from torch import nn

from graftkit.memory import Memory, MemoryConfig
from graftkit.state import MemoryState

# Initial attention temperatures for unit-norm keys (cosine logits) and gate biases (input gate
# σ(2) ≈ 0.88, forget gate σ(−1) ≈ 0.27: a slot that takes a whole token mostly takes it over); all
# are learned.
WRITE_TEMPERATURE, READ_TEMPERATURE = 20.0, 20.0
INPUT_BIAS, FORGET_BIAS = 2.0, -1.0


class AttentionSlotsMemory(Memory):
    """Multi-head learned slots written by slot-competitive attention with gated updates."""

    name = "attention_slots"

    class Config(MemoryConfig):
        slots: int = Field(64, ge=1, le=65536, description="Number of memory slots per head.")
        heads: int = Field(4, ge=1, le=64, description="Number of heads, each with its own slots.")
        dim_head: int = Field(64, ge=2, le=1024, description="Width of slot keys and values of one head.")
        chunk_size: int = Field(
            64,
            ge=1,
            le=65536,
            description="Written tokens the slots attend to at once; slots are updated once per chunk, so "
            "memory use is slots × chunk_size per head whatever the length.",
        )

    def __init__(self, config: AttentionSlotsMemory.Config):
        super().__init__(config)
        inner = config.heads * config.dim_head
        h, s, e = config.heads, config.slots, config.dim_head
        self.to_keys = nn.Linear(self.dim, inner, bias=False)
        self.to_values = nn.Linear(self.dim, inner, bias=False)
        self.to_queries = nn.Linear(self.dim, inner, bias=False)
        self.to_out = nn.Linear(inner, self.dim, bias=False)
        self.slot_keys = nn.Parameter(torch.randn(h, s, e))
        self.slot_values = nn.Parameter(torch.randn(h, s, e) / math.sqrt(e))
        self.gate_weight = nn.Parameter(torch.randn(h, 2 * e, 2) / math.sqrt(2 * e))  # (slot, read) -> (input, forget)
        biases = torch.tensor([INPUT_BIAS, FORGET_BIAS], dtype=torch.float32)
        self.gate_bias = nn.Parameter(repeat(biases, "g -> h g", h=h).clone())
        self.log_temperature = nn.Parameter(
            repeat(torch.tensor([WRITE_TEMPERATURE, READ_TEMPERATURE], dtype=torch.float32).log(), "w -> w h", h=h).clone()
        )

    def _init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """`keys`, `values` (b h s e): every row starts from the learned slots."""
        return {
            "keys": repeat(self.slot_keys, "h s e -> b h s e", b=batch_size).to(device=device, dtype=dtype),
            "values": repeat(self.slot_values, "h s e -> b h s e", b=batch_size).to(device=device, dtype=dtype),
        }

    def _write(self, x: torch.Tensor, state: MemoryState, mask: torch.Tensor | None) -> MemoryState:
        cfg = self.config
        size, heads = cfg.chunk_size, cfg.heads
        chunks = max(1, math.ceil(x.shape[1] / size))
        pad = chunks * size - x.shape[1]
        x = F.pad(x, (0, 0, 0, pad))

        keys = F.normalize(rearrange(self.to_keys(x), "b n (h e) -> b n h e", h=heads), dim=-1)
        keys = rearrange(keys, "b (k c) h e -> k b h c e", c=size).contiguous()
        values = rearrange(self.to_values(x), "b (k c) (h e) -> k b h c e", c=size, h=heads).contiguous()
        keep = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
        keep[:, keep.shape[1] - pad :] = 0.0
        if mask is not None:
            keep[:, : mask.shape[1]] = mask.to(x.dtype)
        keep = rearrange(keep, "b (k c) -> k b 1 1 c", c=size)
        write_temperature = rearrange(self.log_temperature[0].exp(), "h -> h 1 1")
        bias = rearrange(self.gate_bias, "h g -> h 1 g")

        slot_keys, slot_values = state["keys"], state["values"]
        # unbind, not indexing: the backward of t-th-chunk indexing would zero-fill a whole tensor per chunk
        for chunk_keys, chunk_values, chunk_keep in zip(keys.unbind(0), values.unbind(0), keep.unbind(0)):
            logits = write_temperature * torch.matmul(F.normalize(slot_keys, dim=-1), chunk_keys.mT)  # b h s c
            attention = logits.softmax(dim=-2) * chunk_keep
            mass = attention.sum(-1, keepdim=True)  # b h s 1
            share = attention / (mass + 1e-6)
            read_keys, read_values = torch.matmul(share, chunk_keys), torch.matmul(share, chunk_values)
            features = torch.cat([slot_values, read_values], dim=-1)  # b h s 2e
            gates = torch.sigmoid(einsum(features, self.gate_weight, "b h s f, h f g -> b h s g") + bias)
            strength = 1.0 - torch.exp(-mass)
            kept = 1.0 - strength * (1.0 - gates[..., 1:])
            added = strength * gates[..., :1]
            slot_keys = kept * slot_keys + added * read_keys
            slot_values = kept * slot_values + added * read_values
        return state.replace(keys=slot_keys, values=slot_values)

    def _read(self, q: torch.Tensor, state: MemoryState) -> torch.Tensor:
        heads = self.config.heads
        queries = F.normalize(rearrange(self.to_queries(q), "b m (h e) -> b h m e", h=heads), dim=-1)
        read_temperature = rearrange(self.log_temperature[1].exp(), "h -> h 1 1")
        logits = read_temperature * torch.matmul(queries, F.normalize(state["keys"], dim=-1).mT)  # b h m s
        retrieved = torch.matmul(logits.softmax(dim=-1), state["values"])
        return self.to_out(rearrange(retrieved, "b h m e -> b m (h e)"))

    def recall_target(self, x: torch.Tensor) -> torch.Tensor:
        """What a perfect read at written inputs `x` (b n d) returns when queries are projected like
        keys: the output projection of their values. Tests and diagnostics compare reads against it."""
        return self.to_out(self.to_values(x))
