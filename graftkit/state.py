"""MemoryState: the per-row tensors a memory writes at test time.

Every tensor has the batch (row) dimension first, so one row is one user's memory and rows can be
selected, stacked, saved and loaded independently. Files are safetensors with string metadata; pickle
is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from graftkit.errors import StateError

FORMAT = "graftkit.memory_state/1"
WRITTEN = "tokens_written"  # reserved entry: tokens written so far, one count per row
CHECKSUM = "sha256"  # metadata entry: sha256 of the tensors' names, dtypes, shapes and bytes


def checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) of named tensors, in name order: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class MemoryState:
    """Named tensors (batch first) plus identity metadata (memory kind, config hash, graft id)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None):
        self.tensors = dict(tensors)
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        sizes = {name: t.shape[0] for name, t in self.tensors.items()}
        assert len(set(sizes.values())) <= 1, f"state tensors disagree on batch size: {sizes}"

    # -- introspection -------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @property
    def tokens_written(self) -> torch.Tensor:
        """Tokens written into each row so far (zeros for a fresh state)."""
        return self.tensors[WRITTEN]

    @property
    def is_empty(self) -> torch.Tensor:
        """Boolean per row: nothing has been written into that row yet."""
        return self.tensors[WRITTEN] == 0

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.tensors.items())
        return f"MemoryState({self.metadata.get('memory_kind', '?')}: {shapes})"

    # -- functional updates ----------------------------------------------------------------------
    def replace(self, **tensors: torch.Tensor) -> MemoryState:
        """A new state with some tensors replaced (the old state is left untouched)."""
        return MemoryState({**self.tensors, **tensors}, self.metadata)

    def detach(self) -> MemoryState:
        return MemoryState({k: v.detach() for k, v in self.tensors.items()}, self.metadata)

    def clone(self) -> MemoryState:
        """An independent copy: a fork of the memory."""
        return MemoryState({k: v.clone() for k, v in self.tensors.items()}, self.metadata)

    def to(self, device=None, dtype=None) -> MemoryState:
        """Move to a device; `dtype` applies to floating tensors only (counters stay integers)."""
        moved = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in self.tensors.items()}
        return MemoryState(moved, self.metadata)

    def select(self, rows: int | Iterable[int] | torch.Tensor) -> MemoryState:
        """The state of some rows (an int keeps a batch of one)."""
        index = torch.as_tensor([rows] if isinstance(rows, int) else list(rows) if not torch.is_tensor(rows) else rows)
        return MemoryState({k: v[index.to(v.device)] for k, v in self.tensors.items()}, self.metadata)

    @staticmethod
    def stack(states: list[MemoryState]) -> MemoryState:
        """Concatenate rows of states from the same memory into one batch."""
        if not states:
            raise StateError("MemoryState.stack needs at least one state")
        first = states[0]
        for other in states[1:]:
            if other.tensors.keys() != first.tensors.keys() or _identity(other) != _identity(first):
                raise StateError(f"cannot stack states of different memories: {first!r} and {other!r}")
        return MemoryState({k: torch.cat([s.tensors[k] for s in states]) for k in first.tensors}, first.metadata)

    # -- files -----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the state to a safetensors file, atomically (a crash never leaves half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
        save_file(tensors, str(tmp), metadata={**self.metadata, "format": FORMAT, CHECKSUM: checksum(tensors)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, expect: Mapping[str, str] | None = None, device=None) -> MemoryState:
        """Read a state file; `expect` lists metadata that must match (e.g. memory kind, config hash)."""
        path = Path(path)
        if not path.is_file():
            raise StateError(f"{path}: no such memory state file")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            tensors = load_file(str(path), device=str(device) if device else "cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise StateError(f"{path}: not a readable memory state file ({exc})") from None
        if metadata.get("format") != FORMAT or WRITTEN not in tensors:
            raise StateError(f"{path}: not a graftkit memory state (format {metadata.get('format')!r})")
        metadata.pop("format")
        recorded = metadata.pop(CHECKSUM, None)
        if recorded is not None and recorded != checksum(tensors):
            raise StateError(f"{path}: damaged (its tensors do not match the checksum written with them)")
        for key, want in (expect or {}).items():
            got = metadata.get(key)
            if got != want:
                raise StateError(f"{path}: this state was saved by another {key.replace('_', ' ')} ({got!r}); this one is {want!r}")
        return cls(tensors, metadata)


def _identity(state: MemoryState) -> tuple:
    return tuple(sorted(state.metadata.items()))


def config_hash(config: Mapping) -> str:
    """A short stable hash of a JSON-able configuration."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
