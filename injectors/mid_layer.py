"""Gated cross-attention onto the memory in the middle of the frozen backbone.

A forward hook on decoder layer `layer` adds tanh(gate) · cross-attention(RMSNorm(hidden), memory
reads) to that layer's output, i.e. to the residual stream the next layer reads; the hook sees every
position, including each new token of cached generation. The gate starts closed (`gate_init` 0.0), so
a fresh graft is the bare backbone; rows with an empty memory are never changed.

With `direct_read` (the default), each position reads the memory itself: the query is a projection of
its hidden state, standardised like written states (the graft's `query_norm`), so a question token asks
the memory in the space its keys were written from; with `layer` = the memory's write_layer − 1 it is
the very same space (decoder layer i outputs hidden state i + 1). `num_tokens` > 0 adds memory tokens,
read once per forward pass by learned queries and shared by every position, attended to beside the
position's own read; with the default 0 each position gets what its own query recalls and nothing else.

Legend: b batch, n tokens, k memory tokens, d hidden size.
"""

from __future__ import annotations

from graftkit.injectors.xattn import GATE_HELP, CrossAttentionConfig, DirectRead, GatedCrossAttention, GateKind, MemoryTokenInjector
from pydantic import Field, model_validator
from torch import nn

from graftkit.injector import check_layer, hook_output, replace_output


class MidLayer(DirectRead, MemoryTokenInjector):
    """One gated cross-attention block on the output of one decoder layer."""

    name = "mid_layer"

    class Config(CrossAttentionConfig):
        layer: int | None = Field(
            None,
            description="Decoder layer (0-based index into the backbone's layers; negative counts from the end) "
            "whose output receives the memory; default: the middle one, num_layers // 2.",
        )
        num_tokens: int = Field(
            0,
            ge=0,
            le=1024,
            description="Memory tokens read by learned queries and attended to by every position (beside its own read, "
            "with direct_read); 0 (only with direct_read) leaves each position its own read alone, so what it gets "
            "is what its own query recalls.",
        )
        direct_read: bool = Field(
            True,
            description="Read the memory once per token, queried with a projection of the token's hidden state at "
            "this layer, and attend to that read as one more key/value next to the memory tokens. false needs "
            "num_tokens > 0.",
        )
        gate: GateKind = Field("token", description=GATE_HELP)

        former_defaults = {"num_tokens": 16, "direct_read": False, "gate": "scalar"}

        @model_validator(mode="after")
        def _tokens_or_own_read(self):
            if self.num_tokens == 0 and not self.direct_read:
                raise ValueError("direct_read: false needs memory tokens to attend to: set num_tokens (e.g. 16), or direct_read: true")
            return self

    config: Config

    def __init__(self, config: Config, hidden_size: int, num_layers: int):
        super().__init__(config, hidden_size, num_layers)
        wanted = num_layers // 2 if config.layer is None else config.layer
        self.layer = check_layer(wanted, num_layers, "injector.layer")
        self.block = GatedCrossAttention(hidden_size, config.heads, config.dim_head, config.gate, config.gate_init)
        self.to_query = nn.Linear(hidden_size, hidden_size, bias=False) if config.direct_read else None

    def _attach(self, backbone) -> None:
        self.hook(backbone.layers[self.layer], self._on_layer)

    def _on_layer(self, module, args, output):
        if self.context is None:
            return None
        hidden, _ = hook_output(output)
        extra = self.read_directly(self.normalize_query(hidden.float()), self.context)
        return replace_output(output, self.block(hidden, self.context, extra))
