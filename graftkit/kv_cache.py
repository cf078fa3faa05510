"""The key/value cache of a transformers model under the name the installed release uses.

transformers 5.24 renamed the `past_key_values` argument and output field to `cache` (the old name
still works there, with a deprecation warning on every run); graftkit supports releases on both sides.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def cache_name() -> str:
    """`cache` on transformers ≥ 5.24, else `past_key_values`."""
    from transformers.modeling_outputs import CausalLMOutputWithPast  # here, not at the top: transformers takes seconds to import

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """The keyword argument that passes `cache` to a model's forward."""
    return {cache_name(): cache}


def output_cache(out: Any) -> Any:
    """The cache a model's forward returned."""
    return getattr(out, cache_name())
