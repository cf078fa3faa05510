"""The test matrix: every built-in component a parametrized test runs over, and small fast configs.

Adding a memory to `ALL_MEMORIES` (and a small config to `SMALL_MEMORY`) buys it the shape, gradient,
chunking, mask, save/load and error tests of `test_memories.py`. Test files import from here as
`from matrix import ALL_MEMORIES, make_memory` (pytest puts `tests/` on `sys.path`).
"""

from __future__ import annotations

import torch

ALL_MEMORIES = ["titans", "linear", "attention_slots", "episodic"]
# Adding an injector here buys it the gradient, identity, detach, cached-generation and recall tests of
# `test_injectors.py` on every memory and every backbone family (tiny random models).
ALL_INJECTORS = ["layer0_soft_prompt", "mid_layer", "multi_layer_xattn"]
ALL_BACKBONES = ["qwen2", "llama", "mistral"]

# Small configurations for quick CPU tests (the defaults are sized for real backbones).
SMALL_MEMORY: dict[str, dict] = {
    "titans": dict(heads=2, dim_head=16, depth=2, expansion=2, chunk_size=8),
    "linear": dict(heads=2, dim_head=16, chunk_size=8),
    "attention_slots": dict(heads=2, dim_head=16, slots=16, chunk_size=8),
    "episodic": dict(heads=2, dim_head=16, slots=32),
}


def memory_class(name: str) -> type:
    """The built-in memory class called `name`, found through the built-in plugin's own hook."""
    from graftkit import memories

    found: dict[str, type] = {}
    memories.register_memories(register=lambda cls: found.setdefault(cls.name, cls))
    if name not in found:
        raise KeyError(f"no built-in memory {name!r} (built-in: {sorted(found)})")
    return found[name]


def make_memory(name: str, dim: int, seed: int = 0, **overrides):
    """A small memory `name` of width `dim`, with parameters drawn from `seed`.

    `overrides` replace fields of the small config (e.g. `chunk_size=4`, `decay=False`).
    """
    cls = memory_class(name)
    config = cls.Config(**{**SMALL_MEMORY.get(name, {}), "dim": dim, **overrides})
    torch.manual_seed(seed)
    return cls(config)
