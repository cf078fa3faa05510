"""Replay training batches through a trained Titans graft's memory write and watch its inner loop.

For each training step named, rebuilds that step's batch exactly as `graftkit train` drew it (same seed,
same bucket and samples; turn-1 hidden states from the cache), writes it chunk by chunk and reports,
per head: the norm of each chunk's update u and of the memory-MLP weights after it (the chunk loop of
`TitansMemory._write`, repeated here step by step so it can be watched; keep the two in step). Heads whose state
ends non-finite are listed with their weight norms chunk by chunk. `--max-surprise none` replays without
the bound (how runs trained before it behaved); by default the run's own setting is used.

    python research/titans_inner_loop.py RUN_DIR --checkpoint step-000450 --steps 451,453,454 [--max-surprise none] [--threads 1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def replay(graft, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per chunk and head (rows·heads flattened): update norms and weight norms after the chunk."""
    from einops import rearrange
    from torch.func import grad, vmap

    memory = graft.memory
    x = graft.write_norm(hidden.float()) if graft.write_norm is not None else hidden.float()
    value_x = None if memory.value_mix is None else memory.value_mix(x, mask)
    state = memory.init_state(x.shape[0])
    key_x = None if memory.key_mix is None else memory.key_mix(x, state["key_tail"], mask)[0]
    keys, values, theta, eta, kept, written = memory._chunk_inputs(x, mask, key_x, value_x)
    weights = [rearrange(state[f"w{l}"], "b h i o -> (b h) i o") for l in range(memory.layers)]
    moments = [torch.zeros_like(w) for w in weights]
    surprise_of = vmap(grad(memory._chunk_loss))
    update_norms, weight_norms = [], []
    for c in range(keys.shape[0]):
        u = surprise_of({f"weights.{l}": w for l, w in enumerate(weights)}, keys[c], values[c], -theta[c])
        if memory.config.max_surprise is not None:
            u = memory._bounded(u)
        update_norms.append(torch.sqrt(sum(t.square().sum((1, 2)) for t in u.values())))
        moments = [torch.addcmul(u[f"weights.{l}"], eta[c], s) for l, s in enumerate(moments)]
        weights = [torch.addcmul(written[c] * s, kept[c], w) for w, s in zip(weights, moments)]
        weight_norms.append(torch.sqrt(sum(w.square().sum((1, 2)) for w in weights)))
    return torch.stack(update_norms), torch.stack(weight_norms)  # chunks × (rows·heads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--checkpoint", default="best", help="best, last, a step number or a folder under RUN_DIR/checkpoints")
    parser.add_argument("--steps", default="1,2,3", help="training steps (1-based, as the progress bar counts) to replay")
    parser.add_argument("--max-surprise", default=None, help="override memory.max_surprise: a number or 'none'")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from graftkit.checkpoint import load_run
    from graftkit.protocol import HiddenCache
    from graftkit.task import build_task
    from graftkit.train import build_buckets

    run = Path(args.run_dir)
    recipe, graft, _ = load_run(run, args.checkpoint)
    if recipe.memory.kind != "titans":
        raise SystemExit(f"{run}: memory is {recipe.memory.kind!r}; this script replays Titans writes only")
    if args.max_surprise is not None:
        bound = None if args.max_surprise.lower() == "none" else float(args.max_surprise)
        graft.memory.config = graft.memory.config.model_copy(update={"max_surprise": bound})
    buckets = build_buckets([build_task(c) for c in recipe.task_configs()], graft.backbone.tokenizer, "train")
    keys, cache, cfg = sorted(buckets), HiddenCache(graft, "auto"), recipe.train
    print(f"{run} {args.checkpoint}, max_surprise {graft.memory.config.max_surprise}")
    if graft.memory.value_mix is not None:  # value_span: how far the learned window looks ahead
        rows = graft.memory.value_mix.weight.detach().abs().mean(1).tolist()
        print("value_span window, mean |weight| per row (0 = the token itself): " + " ".join(f"{v:.3f}" for v in rows))
    for step in (int(s) for s in args.steps.split(",")):
        rng = np.random.default_rng([cfg.seed, step - 1, 0, 0])  # as train() draws micro-batch 0 on rank 0
        key = keys[rng.integers(len(keys))]
        bucket = buckets[key]
        samples = [bucket[i] for i in rng.choice(len(bucket), size=min(cfg.batch_size, len(bucket)), replace=False)]
        hidden, mask = cache.get(samples)
        with torch.no_grad():
            updates, norms = replay(graft, hidden, mask)
        healthy = torch.isfinite(norms[-1])
        good = updates[:, healthy]
        print(
            f"step {step} ({key[0]} {key[1]}): {int(healthy.sum())}/{healthy.numel()} heads finite; "
            f"chunk update norm median {good.median():.3g}, p99 {good.quantile(0.99):.3g}, max {good.max():.3g}; "
            f"weight norm at start {norms[0, healthy].median():.3g}, max {norms[:, healthy].max():.3g}"
        )
        for head in (~healthy).nonzero().flatten().tolist():
            trail = " ".join(f"{v:.2g}" for v in norms[:, head].tolist())
            print(f"  row·head {head} diverges; weight norm by chunk: {trail}")


if __name__ == "__main__":
    main()
