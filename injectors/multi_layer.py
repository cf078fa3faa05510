"""Flamingo-style gated cross-attention at several decoder layers.

One set of memory tokens is read per forward pass (`num_tokens` learned queries, shared by all layers);
each listed layer has its own cross-attention (own norms and projections, so each layer reads the
tokens its own way) and its own tanh gate, closed at the start (`gate_init` 0.0). A forward hook on each
listed decoder layer adds its block's output to the residual stream, at every position, including each
new token of cached generation. Rows with an empty memory are never changed.

Legend: b batch, n tokens, k memory tokens, d hidden size.
"""

from __future__ import annotations

from graftkit.injectors.xattn import CrossAttentionConfig, GatedCrossAttention, MemoryTokenInjector
from pydantic import Field, field_validator
from torch import nn

from graftkit.errors import GraftkitError
from graftkit.injector import check_layer, hook_output, replace_output

DEFAULT_COUNT = 4


def default_layers(num_layers: int, count: int = DEFAULT_COUNT) -> list[int]:
    """`count` evenly spaced layers, (i + 1)·num_layers / (count + 1) for i < count (fewer when they collide)."""
    return sorted({(i + 1) * num_layers // (count + 1) for i in range(count)})


class MultiLayerCrossAttention(MemoryTokenInjector):
    """Gated cross-attention blocks on the outputs of several decoder layers, sharing the memory tokens."""

    name = "multi_layer_xattn"

    class Config(CrossAttentionConfig):
        layers: list[int] | None = Field(
            None,
            description="Decoder layers (0-based indices into the backbone's layers; negative counts from the end) "
            f"whose outputs receive the memory; default: {DEFAULT_COUNT} evenly spaced layers, "
            f"(i + 1)·num_layers // {DEFAULT_COUNT + 1}.",
        )
        num_tokens: int = Field(16, ge=1, le=1024, description="Memory tokens read by learned queries, shared by all layers.")

        @field_validator("layers")
        @classmethod
        def _some_layers(cls, value: list[int] | None) -> list[int] | None:
            if value is not None and not value:
                raise ValueError("list at least one layer (or leave it out for the default)")
            return value

    config: Config

    def __init__(self, config: Config, hidden_size: int, num_layers: int):
        super().__init__(config, hidden_size, num_layers)
        wanted = default_layers(num_layers) if config.layers is None else config.layers
        layers = [check_layer(layer, num_layers, "injector.layers") for layer in wanted]
        repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
        if repeated:
            raise GraftkitError(f"injector.layers: layer(s) {repeated} listed more than once")
        self.layers = sorted(layers)
        self.blocks = nn.ModuleDict(
            {str(layer): GatedCrossAttention(hidden_size, config.heads, config.dim_head, config.gate, config.gate_init) for layer in self.layers}
        )

    def _attach(self, backbone) -> None:
        for layer in self.layers:
            self.hook(backbone.layers[layer], self._hook_for(self.blocks[str(layer)]))

    def _hook_for(self, block: GatedCrossAttention):
        def on_layer(module, args, output):
            if self.context is None:
                return None
            hidden, _ = hook_output(output)
            return replace_output(output, block(hidden, self.context))

        return on_layer
