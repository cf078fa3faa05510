"""Titans neural long-term memory (Behrouz, Zhong & Mirrokni, "Titans: Learning to Memorize at Test
Time", 2025): per head, a small MLP M whose weights are learned *at test time* by gradient descent with
momentum and weight decay on the associative loss ½‖M(k) − v‖², keys and values projected from the
input and normalised to unit length per head (queries too). The initial weights of M are parameters.

Chunked update (the paper's parallel form, §3.2, aggregated per chunk as titans-pytorch does). The
written tokens are cut into chunks of `chunk_size`; chunk κ, starting from weights M and momentum S:

    u_κ = −Σ_{t in κ} θ_t ∇ℓ(M; k_t, v_t)           every gradient at the chunk-start weights M
    S_κ = η_κ S_{κ-1} + u_κ                          momentum: the "past surprise"
    M_κ = (1 − α_κ) M_{κ-1} + S_κ                     forgetting gate = weight decay

θ_t = max_lr·sigmoid(·) is per token (a loss weight, so a token can be skipped); η_κ and α_κ are
sigmoids of the chunk's mean gate logit. The per-token gradients inside a chunk are computed in
parallel with `torch.func`: `vmap` over rows·heads of `grad` of the θ-weighted chunk loss, the memory
MLP run through `functional_call` (only their θ-weighted sum is ever formed, never one gradient per
token). Chunks run one after another in a Python loop, each from the state the previous one left; no
loop runs over tokens. (A per-token closed form of the momentum/decay recurrences needs two weighted
gradient sums per chunk and measured about twice the inner cost, so it was not taken.)

Step cap (`step_cap`, on by default, not in the paper): summed over a chunk, the gradients of tokens
with similar keys add up, and a chunk of near-identical keys (hidden states share a large common
direction) overshoots and diverges within a few chunks. The θ of a chunk are scaled down so that
Σ θ_t k_t k_tᵀ has spectral norm ≤ 1 (a Gershgorin bound); near-orthogonal keys keep their full θ.
The cap looks at the keys only, not at the memory MLP's own weights: once a head's weights grow, its
effective step grows with them and the inner loop can still diverge (measured: a trained graft's head
going from |W| ≈ 14 to NaN within 10 chunks of a 1k context). `max_surprise` bounds the norm of each
chunk's update per head, so such a head stays finite; healthy heads are far below the bound.

Unlike titans-pytorch, a sequence shorter than a chunk, and the last partial chunk, are written at
once (nothing is held back), and every chunk's gradients are taken at the weights the previous chunk
left (titans-pytorch takes all chunks of one call at the call's initial weights). Splitting a write
into two calls gives the same state when the split falls on a chunk boundary of the first call (and
`value_span` is 1: values look ahead only within a call).
Masked positions get θ = 0 and do not enter η_κ, α_κ; a chunk with no unmasked token is skipped.

Legend: b rows, n written tokens, m query tokens, d model width, h heads, e dim_head,
B rows×heads (b h flattened), k chunks, c tokens in a chunk, i/o in/out width of a memory-MLP layer,
g gates (θ, η, α).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from pydantic import Field
from torch import nn
from torch.func import functional_call, grad, vmap

from graftkit.memory import KEY_SPAN_HELP, VALUE_SPAN_HELP, KeyMix, Memory, MemoryConfig, ValueMix
from graftkit.state import MemoryState

# Gate biases at init: θ = max_lr·σ(0) = max_lr / 2, η = σ(0) = 0.5, α = σ(−4) ≈ 0.018 per chunk
# (about 75% of the weights survive 1k tokens of pure decay at chunk_size 64).
LR_BIAS, MOMENTUM_BIAS, DECAY_BIAS = 0.0, 0.0, -4.0


class MemoryMLP(nn.Module):
    """The memory network of every head: `depth` bias-free layers with SiLU in between.

    Its parameters (`h i o` each) are the learned *initial* weights of the heads. At test time it is
    only called through `functional_call` with other weights: one head's `i o` (under `vmap`) or a
    batch `B i o` matching a batch of inputs `B c i`.
    """

    def __init__(self, heads: int, dim_head: int, depth: int, expansion: int):
        super().__init__()
        widths = [dim_head] + [dim_head * expansion] * (depth - 1) + [dim_head]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(heads, fan_in, fan_out) * math.sqrt(2.0 / (fan_in + fan_out)))
            for fan_in, fan_out in zip(widths[:-1], widths[1:])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, weight in enumerate(self.weights):
            if index:
                x = F.silu(x)
            x = torch.matmul(x, weight)
        return x


class TitansMemory(Memory):
    """Titans neural memory: multi-head MLP fast weights trained by momentum SGD while writing."""

    name = "titans"

    class Config(MemoryConfig):
        heads: int = Field(4, ge=1, le=64, description="Number of memory heads, each with its own MLP memory.")
        dim_head: int = Field(64, ge=2, le=1024, description="Width of keys, values and queries of one head (the memory MLP's in/out width).")
        depth: int = Field(2, ge=2, le=8, description="Layers of each head's memory MLP (Titans needs at least 2).")
        expansion: int = Field(4, ge=1, le=16, description="Hidden width of the memory MLP as a multiple of dim_head.")
        chunk_size: int = Field(
            64,
            ge=1,
            le=8192,
            description="Tokens whose gradients are taken at the same weights and that share one momentum "
            "and decay gate; chunks are written one after another.",
        )
        max_lr: float = Field(
            1.0,
            gt=0.0,
            le=10.0,
            description="Upper bound of the per-token inner learning rate θ_t = max_lr·sigmoid(·) "
            "for the loss ½‖M(k) − v‖² with unit-norm keys and values (1 ≈ one full write of a lone key).",
        )
        step_cap: bool = Field(
            True,
            description="Scale a chunk's learning rates down so that Σ_t θ_t k_t k_tᵀ has spectral norm at "
            "most 1 (Gershgorin bound): a chunk of near-identical keys cannot overshoot. False = the "
            "paper's plain update.",
        )
        max_surprise: float | None = Field(
            10.0,
            gt=0.0,
            description="Largest norm of one chunk's update u (all memory-MLP layers of a head together); a larger "
            "one is scaled down to it. A safety bound, not a learning-rate setting: a head whose inner loop starts "
            "to diverge (weights growing chunk after chunk) stays finite instead of overflowing to NaN; healthy "
            "heads of trained grafts stay well below it. null = no bound.",
        )
        key_span: int = Field(1, ge=1, le=16, description=KEY_SPAN_HELP)
        value_span: int = Field(1, ge=1, le=16, description=VALUE_SPAN_HELP)
        truncate_chunks: bool = Field(
            False,
            description="Take each chunk's inner gradients at weights detached from earlier chunks: the "
            "outer backward skips the second-order path through earlier updates but keeps the linear "
            "carry (decay and momentum), so every chunk's keys, values and gates still get gradients.",
        )

    def __init__(self, config: TitansMemory.Config):
        super().__init__(config)
        inner = config.heads * config.dim_head
        self.to_keys = nn.Linear(self.dim, inner, bias=False)
        self.to_values = nn.Linear(self.dim, inner, bias=False)
        self.to_queries = nn.Linear(self.dim, inner, bias=False)
        self.to_gates = nn.Linear(self.dim, 3 * config.heads)  # θ (learning rate), η (momentum), α (decay)
        self.to_out = nn.Linear(inner, self.dim, bias=False)
        self.mlp = MemoryMLP(config.heads, config.dim_head, config.depth, config.expansion)
        self.key_mix = KeyMix(config.key_span, self.dim) if config.key_span > 1 else None
        self.value_mix = ValueMix(config.value_span, self.dim) if config.value_span > 1 else None
        with torch.no_grad():
            self.to_gates.weight.mul_(0.1)
            biases = torch.tensor([LR_BIAS, MOMENTUM_BIAS, DECAY_BIAS])
            self.to_gates.bias.copy_(repeat(biases, "g -> (g h)", h=config.heads))
        self.layers = len(self.mlp.weights)

    # -- state -----------------------------------------------------------------------------------
    def _init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """`w{l}` (b h i o): each row's copy of the learned initial weights; `s{l}`: zero momentum."""
        state = {}
        for index, weight in enumerate(self.mlp.weights):
            w = repeat(weight, "h i o -> b h i o", b=batch_size).to(device=device, dtype=dtype)
            state[f"w{index}"] = w
            state[f"s{index}"] = torch.zeros_like(w)
        if self.key_mix is not None:  # the last written inputs, for keys that span several tokens
            state["key_tail"] = self.key_mix.empty_tail(batch_size, device, dtype)
        return state

    # -- write -----------------------------------------------------------------------------------
    def _write(self, x: torch.Tensor, state: MemoryState, mask: torch.Tensor | None) -> MemoryState:
        key_x, carried = None, {}
        if self.key_mix is not None:
            key_x, carried["key_tail"] = self.key_mix(x, state["key_tail"], mask)
        value_x = None if self.value_mix is None else self.value_mix(x, mask)
        keys, values, theta, eta, kept, written = self._chunk_inputs(x, mask, key_x, value_x)
        batch = dict(b=x.shape[0], h=self.config.heads)
        weights = [rearrange(state[f"w{l}"], "b h i o -> (b h) i o") for l in range(self.layers)]
        moments = [rearrange(state[f"s{l}"], "b h i o -> (b h) i o") for l in range(self.layers)]
        # grad of the loss weighted by −θ is the chunk's surprise u = −Σ θ_t ∇ℓ_t directly
        surprise_of = vmap(grad(self._chunk_loss))
        every_chunk_written = bool(written.all())
        # unbind, not indexing: the backward of t-th-chunk indexing would zero-fill a whole tensor per chunk
        steps = zip(*(t.unbind(0) for t in (keys, values, -theta, eta, kept, written)))
        for chunk_keys, chunk_values, chunk_descent, chunk_eta, chunk_kept, chunk_written in steps:
            at = [w.detach() for w in weights] if self.config.truncate_chunks else weights
            u = surprise_of({f"weights.{l}": w for l, w in enumerate(at)}, chunk_keys, chunk_values, chunk_descent)
            if self.config.max_surprise is not None:
                u = self._bounded(u)
            moments = [torch.addcmul(u[f"weights.{l}"], chunk_eta, s) for l, s in enumerate(moments)]  # η S + u
            if every_chunk_written:
                weights = [torch.addcmul(s, chunk_kept, w) for w, s in zip(weights, moments)]  # (1 − α) M + S
            else:
                weights = [torch.addcmul(chunk_written * s, chunk_kept, w) for w, s in zip(weights, moments)]
        new = {f"w{l}": rearrange(w, "(b h) i o -> b h i o", **batch) for l, w in enumerate(weights)}
        new.update({f"s{l}": rearrange(s, "(b h) i o -> b h i o", **batch) for l, s in enumerate(moments)})
        return state.replace(**new, **carried)

    def _chunk_inputs(
        self, x: torch.Tensor, mask: torch.Tensor | None, key_x: torch.Tensor | None = None, value_x: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Everything the chunk loop needs, for all chunks at once (the last chunk padded and masked).
        Keys come from `key_x` when given (inputs mixed over `key_span` tokens), else from `x`; values
        likewise from `value_x` (mixed over `value_span` tokens).

        Returns unit keys and values (k B c e), learning rates θ (k B c; 0 where masked, capped), the
        chunk gates η and 1 − α (k B 1 1; 1 for a chunk without tokens) and `written` (k B 1 1: the
        chunk has a token to write).
        """
        cfg = self.config
        size, heads = cfg.chunk_size, cfg.heads
        chunks = max(1, math.ceil(x.shape[1] / size))
        pad = chunks * size - x.shape[1]

        # keys, values and gate logits in one matmul (three separate projections)
        fused = torch.cat([self.to_keys.weight, self.to_values.weight, self.to_gates.weight])
        bias = torch.cat([torch.zeros(2 * heads * cfg.dim_head, dtype=x.dtype, device=x.device), self.to_gates.bias])
        keys, values, gates = F.linear(F.pad(x, (0, 0, 0, pad)), fused, bias).split([heads * cfg.dim_head, heads * cfg.dim_head, 3 * heads], dim=-1)
        if key_x is not None:
            keys = F.linear(F.pad(key_x, (0, 0, 0, pad)), self.to_keys.weight)
        if value_x is not None:
            values = F.linear(F.pad(value_x, (0, 0, 0, pad)), self.to_values.weight)
        # normalise in the projection's layout, then lay chunks out contiguously for the batched matmuls
        keys, values = (F.normalize(rearrange(t, "b n (h e) -> b n h e", h=heads), dim=-1) for t in (keys, values))
        keys, values = (rearrange(t, "b (k c) h e -> k (b h) c e", c=size).contiguous() for t in (keys, values))
        lr, momentum, decay = rearrange(gates, "b (k c) (g h) -> g k (b h) c", c=size, g=3)
        keep = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if mask is None else mask.to(x.dtype)
        keep = repeat(F.pad(keep, (0, pad)), "b (k c) -> k (b h) c", c=size, h=heads)

        theta = cfg.max_lr * torch.sigmoid(lr) * keep  # one learning rate per token
        if cfg.step_cap:
            # λ_max(Σ θ_t k_t k_tᵀ) = λ_max(K Kᵀ diag θ) ≤ max over written rows of Σ_j |k_i·k_j| θ_j.
            # A safety scale: held constant for the outer gradient (saves a c × c backward per chunk).
            with torch.no_grad():
                overlap = torch.matmul(keys, keys.mT).abs()  # k B c c
                rows = torch.matmul(overlap, rearrange(theta, "k B c -> k B c 1"))
                bound = (rearrange(rows, "k B c 1 -> k B c") * keep).amax(-1, keepdim=True)
            theta = theta / bound.clamp(min=1.0)

        count = keep.sum(-1)

        def chunk_gate(logits: torch.Tensor) -> torch.Tensor:
            mean = (logits * keep).sum(-1) / count.clamp(min=1)
            return rearrange(torch.where(count > 0, torch.sigmoid(mean), 1.0), "k B -> k B 1 1")

        written = rearrange((count > 0).to(x.dtype), "k B -> k B 1 1")
        return keys, values, theta, chunk_gate(momentum), chunk_gate(-decay), written

    def _bounded(self, u: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The chunk update u (B i o per layer) scaled down, per head, to norm `max_surprise` at most.

        Like the step cap, the scale is held constant for the outer gradient, and a chunk where no head
        exceeds the bound (the usual case) is returned as it is: the bound costs one norm per chunk.
        """
        limit = self.config.max_surprise
        with torch.no_grad():
            squared = sum(torch.linalg.vector_norm(t, dim=(1, 2)).square() for t in u.values())  # B
            if not bool((squared > limit**2).any()):
                return u
            scale = rearrange(limit * torch.rsqrt(squared.clamp(min=limit**2)), "B -> B 1 1")
        return {name: t * scale for name, t in u.items()}

    def _chunk_loss(self, params, keys, values, weights) -> torch.Tensor:
        """One head of one row: Σ_t w_t ½‖M(k_t) − v_t‖² over a chunk (keys, values: c e; weights: c)."""
        predicted = functional_call(self.mlp, params, (keys,))
        return ((predicted - values).square().sum(-1) * (0.5 * weights)).sum()

    def write_strengths(self, x: torch.Tensor) -> torch.Tensor:
        """θ_t / max_lr (b n h): each token's inner learning rate as a fraction of its bound (before step_cap)."""
        heads = self.config.heads
        return torch.sigmoid(F.linear(x, self.to_gates.weight[:heads], self.to_gates.bias[:heads]))

    # -- read ------------------------------------------------------------------------------------
    def _read(self, q: torch.Tensor, state: MemoryState) -> torch.Tensor:
        heads = self.config.heads
        queries = F.normalize(rearrange(self.to_queries(q), "b m (h e) -> (b h) m e", h=heads), dim=-1)
        params = {f"weights.{l}": rearrange(state[f"w{l}"], "b h i o -> (b h) i o") for l in range(self.layers)}
        retrieved = functional_call(self.mlp, params, (queries,))
        return self.to_out(rearrange(retrieved, "(b h) m e -> b m (h e)", h=heads))

    def recall_target(self, x: torch.Tensor) -> torch.Tensor:
        """What a perfect read at written inputs `x` (b n d) returns when queries are projected like
        keys: the output projection of their (unit-norm) values. Tests and diagnostics compare reads
        against it."""
        values = F.normalize(rearrange(self.to_values(x), "b n (h e) -> b n h e", h=self.config.heads), dim=-1)
        return self.to_out(rearrange(values, "b n h e -> b n (h e)"))
