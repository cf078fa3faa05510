"""The memory contract: a test-time learner over `b n d` sequences that knows nothing of transformers.

Subclasses implement `_init_state`, `_write` and `_read`; the public methods here validate shapes,
keep the per-row written-token count and stamp the state with the memory's identity.

Legend: b batch (rows), n written tokens, m query tokens, d model width.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from graftkit.config import Config
from graftkit.errors import GraftkitError, StateError
from graftkit.state import WRITTEN, MemoryState, config_hash


class MemoryConfig(Config):
    """Fields every memory has; a memory's own `Config` subclasses this."""

    dim: int | None = Field(None, gt=0, description="Width of written and read vectors; a graft fills it from the backbone's hidden size.")
    write_layer: int = Field(0, ge=0, description="Backbone hidden state that is written: 0 = embeddings, i = output of decoder layer i.")
    segment_tokens: int = Field(1024, gt=0, description="Turn-1 text runs through the backbone in independent segments of this many tokens.")
    standardize: bool = Field(
        True,
        description="In a graft, standardise written hidden states per channel (mean and standard deviation of "
        "the backbone at write_layer, measured on a fixed text when the graft is built) before the memory "
        "sees them; removes the large direction all hidden states share. The memory alone ignores it.",
    )


class Memory(nn.Module):
    """Base class of every memory plugin."""

    name: ClassVar[str]
    Config: ClassVar[type[MemoryConfig]] = MemoryConfig

    def __init__(self, config: MemoryConfig):
        super().__init__()
        if config.dim is None:
            raise GraftkitError(f"memory.dim: {self.name} needs a width (pass dim=..., or build it through a graft)")
        self.config = config
        self.dim = config.dim

    # -- identity --------------------------------------------------------------------------------
    @property
    def identity(self) -> dict[str, str]:
        """Metadata a state of this memory carries; a state with other values is refused."""
        return {"memory_kind": self.name, "memory_config": config_hash(self.config.model_dump(mode="json"))}

    # -- public API ------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype=None) -> MemoryState:
        """A fresh (empty) memory for `batch_size` rows."""
        device = device if device is not None else _param_device(self)
        dtype = dtype if dtype is not None else _param_dtype(self)
        tensors = self._init_state(batch_size, torch.device(device), dtype)
        tensors[WRITTEN] = torch.zeros(batch_size, dtype=torch.long, device=device)
        return MemoryState(tensors, self.identity)

    def write(self, x: torch.Tensor, state: MemoryState, mask: torch.Tensor | None = None) -> MemoryState:
        """Store `x` (b n d) into `state`; positions where `mask` (b n) is False are not written."""
        self._check(x, state, "write")
        if mask is not None:
            if mask.shape != x.shape[:2]:
                raise GraftkitError(f"memory.write: mask has shape {tuple(mask.shape)}, expected {tuple(x.shape[:2])}")
            mask = mask.to(device=x.device, dtype=torch.bool)
        new = self._write(x, state, mask)
        count = x.shape[1] if mask is None else mask.sum(-1)
        return new.replace(**{WRITTEN: state.tensors[WRITTEN] + count})

    def read(self, q: torch.Tensor, state: MemoryState) -> torch.Tensor:
        """Retrieve for queries `q` (b m d); returns (b m d)."""
        self._check(q, state, "read")
        return self._read(q, state)

    def write_strengths(self, x: torch.Tensor) -> torch.Tensor | None:
        """How strongly each token of `x` (b n d, as `write` gets it) is written, per head: (b n heads) in
        [0, 1]. None for a memory without per-token write gates. `train.write_cost` penalises their sum."""
        return None

    # -- for subclasses --------------------------------------------------------------------------
    def _init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _write(self, x: torch.Tensor, state: MemoryState, mask: torch.Tensor | None) -> MemoryState:
        raise NotImplementedError

    def _read(self, q: torch.Tensor, state: MemoryState) -> torch.Tensor:
        raise NotImplementedError

    def _check(self, x: torch.Tensor, state: MemoryState, verb: str) -> None:
        if x.dim() != 3:
            raise GraftkitError(f"memory.{verb}: expected a (batch, tokens, {self.dim}) tensor, got shape {tuple(x.shape)}")
        if x.shape[-1] != self.dim:
            raise GraftkitError(f"memory.{verb}: last dimension is {x.shape[-1]}, this {self.name} memory has dim {self.dim}")
        if x.shape[0] != state.batch_size:
            raise GraftkitError(f"memory.{verb}: batch of {x.shape[0]} rows but the state has {state.batch_size}")
        if state.metadata.get("memory_kind") != self.name:
            raise StateError(f"memory.{verb}: state belongs to a {state.metadata.get('memory_kind')!r} memory, not {self.name!r}")


def _param_device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _param_dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


KEY_SPAN_HELP = (
    "Keys are computed from the last key_span written inputs through a learned depthwise causal "
    "convolution that starts as the identity, so a key can carry a token a few positions back (e.g. "
    "the subject of a short sentence next to its object). 1 = each token alone. The last key_span − 1 "
    "inputs are kept in the state, so writing in several calls gives the same memory as one call."
)


VALUE_SPAN_HELP = (
    "Values are computed from the written input and the next value_span − 1 written inputs of the same "
    "write call through a learned depthwise convolution that starts as their mean, so the value stored "
    "under a token's key can carry what follows it (e.g. the place after a person's name, recalled by a "
    "query about that name). 1 = each token alone. The last tokens of a write call see only what that "
    "call holds: splitting a write changes the values just before the split."
)


VALUE_OFFSET_HELP = (
    "Values are computed from the written input value_offset tokens ahead (of the same write call) instead "
    "of the token itself: with 1, the value stored under a token's key is the token that follows it, so a "
    "query that matches the words before a name, number or place reads that word back, one token at a "
    "time, whether or not it was seen in training. 0 = each token's own value. The last value_offset "
    "tokens of a write call store nothing: splitting a write loses the value after the split."
)


def look_ahead(x: torch.Tensor, mask: torch.Tensor | None, offset: int) -> torch.Tensor:
    """Each written input replaced by the written input `offset` positions after it in the same call (b n d);
    zeros past the last one. A masked position's result is arbitrary."""
    order = None
    if mask is not None:  # written inputs first, in order, then the masked ones (zeroed)
        x, order = written_first(x, mask)
        x = x * mask.gather(1, order).to(x.dtype)[..., None]
    shifted = F.pad(x[:, offset:], (0, 0, 0, min(offset, x.shape[1])))
    return shifted if order is None else in_place_of(shifted, order)


def without_last_written(keep: torch.Tensor, count: int) -> torch.Tensor:
    """`keep` (b n, 1 = written) with each row's last `count` written positions set to 0: with a value_offset,
    they have no value to store."""
    written = keep.cumsum(1)
    return keep * (written <= written[:, -1:] - count)


class KeyMix(nn.Module):
    """Depthwise causal convolution over written inputs (b n d) for computing keys, across write calls.

    `weight` (span d): row span−1 weighs the current input (1 at init), row span−1−j the input j
    written tokens back. Masked positions are skipped: the window runs over the written (unmasked)
    inputs only, and `tail` (b span−1 d) carries the last written inputs from one call to the next.
    """

    def __init__(self, span: int, dim: int):
        super().__init__()
        self.span = span
        weight = torch.zeros(span, dim)
        weight[-1] = 1.0
        self.weight = nn.Parameter(weight)

    def empty_tail(self, batch_size: int, device, dtype) -> torch.Tensor:
        return torch.zeros(batch_size, self.span - 1, self.weight.shape[1], device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, tail: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixed inputs b n d, new tail b span−1 d); a masked position's mixed value is arbitrary."""
        b, n, d = x.shape
        s = self.span - 1
        if n == 0:  # nothing written: the tail stays as it was
            return x, tail
        if mask is None:
            order, count = None, torch.full((b,), n, device=x.device)
            packed = x
        else:  # written inputs first, in order, then the masked ones
            packed, order = written_first(x, mask)
            count = mask.sum(1)
        extended = torch.cat([tail.to(x.dtype), packed], dim=1)  # b (s+n) d
        windows = extended.unfold(1, self.span, 1)  # b n d span
        mixed = torch.einsum("bnds,sd->bnd", windows, self.weight.to(x.dtype))
        if order is not None:
            mixed = in_place_of(mixed, order)
        index = count[:, None] + torch.arange(s, device=x.device)[None]  # the last s of tail + written
        new_tail = extended.gather(1, index[..., None].expand(b, s, d))
        return mixed, new_tail


class ValueMix(nn.Module):
    """Depthwise convolution over a written input and the written inputs after it (b n d), within one call.

    `weight` (span d): row 0 weighs the current input, row j the input j written tokens ahead; all
    1/span at init (the window's mean). Not the identity, unlike `KeyMix`: started as the identity, the
    look-ahead rows stay near zero in training and the option does nothing. Masked positions are skipped
    and contribute nothing; past the call's last written input the window sees zeros.
    """

    def __init__(self, span: int, dim: int):
        super().__init__()
        self.span = span
        self.weight = nn.Parameter(torch.full((span, dim), 1.0 / span))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Mixed inputs (b n d); a masked position's mixed value is arbitrary."""
        order = None
        if mask is not None:  # written inputs first, in order, then the masked ones (zeroed)
            x, order = written_first(x, mask)
            x = x * mask.gather(1, order).to(x.dtype)[..., None]
        windows = F.pad(x, (0, 0, 0, self.span - 1)).unfold(1, self.span, 1)  # b n d span: t, t+1, …
        mixed = torch.einsum("bnds,sd->bnd", windows, self.weight.to(x.dtype))
        if order is not None:
            mixed = in_place_of(mixed, order)
        return mixed


def written_first(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` (b n d) with each row's written positions first, in order, then its masked ones; and the
    order used (b n), for `in_place_of`."""
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    return x.gather(1, order[..., None].expand_as(x)), order


def in_place_of(packed: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Undo `written_first`: every row of `packed` (b n d) back at the positions it came from."""
    return torch.empty_like(packed).scatter(1, order[..., None].expand_as(packed), packed)
