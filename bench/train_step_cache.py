"""Training step time with and without the turn-1 hidden-state cache.

The graft is built from `--recipe` (default: the `make train` default, `recipes/smollm2_linear_mid_layer.yaml`),
with its batch size. One training step = turn-1 hidden states (read from the cache, or computed by the
frozen backbone up to the write layer) -> memory write -> turn-2 forward/backward -> optimizer step: the
two-turn answer loss only, without the recipe's auxiliary losses. Both variants run in one process,
alternating, on the same batches; the median of the repeats is reported, and the cached step's median
per part (where the time goes once the cache has removed the context pass).

    python bench/train_step_cache.py [--recipe recipes/smollm2_linear_mid_layer.yaml] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import add_recipe_option

PARTS = ("hidden states + turn-2 batch", "memory write", "turn-2 forward", "backward (both)", "optimizer")


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_recipe_option(parser)
    parser.add_argument("--length", default="1k", help="BABILong length of the training contexts")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="2 repeats")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else args.repeats

    from graftkit.api import build_graft
    from graftkit.data.babilong import build_babilong
    from graftkit.protocol import HiddenCache, turn2_batch
    from graftkit.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    torch.manual_seed(0)
    graft = build_graft(recipe)
    batch_size = recipe.train.batch_size
    samples = build_babilong("qa1", "train", args.length, batch_size * repeats, seed=0, tokenizer=graft.backbone.tokenizer)
    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    optimizer = torch.optim.AdamW(graft.trainable_parameters(), lr=1e-4)
    with tempfile.TemporaryDirectory() as tmp:
        cached = HiddenCache(graft, tmp)
        cached.fill(samples)  # the first epoch pays this once
        uncached = HiddenCache(graft, None)

        parts = {name: [] for name in PARTS}  # the cached steps, part by part

        def step(cache, items, record: bool = False) -> float:
            # what graftkit.train.TwoTurn does in one forward (write, then turn 2), in two timed calls
            marks = [time.perf_counter()]
            hidden, mask = cache.get(items)
            batch = turn2_batch(graft.backbone, items, with_answers=True)
            marks.append(time.perf_counter())
            state = graft.write_hidden(hidden, mask)
            marks.append(time.perf_counter())
            out = graft(state=state, **batch)
            marks.append(time.perf_counter())
            out.loss.backward()
            marks.append(time.perf_counter())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            marks.append(time.perf_counter())
            if record:
                for name, begin, end in zip(PARTS, marks, marks[1:]):
                    parts[name].append(end - begin)
            return marks[-1] - marks[0]

        step(cached, batches[0])  # warm-up (first torch.func call, prefix keys/values)
        times = {"cached": [], "uncached": []}
        for items in batches:
            times["uncached"].append(step(uncached, items))
            times["cached"].append(step(cached, items, record=True))
    c, u = statistics.median(times["cached"]), statistics.median(times["uncached"])
    print(
        f"threads {torch.get_num_threads()}, batch {batch_size} x {args.length} contexts, write layer "
        f"{graft.memory.config.write_layer}, {repeats} alternating repeats"
    )
    print("| variant | median step s | all |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    print(f"speed-up with the cache: {u / c:.2f}x (target >= 3x)")
    print("cached step, median per part: " + ", ".join(f"{name} {statistics.median(v):.2f} s" for name, v in parts.items()))


if __name__ == "__main__":
    main()
