"""Layer-0 soft prompt + gated per-token reads: the published grafting design.

Two paths feed the memory into the frozen backbone at its input:

1. Soft prompt. `num_tokens` learned queries read the memory into memory tokens (b k d); a linear map
   takes them to the embedding space, where they are normalised and scaled to the median norm of the
   backbone's input embeddings (measured when the injector attaches), so they look like tokens to the
   frozen model. `prepare_inputs` prepends them to the question's embeddings. Rows whose memory is
   empty get their prompt masked out (attention mask 0; the graft derives position ids from the mask,
   so masked prompt tokens shift no positions).
2. Gated reads. A forward hook on the embedding module adds, to every input embedding,
   tanh(gate) · cross-attention(embedding → memory tokens + the token's own direct read
   `memory.read(W·embedding)`), with a per-token gate computed from the embedding and its read
   (zero-initialised weight, bias `gate_init`). Being a hook on the embedding, it also applies to each
   new token of cached generation.

With an empty memory the grafted logits equal the bare backbone's on the question positions; with a
memory and the gate closed, only the soft prompt differs.

Legend: b batch, n question tokens, k memory (prompt) tokens, d hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import repeat
from graftkit.injectors.xattn import GATE_HELP, CrossAttentionConfig, DirectRead, GatedCrossAttention, GateKind, MemoryTokenInjector
from pydantic import Field
from torch import nn


class Layer0SoftPrompt(DirectRead, MemoryTokenInjector):
    """Memory tokens prepended as a soft prompt, plus gated per-token cross-attention at the embeddings."""

    name = "layer0_soft_prompt"

    class Config(CrossAttentionConfig):
        num_tokens: int = Field(16, ge=1, le=1024, description="Memory tokens read by learned queries and prepended as a soft prompt.")
        direct_read: bool = Field(
            True,
            description="Also read the memory once per token (query: a projection of the token's embedding) and "
            "attend to that read as one more key/value next to the memory tokens.",
        )
        gate: GateKind = Field("token", description=GATE_HELP)

    config: Config

    def __init__(self, config: Config, hidden_size: int, num_layers: int):
        super().__init__(config, hidden_size, num_layers)
        self.to_prompt = nn.Linear(hidden_size, hidden_size)
        self.to_query = nn.Linear(hidden_size, hidden_size, bias=False) if config.direct_read else None
        self.block = GatedCrossAttention(hidden_size, config.heads, config.dim_head, config.gate, config.gate_init)
        # Median norm of the backbone's input embeddings; a property of the backbone, set by `attach`.
        self.register_buffer("embed_norm", torch.ones(()), persistent=False)

    def _attach(self, backbone) -> None:
        with torch.no_grad():
            self.embed_norm.fill_(backbone.embedding.weight.detach().float().norm(dim=-1).median().item())
        self.hook(backbone.embedding, self._on_embedding)

    # -- the soft prompt -------------------------------------------------------------------------------
    def prompt(self) -> torch.Tensor:
        """The soft-prompt tokens (b k d, float32) of the bound memory."""
        return F.normalize(self.to_prompt(self.context.tokens), dim=-1) * self.embed_norm

    def prepare_inputs(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.context is None:
            return embeds, attention_mask
        prompt = self.prompt().to(embeds.dtype)
        visible = repeat(self.context.keep, "b -> b k", k=prompt.shape[1]).to(attention_mask.dtype)
        return torch.cat([prompt, embeds], dim=1), torch.cat([visible, attention_mask], dim=1)

    # -- the gated reads --------------------------------------------------------------------------------
    def _on_embedding(self, module, args, output):
        recall = self.context
        if recall is None:
            return None
        return self.block(output, recall, self.read_directly(output.float(), recall))
