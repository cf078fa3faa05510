"""Shared fixtures: session-wide tiny random backbones (built once per family, dtype and quantization)."""

from __future__ import annotations

import pytest
import torch

import graftkit


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine waiting OpenMP threads cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_backbone():
    """tiny_backbone(family, quantize=None, dtype="float32") -> a frozen tiny-random backbone, loaded once.

    Tests share these objects: a test that attaches an injector must detach it before it ends.
    """
    cache: dict[tuple[str, str | None, str], object] = {}

    def get(family: str, quantize: str | None = None, dtype: str = "float32"):
        key = (family, quantize, dtype)
        if key not in cache:
            spec = {"kind": family, "source": "tiny-random", "dtype": dtype}
            if quantize:
                spec["quantize"] = quantize
            backbone = graftkit.load_backbone(spec)
            with torch.no_grad():  # first inference call: bitsandbytes repacks NF4 weights here, once
                backbone.model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=backbone.device))
            cache[key] = backbone
        return cache[key]

    return get
