"""Episodic memory: a fixed number of written tokens, kept as keys and values and read by softmax attention.

Each written token t gets a write strength β_t = sigmoid(·) of its input, a unit-norm key (per head) and a
value. The memory holds at most `slots` tokens: a write keeps the `slots` strongest of the tokens it held
and the tokens written (on equal strength, the later one). Reading: per head, each query attends over
the kept tokens with logits

    τ · q̂·k̂_s + log β_s + λ · min(0, o_s − ō) / 64

and over one empty slot (logit `null`, value 0). o_s is when token s was written, counted in tokens, and ō
the mean of o_s under the read's weights without the recency term: when what the query matches was
written. λ (per head, learned from 0) lowers a slot by how much earlier than that it was written, so the
latest of several matching tokens wins, while a lone match keeps its weight however old it is. A query
that matches nothing reads close to nothing; the heads' reads are merged and projected to d.
`in_write_order` gives the slots in the order they were written, so an injector can go on from a matched
token to the ones written after it. Unlike a matrix memory, a read returns a stored value nearly exactly
when one key matches, however many others are held: with `value_offset` 1 it returns the token that
followed the matching one, which lets a graft copy names, numbers and places it never saw in training.

Legend: b rows, n written tokens, m query tokens, d model width, h heads, e dim_head, s slots.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import nn

from graftkit.errors import GraftkitError
from graftkit.memory import KEY_SPAN_HELP, VALUE_OFFSET_HELP, KeyMix, Memory, MemoryConfig, look_ahead, without_last_written
from graftkit.state import MemoryState

# At init: β = σ(0) = 0.5 for every token, read temperature τ = 8 on cosine logits, empty-slot logit 0.
BETA_BIAS, TEMPERATURE, NULL_LOGIT = 0.0, 8.0, 0.0
RECENCY_SCALE = 64.0  # tokens per unit of the recency term


class EpisodicMemory(Memory):
    """Keeps the `slots` most strongly written tokens as (key, value) pairs; reads by attention over them."""

    name = "episodic"

    class Config(MemoryConfig):
        slots: int = Field(512, ge=1, le=65536, description="Most tokens the memory holds (per row); a write keeps the strongest.")
        heads: int = Field(4, ge=1, le=64, description="Number of heads, each with its own keys and values of width dim_head.")
        dim_head: int = Field(64, ge=2, le=1024, description="Width of keys, values and queries of one head.")
        key_span: int = Field(1, ge=1, le=16, description=KEY_SPAN_HELP)
        value_offset: int = Field(0, ge=0, le=16, description=VALUE_OFFSET_HELP)
        values: Literal["projected", "input"] = Field(
            "projected",
            description="What a slot's value is: `projected`, a learned projection of the written input per head; "
            "`input`, the written input itself (d wide, shared by the heads), so a read is a weighted mix of written "
            "inputs, exactly the written one when one key matches (with write_layer 0 and standardize off: a token's "
            "embedding, from which an injector can tell the token itself).",
        )

    def __init__(self, config: EpisodicMemory.Config):
        super().__init__(config)
        inner = config.heads * config.dim_head
        self.to_keys = nn.Linear(self.dim, inner, bias=False)
        projected = config.values == "projected"
        self.to_values = nn.Linear(self.dim, inner, bias=False) if projected else None
        self.to_queries = nn.Linear(self.dim, inner, bias=False)
        self.to_beta = nn.Linear(self.dim, 1)
        self.to_out = nn.Linear(inner, self.dim, bias=False) if projected else None
        self.log_temperature = nn.Parameter(torch.full((config.heads,), math.log(TEMPERATURE)))
        self.null = nn.Parameter(torch.full((config.heads,), NULL_LOGIT))
        self.recency = nn.Parameter(torch.zeros(config.heads))
        self.key_mix = KeyMix(config.key_span, self.dim) if config.key_span > 1 else None
        with torch.no_grad():
            self.to_queries.weight.copy_(self.to_keys.weight)  # a query equal to a written input finds it
            self.to_beta.weight.mul_(0.1)
            self.to_beta.bias.fill_(BETA_BIAS)

    def _init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """`keys`, `values` (b s h e), `strength` (b s; 0 = an empty slot), `order` (b s: when each was written,
        counted in tokens) and, with key_span > 1, `key_tail` (b key_span−1 d)."""
        cfg = self.config
        shape = (batch_size, cfg.slots, cfg.heads, cfg.dim_head)
        value_shape = shape if self.to_values is not None else (batch_size, cfg.slots, 1, self.dim)
        state = {
            "keys": torch.zeros(shape, device=device, dtype=dtype),
            "values": torch.zeros(value_shape, device=device, dtype=dtype),
            "strength": torch.zeros(batch_size, cfg.slots, device=device, dtype=dtype),
            "order": torch.full((batch_size, cfg.slots), -1.0, device=device, dtype=dtype),
        }
        if self.key_mix is not None:
            state["key_tail"] = self.key_mix.empty_tail(batch_size, device, dtype)
        return state

    def write_strengths(self, x: torch.Tensor) -> torch.Tensor:
        """β (b n 1): how strongly each token is written (one strength shared by the heads)."""
        return torch.sigmoid(self.to_beta(x))

    def _write(self, x: torch.Tensor, state: MemoryState, mask: torch.Tensor | None) -> MemoryState:
        cfg = self.config
        b, n, _ = x.shape
        key_x, carried = x, {}
        if self.key_mix is not None:
            key_x, carried["key_tail"] = self.key_mix(x, state["key_tail"], mask)
        value_x = look_ahead(x, mask, cfg.value_offset) if cfg.value_offset else x
        keys = F.normalize(rearrange(self.to_keys(key_x), "b n (h e) -> b n h e", h=cfg.heads), dim=-1)
        if self.to_values is None:
            values = value_x[:, :, None]  # b n 1 d: the input itself
        else:
            values = rearrange(self.to_values(value_x), "b n (h e) -> b n h e", h=cfg.heads)
        keep = torch.ones(b, n, dtype=x.dtype, device=x.device) if mask is None else mask.to(x.dtype)
        if cfg.value_offset:
            keep = without_last_written(keep, cfg.value_offset)
        strength = self.write_strengths(x)[..., 0] * keep
        order = state["order"].amax(1, keepdim=True) + 1 + torch.arange(n, device=x.device, dtype=x.dtype)[None]
        keys, values = (torch.cat([state[k], new], dim=1) for k, new in (("keys", keys), ("values", values)))
        strength, order = torch.cat([state["strength"], strength], 1), torch.cat([state["order"], order], 1)
        # the `slots` strongest; among equal strengths the later; never an unwritten one over a written one
        rank = strength.detach().float() + 1e-3 * torch.sigmoid(order.float() / 1024)
        rank = rank.masked_fill(strength.detach() <= 0, -1.0)
        top = rank.topk(cfg.slots, dim=1).indices
        kept = {name: _gather(t, top) for name, t in (("keys", keys), ("values", values), ("strength", strength), ("order", order))}
        held = kept["strength"] > 0  # an empty slot holds nothing, whatever unwritten token filled it
        kept["keys"], kept["values"] = (kept[k] * held[..., None, None].to(x.dtype) for k in ("keys", "values"))
        kept["order"] = kept["order"].masked_fill(~held, -1.0)
        return state.replace(**kept, **carried)

    def attend(self, q: torch.Tensor, state: MemoryState) -> torch.Tensor:
        """How much each query (b m d) reads of each slot: (b h m s), per head; the rest goes to the empty slot."""
        cfg = self.config
        self._check(q, state, "read")
        queries = F.normalize(rearrange(self.to_queries(q), "b m (h e) -> b h m e", h=cfg.heads), dim=-1)
        keys = rearrange(state["keys"], "b s h e -> b h s e")
        scale = rearrange(self.log_temperature.exp(), "h -> 1 h 1 1")
        # the softmax in float32 at least: a sharp one over hundreds of slots is coarse in half precision
        logits = torch.matmul(queries, keys.mT).float() * scale
        logits = logits + rearrange(state["strength"].float().clamp(min=1e-9).log(), "b s -> b 1 1 s")
        order = rearrange(state["order"].float(), "b s -> b 1 1 s")
        matched = (logits.detach().softmax(-1) * order).sum(-1, keepdim=True)  # when what the query matches was written
        age = ((order - matched) / RECENCY_SCALE).clamp(max=0.0)  # how much earlier than that each slot was written
        logits = logits + rearrange(self.recency, "h -> 1 h 1 1").float() * age
        null = rearrange(self.null, "h -> 1 h 1 1").float().expand(*logits.shape[:3], 1)
        return torch.cat([logits, null], dim=-1).softmax(-1)[..., :-1].to(q.dtype)

    def _read(self, q: torch.Tensor, state: MemoryState) -> torch.Tensor:
        weights = self.attend(q, state)  # b h m s
        if self.to_out is None:  # one value per slot, shared by the heads: the heads' reads are averaged
            return torch.matmul(weights.mean(1), state["values"][:, :, 0])  # b m d
        read = torch.matmul(weights, rearrange(state["values"], "b s h e -> b h s e"))  # b h m e
        return self.to_out(rearrange(read, "b h m e -> b m (h e)"))

    def in_write_order(self, state: MemoryState) -> tuple[torch.Tensor, torch.Tensor]:
        """(order b s: the slot at each place in write order, empty slots first; values b s d in that order).
        With `values: input` and `value_offset` 1, the value of the slot after a token's is the next token of
        what was written. Needs `values: input`."""
        if self.to_values is not None:
            raise GraftkitError("memory.in_write_order: needs an episodic memory with values: input")
        order = state["order"].argsort(dim=1)
        return order, _gather(state["values"][:, :, 0], order)

    def recall_target(self, x: torch.Tensor) -> torch.Tensor:
        """What a perfect read at written inputs `x` (b n d) returns when queries are projected like
        keys: the output projection of their values. Tests and diagnostics compare reads against it."""
        return x if self.to_values is None else self.to_out(self.to_values(x))


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of `t` (b s ...) at slot `index` (b k)."""
    return t.gather(1, index.view(*index.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))
