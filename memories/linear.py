"""Linear fast-weight memory written with the gated delta rule (DeltaNet, Schlag et al. 2021;
Yang et al. 2024; gated form: Yang, Kautz & Hatamizadeh 2025).

Per head a matrix W (e × e) maps unit-norm keys to values. Writing token t:

    W ← a_t W + β_t (v_t − a_t W k_t) k_tᵀ

with a per-token write strength β_t = sigmoid(·) of the token (and, with `gate_span` > 1, of the tokens
after it in the same write; at inference, set to 0 where it is below `write_floor`) and, when `decay`
is on, a retention a_t = 1 − sigmoid(·) (else a_t = 1). This is the rule
W ← (1 − decay)·W + β (v − W k) kᵀ except that the error is measured against the already decayed
memory, so β_t = 1 stores v_t at k_t exactly whatever the decay (and the chunkwise form below is the
published one). Reading: W q per head for unit-norm q.

The recurrence is sequential by nature; it is computed chunkwise (the WY / UT-transform form of
DeltaNet). With γ_i the retention accumulated inside a chunk and W_0 the memory at its start,

    W_C = γ_C W_0 + Σ_j (γ_C / γ_j) u_j k_jᵀ,   u = (I + A)⁻¹ diag(β) (V − diag(γ) K W_0ᵀ),
    A[i, j] = β_i (γ_i / γ_j) k_i·k_j  for j < i (0 elsewhere).

(I + A)⁻¹ is a unit lower-triangular solve done for all chunks at once; only two small matmuls per
chunk remain in the Python loop over chunks. The result equals the token-by-token rule (up to
rounding), so writing in two calls gives the same state wherever the split falls (with `value_span`
1: values look ahead only within a call).
Masked positions get β = 0 and a = 1: they leave the memory exactly as it was.

Legend: b rows, n written tokens, m query tokens, d model width, h heads, e dim_head, o / i rows
(value side) / columns (key side) of W, B rows×heads, k chunks, c tokens inside a chunk (i, j in
the formulas).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from pydantic import Field
from torch import nn

from graftkit.memory import (
    KEY_SPAN_HELP,
    VALUE_OFFSET_HELP,
    VALUE_SPAN_HELP,
    KeyMix,
    Memory,
    MemoryConfig,
    ValueMix,
    look_ahead,
    without_last_written,
)
from graftkit.state import MemoryState

# Biases at init: β = σ(0) = 0.5; decay σ(−6) ≈ 0.0025 per token (about 8% of a memory survives 1k
# tokens of pure decay; the delta rule already overwrites what a new key collides with).
BETA_BIAS, DECAY_BIAS = 0.0, -6.0


class LinearMemory(Memory):
    """Multi-head matrix memory written by the (gated) delta rule, computed chunkwise."""

    name = "linear"

    class Config(MemoryConfig):
        heads: int = Field(4, ge=1, le=64, description="Number of heads, each with its own dim_head × dim_head matrix.")
        dim_head: int = Field(64, ge=2, le=1024, description="Width of keys, values and queries of one head.")
        chunk_size: int = Field(
            64,
            ge=1,
            le=1024,
            description="Tokens per chunk of the chunkwise delta rule (a speed setting: the result does not depend on it).",
        )
        decay: bool = Field(True, description="Learn a per-token forgetting gate (gated delta rule); False keeps everything until overwritten.")
        key_span: int = Field(6, ge=1, le=16, description=KEY_SPAN_HELP)
        value_span: int = Field(1, ge=1, le=16, description=VALUE_SPAN_HELP)
        value_offset: int = Field(0, ge=0, le=16, description=VALUE_OFFSET_HELP)
        gate_span: int = Field(
            4,
            ge=1,
            le=16,
            description="Tokens a write strength is computed from: the token and the next gate_span − 1 of the same "
            "write call (padding and masked tokens included as they are), so whether a name is written can depend on "
            "the words after it. 1 = the token alone. The look-ahead weights start at 0, so the gate starts out as "
            "with 1 (train.init_from can start it from a graft trained with 1), and a seed starts every other weight "
            "as it does with 1.",
        )
        write_floor: float = Field(
            0.3,
            ge=0.0,
            lt=1.0,
            description="At inference (eval mode: graftkit eval, exports, chat), write strengths below this count "
            "as 0, so a long context's many faint background writes are dropped; training writes every strength "
            "(0 = off).",
        )

        former_defaults = {"key_span": 1, "gate_span": 1, "write_floor": 0.0}

    def __init__(self, config: LinearMemory.Config):
        super().__init__(config)
        inner = config.heads * config.dim_head
        self.to_keys = nn.Linear(self.dim, inner, bias=False)
        self.to_values = nn.Linear(self.dim, inner, bias=False)
        self.to_queries = nn.Linear(self.dim, inner, bias=False)
        self.to_beta = nn.Linear(self.dim, config.heads)
        self.beta_ahead = None
        if config.gate_span > 1:  # built without drawing from the RNG (it starts at 0), so a seed gives every
            # other weight, here and in the rest of the graft, the same start as with gate_span 1
            self.beta_ahead = nn.utils.skip_init(nn.Linear, self.dim, config.heads * (config.gate_span - 1), bias=False)
        self.to_decay = nn.Linear(self.dim, config.heads) if config.decay else None
        self.to_out = nn.Linear(inner, self.dim, bias=False)
        self.key_mix = KeyMix(config.key_span, self.dim) if config.key_span > 1 else None
        self.value_mix = ValueMix(config.value_span, self.dim) if config.value_span > 1 else None
        with torch.no_grad():
            for gate, bias in ((self.to_beta, BETA_BIAS), (self.to_decay, DECAY_BIAS)):
                if gate is not None:
                    gate.weight.mul_(0.1)
                    gate.bias.fill_(bias)
            if self.beta_ahead is not None:
                self.beta_ahead.weight.zero_()

    def _init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """`w` (b h o i): an empty matrix per row and head; `key_tail` (b key_span−1 d) with key_span > 1."""
        cfg = self.config
        state = {"w": torch.zeros(batch_size, cfg.heads, cfg.dim_head, cfg.dim_head, device=device, dtype=dtype)}
        if self.key_mix is not None:
            state["key_tail"] = self.key_mix.empty_tail(batch_size, device, dtype)
        return state

    def _write(self, x: torch.Tensor, state: MemoryState, mask: torch.Tensor | None) -> MemoryState:
        cfg = self.config
        size, heads = cfg.chunk_size, cfg.heads
        chunks = max(1, math.ceil(x.shape[1] / size))
        pad = chunks * size - x.shape[1]
        key_x, carried = x, {}
        if self.key_mix is not None:
            key_x, carried["key_tail"] = self.key_mix(x, state["key_tail"], mask)
        value_x = x if self.value_mix is None else self.value_mix(x, mask)
        if cfg.value_offset:
            value_x = look_ahead(value_x, mask, cfg.value_offset)
        x, key_x, value_x = (F.pad(t, (0, 0, 0, pad)) for t in (x, key_x, value_x))

        keys = F.normalize(rearrange(self.to_keys(key_x), "b n (h e) -> b n h e", h=heads), dim=-1)
        keys = rearrange(keys, "b (k c) h e -> k (b h) c e", c=size).contiguous()
        values = rearrange(self.to_values(value_x), "b (k c) (h e) -> k (b h) c e", c=size, h=heads).contiguous()
        keep = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
        keep[:, keep.shape[1] - pad :] = 0.0
        if mask is not None:
            keep[:, : mask.shape[1]] = mask.to(x.dtype)
        if cfg.value_offset:
            keep = without_last_written(keep, cfg.value_offset)
        keep = rearrange(keep, "b (k c) -> k b c", c=size)
        beta = rearrange(self.write_strengths(x), "b (k c) h -> k (b h) c", c=size) * repeat(keep, "k b c -> k (b h) c", h=heads)
        if self.to_decay is None:
            log_kept = torch.zeros_like(beta)
        else:
            log_kept = F.logsigmoid(-rearrange(self.to_decay(x), "b (k c) h -> k (b h) c", c=size))
            log_kept = log_kept * repeat(keep, "k b c -> k (b h) c", h=heads)
        cum = log_kept.cumsum(-1)  # log γ_i inside each chunk

        # A[i, j] = β_i (γ_i / γ_j) k_i·k_j for j < i; exponents masked before exp (they are ≤ 0 below the diagonal)
        strict = torch.ones(size, size, dtype=torch.bool, device=x.device).tril(-1)
        ratio = torch.where(strict, rearrange(cum, "k B c -> k B c 1") - rearrange(cum, "k B c -> k B 1 c"), -math.inf).exp()
        a = ratio * torch.matmul(keys, keys.mT) * rearrange(beta, "k B c -> k B c 1")
        # the triangular solve runs in float32 at least (CPU has no half-precision kernel for it)
        exact = torch.promote_types(x.dtype, torch.float32)
        eye = torch.eye(size, dtype=exact, device=x.device)
        solve = torch.linalg.solve_triangular(a.to(exact) + eye, eye.expand_as(a), upper=False, unitriangular=True)
        solve = solve.to(x.dtype)
        new_values = torch.matmul(solve, values * rearrange(beta, "k B c -> k B c 1"))  # T β V
        new_keys = torch.matmul(solve, keys * rearrange(beta * cum.exp(), "k B c -> k B c 1"))  # T β γ K
        to_end = (cum[..., -1:] - cum).exp()  # γ_C / γ_j
        end_keys = keys * rearrange(to_end, "k B c -> k B c 1")
        last = rearrange(cum[..., -1].exp(), "k B -> k B 1 1")

        w = rearrange(state["w"], "b h o i -> (b h) o i")
        # unbind, not indexing: the backward of t-th-chunk indexing would zero-fill a whole tensor per chunk
        for chunk_values, chunk_keys, chunk_end_keys, chunk_last in zip(*(t.unbind(0) for t in (new_values, new_keys, end_keys, last))):
            u = chunk_values - torch.matmul(chunk_keys, w.mT)  # B c o
            w = torch.addcmul(torch.matmul(u.mT, chunk_end_keys), chunk_last, w)
        return state.replace(w=rearrange(w, "(b h) o i -> b h o i", h=heads), **carried)

    def write_strengths(self, x: torch.Tensor) -> torch.Tensor:
        """β (b n h): the per-token write strengths `_write` uses (before masking).

        In eval mode, strengths below `write_floor` are 0. Training writes every strength: trained with
        the floor in place, the gate learns to write book text more strongly and the floor thins long
        contexts far less."""
        logits = self.to_beta(x)
        if self.beta_ahead is not None:  # token t + j adds its own term, shifted back by j
            ahead = rearrange(self.beta_ahead(x), "b n (j h) -> b n j h", h=self.config.heads)
            for j in range(1, self.config.gate_span):
                logits = logits + F.pad(ahead[:, j:, j - 1], (0, 0, 0, j))
        beta = torch.sigmoid(logits)
        if self.training or self.config.write_floor == 0:
            return beta
        return beta * (beta >= self.config.write_floor)

    def _read(self, q: torch.Tensor, state: MemoryState) -> torch.Tensor:
        heads = self.config.heads
        queries = F.normalize(rearrange(self.to_queries(q), "b m (h e) -> b h m e", h=heads), dim=-1)
        retrieved = torch.matmul(queries, state["w"].mT)  # b h m o
        return self.to_out(rearrange(retrieved, "b h m e -> b m (h e)"))

    def recall_target(self, x: torch.Tensor) -> torch.Tensor:
        """What a perfect read at written inputs `x` (b n d) returns when queries are projected like
        keys: the output projection of their values. Tests and diagnostics compare reads against it."""
        return self.to_out(self.to_values(x))
