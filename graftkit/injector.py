"""The injector contract: how what a memory recalls is fed back into a frozen backbone.

An injector owns its parameters, attaches removable hooks to the backbone, and during a forward pass
reads from the memory state bound with `reading(memory, state)`. Removing the hooks (`detach`)
restores the bare backbone exactly. An injector that reads the memory once per input position can
also keep those reads for the training objectives that score them (`PerPositionReads`).

Legend: b batch, n tokens, k memory tokens, d hidden size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import nn
from torch.utils.hooks import RemovableHandle

from graftkit.backbone import Backbone
from graftkit.config import Config
from graftkit.errors import GraftkitError
from graftkit.memory import Memory
from graftkit.state import MemoryState


class InjectorConfig(Config):
    """Fields every injector has (none yet); an injector's own `Config` subclasses this."""


class Injector(nn.Module):
    """Base class of every injector plugin.

    Subclasses implement `_attach` (register hooks with `self.hook(...)`; `attach` runs the checks of
    `check_backbone` first), `prepare` (compute what the hooks need from the memory, once per forward
    pass) and optionally `prepare_inputs` (e.g. prepend soft-prompt tokens to the input embeddings). A
    subclass may override `attach` itself instead; it then calls `check_backbone` on its own.
    """

    name: ClassVar[str]
    Config: ClassVar[type[InjectorConfig]] = InjectorConfig

    def __init__(self, config: InjectorConfig, hidden_size: int, num_layers: int):
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self._handles: list[RemovableHandle] = []
        self.context: Any = None  # what `prepare` returned for the current forward pass
        # Set by the graft: standardises hidden states (b n d) the way written ones are (the graft's
        # WriteNorm), for injectors that query the memory with backbone hidden states; None = as they are.
        self.query_norm: Callable[[torch.Tensor], torch.Tensor] | None = None

    def normalize_query(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden` (b n d) as the memory saw written states: through `query_norm` when the graft set one."""
        return hidden if self.query_norm is None else self.query_norm(hidden)

    # -- hooks -------------------------------------------------------------------------------------
    def attach(self, backbone: Backbone) -> None:
        """Check `backbone` (`check_backbone`), then register hooks on it (`_attach`)."""
        self.check_backbone(backbone)
        self._attach(backbone)

    def _attach(self, backbone: Backbone) -> None:
        """Register hooks on `backbone` through `self.hook`."""
        raise NotImplementedError

    def check_backbone(self, backbone: Backbone) -> None:
        """Refuse a second attach and a backbone of another width or depth than this injector was built for."""
        if self.attached:
            raise GraftkitError(f"injector {self.name!r} is already attached to a backbone; call detach() first")
        if backbone.hidden_size != self.hidden_size:
            raise GraftkitError(f"injector: built for hidden size {self.hidden_size}, the backbone has {backbone.hidden_size}")
        if backbone.num_layers != self.num_layers:
            raise GraftkitError(f"injector: built for {self.num_layers} decoder layers, the backbone has {backbone.num_layers}")

    def hook(self, module: nn.Module, fn) -> None:
        """Register a forward hook `fn(module, args, output) -> output` that is removed by `detach`."""
        self._handles.append(module.register_forward_hook(fn))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # -- per forward pass ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def reading(self, memory: Memory, state: MemoryState):
        """Bind a memory state for the forward passes inside the block."""
        self.context = self.prepare(memory, state)
        try:
            yield self.context
        finally:
            self.context = None

    def prepare(self, memory: Memory, state: MemoryState) -> Any:
        """Compute what the hooks need from the memory (e.g. memory tokens b k d)."""
        return None

    def prepare_inputs(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Change the input embeddings (b n d) and mask (b n) before the backbone runs; default: unchanged.

        Tokens added here are prepended; the graft shifts labels and position ids to match.
        """
        return embeds, attention_mask


class PerPositionReads(Injector):
    """Base of an injector that reads the memory once per input position and keeps those reads.

    During a forward pass its hooks store what the memory returned at each input position (b n d) in
    `reads` (None at the start of each `reading` block); `reads_each_position(config)` says whether an
    injector so configured does. Only training uses them: `train.read_loss`, the recall stage
    (`train.recall_steps`) and `train.recall_weight` score the reads themselves.
    """

    def __init__(self, config: InjectorConfig, hidden_size: int, num_layers: int):
        super().__init__(config, hidden_size, num_layers)
        self.reads: torch.Tensor | None = None

    @classmethod
    def reads_each_position(cls, config: InjectorConfig) -> bool:
        """Whether an injector so configured reads the memory once per input position (and sets `reads`)."""
        return True

    @contextlib.contextmanager
    def reading(self, memory: Memory, state: MemoryState):
        self.reads = None
        with super().reading(memory, state) as context:
            yield context


def reads_each_position(injector_class: type, config: BaseModel) -> bool:
    """Whether injectors of `injector_class` so configured read the memory at every position and keep the reads
    (false for a class without `reads_each_position`)."""
    method = getattr(injector_class, "reads_each_position", None)
    return bool(method is not None and method(config))


def check_layer(layer: int, num_layers: int, where: str) -> int:
    """A decoder-layer index (0-based, negative counts from the end) checked against the backbone's
    `num_layers`, as an index from 0; `where` names the recipe field in the message."""
    if not -num_layers <= layer < num_layers:
        raise GraftkitError(f"{where}: layer {layer} is outside 0..{num_layers - 1} (this backbone has {num_layers} decoder layers)")
    return layer % num_layers


class MemoryTokens(nn.Module):
    """Reads a memory with `num_tokens` learned queries into memory tokens (b k d)."""

    def __init__(self, dim: int, num_tokens: int, init_scale: float = 0.02):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_tokens, dim) * init_scale)

    def forward(self, memory: Memory, state: MemoryState) -> torch.Tensor:
        queries = self.queries.unsqueeze(0).expand(state.batch_size, -1, -1)
        return memory.read(queries.to(state_dtype(state)), state)


def state_dtype(state: MemoryState) -> torch.dtype:
    """The floating dtype a state holds (what reads and writes against it compute in)."""
    return next((t.dtype for t in state.tensors.values() if t.is_floating_point()), torch.float32)


def hook_output(output):
    """(hidden, rest) of a module output that may be a tensor or a tuple whose first item is hidden."""
    if isinstance(output, tuple):
        return output[0], output[1:]
    return output, None


def replace_output(output, hidden):
    return hidden if not isinstance(output, tuple) else (hidden, *output[1:])
