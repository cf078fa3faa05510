"""How much written hidden states share one direction, and what standardising them does to memory keys.

Runs the recipe's backbone to its write layer over BABILong test contexts, then reports: the mean token
norm, the norm of the mean vector, the channels with the largest means, the mean cosine between tokens
(raw, and standardised with the graft's write statistics), and the mean |k_i·k_j| between unit memory
keys of the recipe's freshly initialised memory, fed raw or standardised states.

    python research/write_stats.py [--recipe recipes/experiments/smollm2_titans_layer0.yaml] [--samples 8] [--threads N]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from einops import rearrange


def mean_abs_cos(rows: torch.Tensor, limit: int = 2000) -> float:
    unit = F.normalize(rows[:limit], dim=-1)
    return (unit @ unit.T).abs().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/experiments/smollm2_titans_layer0.yaml")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from graftkit.api import build_graft
    from graftkit.data.babilong import build_babilong
    from graftkit.protocol import HiddenCache

    torch.manual_seed(0)
    graft = build_graft(args.recipe)
    samples = build_babilong("qa1", "test", "1k", args.samples, seed=0, tokenizer=graft.backbone.tokenizer)
    hidden, mask = HiddenCache(graft, None).get(samples)
    tokens = hidden[mask]  # (tokens d), padding dropped
    mean = tokens.mean(0)
    top = mean.abs().topk(3)
    print(
        f"{tokens.shape[0]} tokens at layer {graft.memory.config.write_layer}: mean token norm "
        f"{tokens.norm(dim=-1).mean():.1f}, norm of the mean vector {mean.norm():.1f}; largest channel means "
        + ", ".join(f"{i} ({mean[i]:.1f})" for i in top.indices.tolist())
    )
    standardised = graft.write_norm(tokens) if graft.write_norm is not None else (tokens - mean) / tokens.std(0)
    print(f"mean |cos| between tokens: raw {mean_abs_cos(tokens):.2f}, standardised {mean_abs_cos(standardised):.2f}")
    to_keys, heads = graft.memory.to_keys, graft.memory.config.heads
    with torch.no_grad():
        for label, rows in (("raw", tokens), ("standardised", standardised)):
            keys = rearrange(to_keys(rows[:2000]), "n (h e) -> h n e", h=heads)
            keys = F.normalize(keys, dim=-1)
            overlap = (keys @ keys.mT).abs().mean().item()
            print(f"mean |k_i.k_j| of the memory's keys at init, {label} states: {overlap:.2f}")


if __name__ == "__main__":
    main()
