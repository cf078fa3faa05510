"""Copy from memory: a position's next-token logits are raised for the token its memory read holds.

A forward hook on decoder layer `layer` queries the memory twice at every position: with a projection
of its RMS-normed hidden state (what the question asks; with `window`, plus a learned mix of the input
embeddings of the last few tokens), and with a projection of its input embedding (starting as the
embedding itself: where the current token was written, so what followed it there). Each query gives a
distribution over the memory's slots per memory head, merged by `merge_heads` (the heads' mean, or their
normalised product: the slots every head matches, e.g. one head the name and another the attribute asked
for; `both` gives the pool the question's read both ways); `ReadPool` mixes, at each position, the distributions of the
positions up to it. A position then either takes that mix or goes on copying: with a learned
probability g (from its hidden state) its distribution is the previous position's moved one slot on in
write order, the token written after the one just copied, so a value is copied whole from one match,
repeated tokens included. What the mix leaves to the empty slot reads a learned `abstain` vector (what
to say when nothing was told). A hook on the LM head then adds to each position's logits

    gate · boost · s,    s_y = (r · G⁻¹ e_y) / (e_y · G⁻¹ e_y),    G = Eᵀ E,

where r is the mixed read and E the backbone's input embeddings (rows e_y). For a read that is the
embedding of token x, s_x = 1 and s_y is close to 0 for every other token (r's least-squares code over
the vocabulary): the raise names the very token the memory holds, names and numbers never seen in
training included. A read that mixes several stored tokens raises each by its share. The gate is a
sigmoid of the position's final hidden state, of how much of the position's slot distribution found
written slots and of g, starting at sigmoid(`gate_init`). A learned end-of-turn raise (from the final
state and the read) goes through the same gate: with the gate closed, the logits are the backbone's.

It needs a memory whose reads are input embeddings: `episodic` with `values: input`, `write_layer: 0`
and `standardize: false` (with `value_offset: 1`, the embedding of the token after the matched one). A
row with an empty memory reads nothing and keeps the backbone's logits.

Legend: b batch, n positions, k positions whose logits are computed, d hidden size, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from graftkit.injectors.xattn import Recall
from pydantic import Field
from torch import nn

from graftkit.errors import GraftkitError
from graftkit.injector import InjectorConfig, PerPositionReads, check_layer, hook_output, state_dtype

FOLLOW_INIT = -2.0  # at first a position goes on copying the previous one's next token with probability σ(−2) ≈ 0.12


class CopyInjector(PerPositionReads):
    """Raises the next-token logits of the tokens the memory recalls for the question.

    Needs a memory whose reads are input embeddings: `episodic` with `values: input`, `write_layer: 0` and
    `standardize: false`."""

    name = "copy"

    class Config(InjectorConfig):
        layer: int = Field(
            7,
            description="Decoder layer (0-based; negative counts from the end) whose output each position queries the memory with.",
        )
        boost: float = Field(50.0, gt=0.0, le=1000.0, description="Largest raise, in logits, of a token the read holds entirely (gate 1).")
        window: int = Field(
            8,
            ge=0,
            le=64,
            description="The question query adds a learned mix of the input embeddings of the last `window` tokens "
            "(their mean at first): the words a fact was told with, names never seen in training included, find the "
            "tokens they were written next to. 0 = off.",
        )
        merge_heads: Literal["mean", "product", "both"] = Field(
            "mean",
            description="How the memory heads' slot distributions combine: `mean`, a slot any head matches is read (an "
            "or); `product`, their normalised product (empty slot included), a slot every head matches (an and: one "
            "head can match the name, another the attribute); `both`, the question's read enters the pool both ways "
            "(and the current token's as the mean), and the pool learns which to take.",
        )
        gate_init: float = Field(
            0.0,
            ge=-20.0,
            le=20.0,
            description="Bias of the sigmoid gate at initialisation: 0 starts it half open, where it learns fastest "
            "(a row with an empty memory is never changed).",
        )

    config: Config

    def __init__(self, config: Config, hidden_size: int, num_layers: int):
        super().__init__(config, hidden_size, num_layers)
        self.layer = check_layer(config.layer, num_layers, "injector.layer")
        self.to_query = nn.Linear(hidden_size, hidden_size, bias=False)
        # a second query per position: its own input embedding, so a memory whose keys start as the written
        # token finds where the current token was written, and reads what followed it (the rest of a value)
        self.to_token_query = nn.Linear(hidden_size, hidden_size, bias=False)
        nn.init.eye_(self.to_token_query.weight)
        if config.window:
            self.window = nn.Parameter(torch.full((config.window, hidden_size), 1.0 / config.window))  # row j: j tokens back
            self.to_window_query = nn.Linear(hidden_size, hidden_size, bias=False)
            nn.init.eye_(self.to_window_query.weight)
        self.pool = ReadPool(hidden_size, kinds=3 if config.merge_heads == "both" else 2)
        self.follow = nn.Linear(hidden_size, 1)  # g: whether a position goes on copying from the previous one
        self.carried: torch.Tensor | None = None  # the previous position's slot distribution, in write order (b s)
        self.abstain = nn.Parameter(torch.zeros(hidden_size))  # the read where the question matches nothing
        self.tokens: torch.Tensor | None = None  # input embeddings (b n d) of the positions this block has seen
        self.gate = nn.Linear(hidden_size, 1)
        self.gate_by_match = nn.Linear(2, 1, bias=False)  # the gate also sees the matched share and g
        self.stop = nn.Linear(2 * hidden_size, 1)  # the end-of-turn raise: from the final state and the read
        with torch.no_grad():
            self.gate.weight.zero_()
            self.gate.bias.fill_(config.gate_init)
            self.gate_by_match.weight.zero_()
            self.stop.weight.zero_()
            self.stop.bias.zero_()
            self.follow.weight.zero_()
            self.follow.bias.fill_(FOLLOW_INIT)
        self.eos: int | None = None
        self.pooled: torch.Tensor | None = None
        self.matched: torch.Tensor | None = None  # b n 2: the share of each position's distribution on slots, and g
        # derived from the backbone when attached (not graft tensors): G⁻¹ (d d) and the leverages e_y·G⁻¹e_y (V)
        self.register_buffer("code", torch.zeros(0), persistent=False)
        self.register_buffer("leverage", torch.zeros(0), persistent=False)
        self._backbone_parts: dict[str, nn.Module] = {}  # a plain dict: the backbone's modules are not graft tensors

    @property
    def _embedding(self) -> nn.Embedding:
        return self._backbone_parts["embedding"]

    def _attach(self, backbone) -> None:
        self._backbone_parts["embedding"] = backbone.embedding
        self.eos = backbone.tokenizer.eos_token_id
        with torch.no_grad():
            e = self._embedding.weight.detach().double()
            inverse = torch.linalg.inv(e.T @ e)
            self.code = inverse.float().to(self._embedding.weight.device)
            leverage = ((e @ inverse) * e).sum(-1).float()
            self.leverage = leverage.clamp(min=1e-6).to(self._embedding.weight.device)  # a zero row (padding) scores 0
        self.hook(backbone.embedding, self._on_embedding)
        self.hook(backbone.layers[self.layer], self._on_layer)
        self.hook(backbone.model.get_output_embeddings(), self._on_logits)

    def prepare(self, memory, state) -> Recall:
        if not hasattr(memory, "in_write_order") or getattr(memory.config, "values", None) != "input":
            raise GraftkitError(
                f"injector.kind copy: needs memory.kind episodic with values: input, not a {memory.name} memory"
                + (" with values: projected" if memory.name == "episodic" else "")
            )
        self.pool.reset()
        self.tokens = None
        self.carried = None
        keep = (~state.is_empty).float().to(self.code.device)
        order, values = memory.in_write_order(state)
        return Recall(
            tokens=torch.zeros(state.batch_size, 0, self.hidden_size, device=keep.device),
            keep=keep,
            memory=memory,
            state=state,
            kv={"order": order, "values": values.float()},
        )

    def prepare_inputs(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.pool.mask = attention_mask.bool()
        return embeds, attention_mask

    def _on_embedding(self, module, args, output):
        """Keep the input embeddings: a single new one (a generation step) extends what was seen."""
        if self.context is not None:
            grows = self.tokens is not None and output.shape[1] == 1 and output.shape[0] == self.tokens.shape[0]
            self.tokens = torch.cat([self.tokens, output], 1) if grows else output
        return None

    def _on_layer(self, module, args, output):
        recall = self.context
        if recall is None:
            return None
        hidden = hook_output(output)[0].float()
        n = hidden.shape[1]
        dtype = state_dtype(recall.state)
        query = self.to_query(F.rms_norm(hidden, hidden.shape[-1:], eps=1e-6))
        if self.config.window:
            mixed = self.window_mix(self.tokens)[:, -n:]
            query = query + self.to_window_query(F.rms_norm(mixed, mixed.shape[-1:], eps=1e-6))
        token_query = self.to_token_query(self.tokens[:, -n:].float())
        order = recall.kv["order"]  # b s: the slot at each place in write order
        question, token = (recall.memory.attend(q.to(dtype), recall.state).float() for q in (query, token_query))  # b h n s
        merges = ("mean", "product") if self.config.merge_heads == "both" else (self.config.merge_heads,)
        reads = [merge_heads(question, how) for how in merges] + [merge_heads(token, merges[0])]
        dists = [d.gather(-1, order[:, None].expand(-1, n, -1)) for d in reads]  # b n s each, in write order
        mixed = self.pool(hidden, torch.stack(dists, dim=2)) * self.seen(self.tokens)[:, -n:, None]  # b n s; padding takes nothing
        follow = torch.sigmoid(self.follow(F.rms_norm(hidden, hidden.shape[-1:], eps=1e-6)))  # b n 1
        taken = self.carry(mixed, follow)
        unmatched = (1.0 - mixed.sum(-1, keepdim=True)).clamp(min=0.0) * (1.0 - follow)
        self.pooled = torch.matmul(taken, recall.kv["values"]) + unmatched * recall.keep[:, None, None] * self.abstain
        self.matched = torch.cat([taken.sum(-1, keepdim=True), follow], -1)
        self.reads = self.pooled
        return None

    def carry(self, mixed: torch.Tensor, follow: torch.Tensor) -> torch.Tensor:
        """Slot distributions (b n s, write order) taken at each position: (1 − g) · the pooled one + g · the
        previous position's moved one slot on. A call with several positions starts over; one position (a
        cached generation step) goes on from the last."""
        previous = self.carried if mixed.shape[1] == 1 and self.carried is not None else torch.zeros_like(mixed[:, 0])
        taken = []
        for t in range(mixed.shape[1]):
            moved = F.pad(previous, (1, 0))[:, :-1]  # the mass of each slot on the slot written after it
            previous = (1.0 - follow[:, t]) * mixed[:, t] + follow[:, t] * moved
            taken.append(previous)
        self.carried = previous
        return torch.stack(taken, dim=1)

    def seen(self, tokens: torch.Tensor) -> torch.Tensor:
        """(b n) float: 1 at the positions of `tokens` that are input, 0 at padding (per the prepared mask; positions
        after it are generated tokens)."""
        seen = torch.ones(tokens.shape[:2], device=tokens.device)
        if self.pool.mask is not None:
            width = min(self.pool.mask.shape[1], tokens.shape[1])
            seen[:, :width] = self.pool.mask[:, :width].to(tokens.device).float()
        return seen

    def window_mix(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each position's learned mix (b n d) of the input embeddings of the last `window` positions up to it
        (padding, per the prepared mask, counts as zeros)."""
        x = tokens.float() * self.seen(tokens)[..., None]
        span = self.window.shape[0]
        windows = F.pad(x, (0, 0, span - 1, 0)).unfold(1, span, 1)  # b n d span (oldest first)
        return torch.einsum("bnds,sd->bnd", windows, self.window.flip(0))

    def scores(self, reads: torch.Tensor) -> torch.Tensor:
        """s (… V): how much of each vocabulary token the reads (… d, input-embedding space) hold."""
        return torch.matmul(reads @ self.code, self._embedding.weight.float().T) / self.leverage

    def _on_logits(self, module, args, output):
        recall = self.context
        if recall is None or self.pooled is None:
            return None
        final = args[0].float()  # b k d: the normed final hidden states the LM head reads
        k = output.shape[1]
        keep = rearrange(recall.keep, "b -> b 1 1")
        pooled = self.pooled[:, -k:]
        gate = torch.sigmoid(self.gate(final) + self.gate_by_match(self.matched[:, -k:])) * keep
        raised = output.float() + gate * self.config.boost * self.scores(pooled)
        if self.eos is not None:  # whether the answer ends here, learned from the position and what it recalled
            unit = F.rms_norm(pooled, pooled.shape[-1:], eps=1e-6)
            stop = self.stop(torch.cat([F.rms_norm(final, final.shape[-1:], eps=1e-6), unit], dim=-1))
            raised[..., self.eos] += (gate * stop)[..., 0]
        return raised.to(output.dtype)


def merge_heads(weights: torch.Tensor, how: str) -> torch.Tensor:
    """One slot distribution (b n s) from the heads' (b h n s; the rest of each to the empty slot): their mean, or
    their normalised product (`product`)."""
    if how == "mean":
        return weights.mean(1)
    empty = (1.0 - weights.sum(-1, keepdim=True)).clamp(min=0.0)
    log_weights = torch.cat([weights, empty], -1).clamp(min=1e-30).log().sum(1)
    return log_weights.softmax(-1)[..., :-1]


class ReadPool(nn.Module):
    """Causal attention (one head) of each position over what the positions up to it read.

    A position brings several reads (b n c r: c kinds of query, each a vector of width r, e.g. a distribution
    over memory slots); the key of a read is a projection of the RMS-normed hidden state of its position plus a
    learned vector per kind (zero at initialisation). Padding (the `mask` the injector saw in `prepare_inputs`)
    is never attended to. Within one reading block it keeps the keys and reads of the positions it has seen, so
    a cached generation step (one new position) attends to the whole question; a call with several positions (a
    prefill, or an uncached step that recomputes everything) starts over.
    """

    def __init__(self, dim: int, kinds: int = 1, width: int = 64):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.to_q = nn.Linear(dim, width, bias=False)
        self.to_k = nn.Linear(dim, width, bias=False)
        self.kind = nn.Parameter(torch.zeros(kinds, width))
        self.reset()

    def reset(self) -> None:
        self.mask: torch.Tensor | None = None
        self.past: tuple[torch.Tensor, torch.Tensor] | None = None  # keys (b n c w), reads (b n c r) seen so far

    def forward(self, hidden: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
        """Pooled reads (b n r) for the call's positions (`hidden` b n d, `reads` b n c r)."""
        x = self.norm(hidden.float())
        q = self.to_q(x)
        k = self.to_k(x)[:, :, None] + self.kind  # b n c w
        b, n, c = reads.shape[:3]
        if n == 1 and self.past is not None:  # one cached step: attend to everything seen so far
            k, reads = torch.cat([self.past[0], k], 1), torch.cat([self.past[1], reads], 1)
        self.past = (k, reads)
        total = k.shape[1]
        seen = torch.ones(b, total, dtype=torch.bool, device=hidden.device)
        if self.mask is not None:  # positions beyond the prepared inputs are generated tokens
            width = min(self.mask.shape[1], total)
            seen[:, :width] = self.mask[:, :width].to(hidden.device)
        causal = torch.ones(n, total, dtype=torch.bool, device=hidden.device).tril(total - n)
        allowed = causal[None] & seen[:, None, :]
        allowed[:, :, -n:] |= torch.eye(n, dtype=torch.bool, device=hidden.device)  # padding attends to itself
        allowed = allowed[..., None].expand(-1, -1, -1, c).flatten(2)  # b n (total c)
        logits = torch.matmul(q, k.flatten(1, 2).mT) / math.sqrt(q.shape[-1])
        weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
        return torch.matmul(weights, reads.flatten(1, 2).float())
