"""What the benchmarks share: the recipe whose graft they measure, and a hook that keeps generation from stopping."""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = "recipes/smollm2_linear_mid_layer.yaml"  # the `make train` default (the Makefile's RECIPE)


def add_recipe_option(parser: argparse.ArgumentParser) -> None:
    """--recipe: the recipe whose graft is built and measured, by default the `make train` default."""
    parser.add_argument(
        "--recipe",
        type=Path,
        default=ROOT / DEFAULT_RECIPE,
        help=f"recipe whose graft is measured (default: {DEFAULT_RECIPE}, the `make train` default)",
    )


def no_eos(backbone):
    """Mask the stop ids in the LM head's logits so every run generates the full length; returns the hook handle."""
    model, tok = backbone.model, backbone.tokenizer
    configured = model.generation_config.eos_token_id
    stop = {tok.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    stop = sorted(s for s in stop if s is not None)

    def hook(module, args, output):
        output[..., stop] = float("-inf")
        return output

    return model.get_output_embeddings().register_forward_hook(hook)
