"""How much a trained graft's memory writes: per-token write strengths summed over BABILong test contexts.

For each length: the write mass per head (the strengths summed over a context, averaged over contexts;
a token written at full strength counts 1), how many tokens each head writes at strength ≥ 0.5, and
the mean strength on the qa1 fact tokens against the background tokens. This is the quantity
`train.write_cost` puts a cost on; with a memory that never forgets (linear, `decay: false`) it is
what a long context wears the stored facts with. Turn-1 states come from the hidden-state cache when
`graftkit eval` has filled it, else from the backbone.

    python research/write_mass.py RUN_DIR [key=value ...] [--checkpoint best] [--lengths 1k,4k,16k] [--n 10] [--threads N] [--top K]

`key=value` change the run's recipe for this measurement, as with `graftkit eval` (e.g.
`memory.write_floor=0.5`: the strengths are then the floored ones the memory writes with). `--top K`
also lists, per length, which tokens the K strongest writes of each context (strengths summed over
heads; tokens that write nothing left out) fall on, counted by token text, facts and background apart.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from run_cli import run, run_parser


def main() -> None:
    parser = run_parser(__doc__, lengths="1k,4k,16k", n=10, n_help="test contexts per length")
    parser.add_argument("--top", type=int, default=0, help="list the tokens of each context's K strongest writes")
    run("write_mass", measure, parser.parse_args())


def measure(args) -> None:
    from graftkit.checkpoint import load_run
    from graftkit.data.babilong import build_babilong, fact_token_mask
    from graftkit.evaluate import EVAL_SEED_OFFSET
    from graftkit.protocol import HiddenCache
    from graftkit.recipe import writes_with_strengths

    recipe, graft, info = load_run(args.run_dir, args.checkpoint, overrides=args.overrides)
    graft.eval()  # the strengths the memory writes with at inference (e.g. under a write floor)
    if not writes_with_strengths(type(graft.memory)):
        raise SystemExit(f"memory {recipe.memory.kind!r} reports no per-token write strengths")
    cache = HiddenCache(graft, "auto")
    tokenizer = graft.backbone.tokenizer
    changed = f", {' '.join(args.overrides)}" if args.overrides else ""
    print(f"{args.run_dir} ({args.checkpoint}: step {info.get('step')}{changed}), memory {recipe.memory.kind}, n = {args.n} per length")
    for length in args.lengths.split(","):
        samples = build_babilong(
            recipe.task_configs()[0].tasks[0],
            "test",
            length,
            args.n,
            seed=recipe.task_configs()[0].seed + EVAL_SEED_OFFSET,
            tokenizer=tokenizer,
            books=recipe.task_configs()[0].books,
            babi_dir=recipe.task_configs()[0].babi_dir,
        )
        masses, strong, on_facts, off_facts = [], [], [], []
        top = {True: Counter(), False: Counter()}  # in a fact: token text -> count
        for sample in samples:
            with torch.no_grad():
                hidden, mask = cache.get([sample]) if cache.has(sample) else (graft.context_hidden(*graft.tokenize_context([sample.context])), None)
                strengths = graft.write_strengths(hidden)[0].float().numpy()  # n heads
            masses.append(strengths.sum(0))
            strong.append((strengths >= 0.5).sum(0))
            encoding = tokenizer(sample.context, add_special_tokens=False, return_offsets_mapping=True)
            facts = fact_token_mask(sample, encoding["offset_mapping"][: strengths.shape[0]])
            total = strengths.sum(1)
            for i in np.argsort(-total)[: args.top]:
                if total[i] > 0:  # under a floor, fewer than K tokens may write at all
                    top[bool(facts[i])][tokenizer.decode([encoding["input_ids"][i]])] += 1
            if facts.any() and (~facts).any():
                on_facts.append(strengths[facts].mean())
                off_facts.append(strengths[~facts].mean())
        per_head = np.mean(masses, 0)
        print(f"{length:>4}: write mass {per_head.mean():7.1f} per head  [{' '.join(f'{m:.1f}' for m in per_head)}]")
        print(
            f"      tokens written at >= 0.5 per head [{' '.join(f'{c:.0f}' for c in np.mean(strong, 0))}]; "
            f"mean strength on fact tokens {np.mean(on_facts):.3f}, on background {np.mean(off_facts):.3f}"
        )
        for in_fact, title in ((True, "facts"), (False, "background")):
            if args.top:
                listed = ", ".join(f"{text!r} {count}" for text, count in top[in_fact].most_common(12))
                print(f"      strongest {args.top} per context, on {title} ({sum(top[in_fact].values())}): {listed}")


if __name__ == "__main__":
    main()
