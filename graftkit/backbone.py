"""The backbone contract: what graftkit uses of a frozen causal LM.

A backbone adapter wraps one loaded model and its tokenizer. Grafts, injectors, training, evaluation,
export and the preservation checks reach the model only through the members `Backbone` names here; a
third-party adapter that has them all works wherever the built-in one does (it need not inherit from
`Backbone`, though the built-in one does).

Everything of the backbone stays frozen: every model parameter has `requires_grad=False` and the model
is in eval mode, so no backbone tensor reaches an optimizer or an export.

An adapter class may also have a classmethod `layer_count(source: str) -> int | None`, the decoder layer
count of a recipe's `backbone.source` when it is known without loading weights (None otherwise); recipe
validation uses it to check layer indices early. It is optional: without it those checks wait until
the backbone is loaded.

Legend: b batch, n tokens, d hidden size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from pydantic import BaseModel
from torch import nn


@runtime_checkable
class Backbone(Protocol):
    """A frozen causal LM as graftkit sees it."""

    #: The value of `backbone.kind` in recipes (e.g. ``llama``).
    name: ClassVar[str]
    #: Validates the recipe's `backbone` block; an instance's validated block is `config`.
    Config: ClassVar[type[BaseModel]]

    config: BaseModel
    #: The Hugging Face-style causal LM: called with `input_ids` or `inputs_embeds`, `attention_mask`,
    #: `position_ids`, `past_key_values`, `use_cache` and `labels`; also `generate`, `get_output_embeddings`,
    #: `config` and `state_dict` are used. Frozen.
    model: nn.Module
    #: Its tokenizer: `pad_token_id` (never None), `eos_token_id`, `decode` and `batch_decode` are used.
    tokenizer: Any

    @property
    def embedding(self) -> nn.Module:
        """The input embedding module (token ids -> b n d); its `weight` is the embedding matrix (vocab d)."""
        ...

    @property
    def layers(self) -> Sequence[nn.Module]:
        """The decoder layers in order; injectors hook their outputs (a tensor or a tuple starting with it)."""
        ...

    @property
    def hidden_size(self) -> int:
        """d: the width of hidden states."""
        ...

    @property
    def num_layers(self) -> int:
        """How many decoder layers there are."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the model's weights (and so the inputs it is given) live."""
        ...

    # -- text ----------------------------------------------------------------------------------------
    def chat_ids(self, user_message: str) -> list[int]:
        """Token ids of one user turn in the chat template, ending where the assistant answers."""
        ...

    def chat_parts(self, head: str, tail: str) -> tuple[list[int], list[int]]:
        """`chat_ids(head + tail)` split where `tail` starts; the first part depends only on `head`."""
        ...

    def text_ids(self, text: str) -> list[int]:
        """Token ids of plain text (what turn 1 writes into memory), no special tokens."""
        ...

    # -- computation -----------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, layer: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (b n d) after decoder layer `layer` (0 = embeddings), running only the layers below it."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (... vocab) of states (... d) in the last layer's space: final norm, then LM head."""
        ...

    # -- identity ----------------------------------------------------------------------------------------
    def manifest(self) -> dict:
        """What an export records of the backbone: at least `family`, `source`, `hidden_size`, `num_layers` and
        `tokenizer` (a fingerprint of the vocabulary); a graft loads only onto a backbone whose manifest agrees."""
        ...

    def fingerprint(self) -> str:
        """A short string naming the exact weights and dtype (keys the cache of turn-1 hidden states)."""
        ...
