"""Whether a trained linear graft's keys tell a story's people apart, by context length.

Per qa1 fact of a test context, the key the memory writes it under, per head: the fact's token keys
weighted by their write strengths and summed (the direction a later read must match), unit length.
For every pair of facts in the same story, the cosine of those keys in the head that writes most:
pairs about the same person (whose later fact should take over the earlier one's slot) against pairs
about different people (whose overlap lets a later fact take over the read of another person). A
delta-rule write of fact g changes the read of fact f's key by about its strength times their cosine,
so the different-person mean is the interference a long context's answers suffer from. Turn-1 states
come from the hidden-state cache (`graftkit eval` fills it; what is missing is computed and stored).

    python research/key_overlap.py RUN_DIR [key=value ...] [--checkpoint best] [--lengths 1k,16k] [--n 30] [--threads N]
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from run_cli import run, run_parser


def fact_spans(sample, offsets) -> list[tuple[np.ndarray, str]]:
    """Per fact found in the context, in order: (which tokens lie inside it, its subject)."""
    text = sample.context
    starts = np.array([a + len(text[a:b]) - len(text[a:b].lstrip()) for a, b in offsets], dtype=np.int64)
    ends = np.array([b for _, b in offsets], dtype=np.int64)
    spans, position = [], 0
    for fact in sample.facts:
        start = text.find(fact, position)
        if start < 0:
            continue
        position = start + len(fact)
        inside = (starts >= start) & (ends <= position)
        if inside.any():
            spans.append((inside, fact.split()[0]))
    return spans


def fact_keys(graft, hidden: torch.Tensor, spans) -> tuple[torch.Tensor, torch.Tensor]:
    """Per fact, unit keys per head (f h e) weighted by write strength, and each fact's write mass per head (f h)."""
    memory = graft.memory
    x = graft.write_norm(hidden.float()) if graft.write_norm is not None else hidden.float()
    key_x = x
    if memory.key_mix is not None:  # keys from a window of written inputs, as `_write` computes them
        key_x, _ = memory.key_mix(x, memory.key_mix.empty_tail(x.shape[0], x.device, x.dtype), None)
    keys = F.normalize(rearrange(memory.to_keys(key_x), "b n (h e) -> b n h e", h=memory.config.heads), dim=-1)[0]
    beta = memory.write_strengths(x)[0]  # n h
    rows, masses = [], []
    for inside, _ in spans:
        where = torch.from_numpy(inside[: keys.shape[0]])
        weighted = (keys[where] * beta[where][..., None]).sum(0)  # h e
        rows.append(F.normalize(weighted, dim=-1))
        masses.append(beta[where].sum(0))
    return torch.stack(rows), torch.stack(masses)


def measure(args) -> None:
    from graftkit.checkpoint import load_run
    from graftkit.data.babilong import build_babilong
    from graftkit.evaluate import EVAL_SEED_OFFSET
    from graftkit.protocol import HiddenCache

    recipe, graft, info = load_run(args.run_dir, args.checkpoint, overrides=args.overrides)
    graft.eval()
    if recipe.memory.kind != "linear":
        raise SystemExit(f"key_overlap reads the keys of a linear memory; {args.run_dir} has a {recipe.memory.kind} memory")
    cache = HiddenCache(graft, "auto")
    tokenizer = graft.backbone.tokenizer
    print(f"{args.run_dir} ({args.checkpoint}: step {info.get('step')}), n = {args.n} per length")
    print("| length | head | same person: mean cosine (pairs) | different people: mean cosine (pairs) | share of fact write mass in that head |")
    print("|---|---:|---:|---:|---:|")
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
        same, other, masses = [], [], []
        for sample in samples:
            with torch.no_grad():
                hidden, _ = cache.get([sample])
                offsets = tokenizer(sample.context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
                spans = fact_spans(sample, offsets)
                if len(spans) < 2:
                    continue
                keys, mass = fact_keys(graft, hidden, spans)
            cosines = torch.einsum("fhe,ghe->hfg", keys, keys)
            masses.append(mass.sum(0))
            for f in range(len(spans)):
                for g in range(f + 1, len(spans)):
                    (same if spans[f][1] == spans[g][1] else other).append(cosines[:, f, g])
        if not masses:
            raise SystemExit(f"key_overlap: no {length} test story has two facts found in its context")
        per_head = torch.stack(masses).sum(0)
        head = int(per_head.argmax())
        share = float(per_head[head] / per_head.sum())
        mean = lambda rows: float(torch.stack(rows)[:, head].mean()) if rows else float("nan")  # noqa: E731
        print(f"| {length} | {head} | {mean(same):.3f} ({len(same)}) | {mean(other):.3f} ({len(other)}) | {share:.0%} |")


def main() -> None:
    parser = run_parser(__doc__, lengths="1k,16k", n=30, n_help="test contexts per length")
    run("key_overlap", measure, parser.parse_args())


if __name__ == "__main__":
    main()
