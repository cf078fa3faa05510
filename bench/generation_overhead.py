"""Greedy generation speed of a grafted backbone against the bare backbone.

The graft is built from `--recipe` (default: the `make train` default, `recipes/smollm2_linear_mid_layer.yaml`:
SmolLM2-135M-Instruct, a linear memory read at layer 7 by a `mid_layer` injector), untrained, in eval mode,
its gates opened a little so the gated path is the one a trained graft takes; its memory is written from a
~1k-token story. The bare side is `backbone.model` driven by the same greedy loop as `Graft.generate`
(prefill, then one token at a time with its own KV cache, mask and position ids), so the difference is
the graft's own work: the memory read in each forward pass (at every position, the new tokens of
cached generation included), plus any memory tokens the injector adds to the prompt (a
`layer0_soft_prompt` injector's soft prompt; the default adds none).

Both sides generate exactly `--new-tokens` tokens: a hook on the LM head masks the end-of-sequence
ids for both. Bare and grafted calls alternate (N-token and 1-token calls of each side in turn); each
cell is the median over `--runs` timed runs, after one warm-up each. tok/s counts the new tokens of
all rows over the whole call, prefill included; decode tok/s leaves the prefill out, as
(N - 1) tokens per row over the difference between the N-token and the 1-token call.

On a shared machine `--threads 1` gives steadier numbers: idle OpenMP threads spin when other
processes hold the cores.

    python bench/generation_overhead.py            # batch 1 and 8, 32 new tokens, 7 runs
    python bench/generation_overhead.py --quick    # batch 1 only, 8 new tokens, 3 runs
    python bench/generation_overhead.py --recipe recipes/experiments/smollm2_titans_layer0.yaml
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from common import add_recipe_option, no_eos
from graftkit.injectors.xattn import TanhGate

from graftkit.api import build_graft
from graftkit.graft import pad, positions
from graftkit.kv_cache import cache_kwargs, output_cache
from graftkit.state import MemoryState

QUESTIONS = [
    "Where is Mary?",
    "Where is the football?",
    "Where was John before the garden?",
    "Who went to the kitchen last?",
    "Where is Sandra now?",
    "What is Daniel carrying?",
    "Where did the apple go?",
    "Is Daniel in the office?",
]
PEOPLE = ["Mary", "John", "Sandra", "Daniel"]
PLACES = ["kitchen", "garden", "office", "hallway", "bathroom", "bedroom"]
VERBS = ["went to", "moved to", "journeyed to", "travelled to", "went back to"]


def story(tokenizer, tokens: int = 1000, seed: int = 0) -> str:
    """A bAbI-style story of at least `tokens` tokens."""
    rng = random.Random(seed)
    sentences: list[str] = []
    while len(tokenizer(" ".join(sentences), add_special_tokens=False)["input_ids"]) < tokens:
        sentences += [f"{rng.choice(PEOPLE)} {rng.choice(VERBS)} the {rng.choice(PLACES)}." for _ in range(20)]
    return " ".join(sentences)


@torch.no_grad()
def bare_generate(model, input_ids, attention_mask, max_new_tokens: int) -> torch.Tensor:
    """The loop of `Graft.generate` on the bare model: prefill (last position's logits only), then one
    cached step per token."""
    mask, pos = attention_mask, positions(attention_mask)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    new = []
    for _ in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)
        new.append(token)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=pos, **cache_kwargs(output_cache(out)), use_cache=True)
    return torch.stack(new, dim=1)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_recipe_option(parser)
    parser.add_argument("--quick", action="store_true", help="batch 1 only, 8 new tokens, 3 runs")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per cell (median reported)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.new_tokens, args.batches = 3, 8, [1]
    return args


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    graft = build_graft(args.recipe).eval()
    backbone = graft.backbone
    with torch.no_grad():
        for module in graft.injector.modules():
            if isinstance(module, TanhGate):
                module.bias.fill_(0.5)
    text = story(backbone.tokenizer)
    n_context = len(backbone.text_ids(text))
    with torch.no_grad():
        one = graft.memorize([text]).detach()
    handle = no_eos(backbone)

    rows = []
    for batch in args.batches:
        questions = [backbone.chat_ids(QUESTIONS[i % len(QUESTIONS)]) for i in range(batch)]
        ids, mask = pad(questions, backbone.tokenizer.pad_token_id, side="left", device=backbone.device)
        state = MemoryState.stack([one] * batch)
        runs = {("bare", n): (lambda n=n: bare_generate(backbone.model, ids, mask, n)) for n in (1, args.new_tokens)} | {
            ("graft", n): (lambda n=n: graft.generate(ids, state, mask, max_new_tokens=n)) for n in (1, args.new_tokens)
        }
        for (side, n), run in runs.items():  # warm-up, and every run really generates n tokens per row
            assert run().shape == (batch, n), (side, n)
        times = {key: [] for key in runs}
        for _ in range(args.runs):
            for key, run in runs.items():
                times[key].append(timed(run))
        t = {key: statistics.median(values) for key, values in times.items()}
        n = args.new_tokens
        tps = {side: batch * n / t[side, n] for side in ("bare", "graft")}
        decode = {side: batch * (n - 1) / (t[side, n] - t[side, 1]) for side in ("bare", "graft")}
        rows.append((batch, ids.shape[1], t["bare", 1], t["graft", 1], tps, decode))
    handle.remove()

    print(
        f"\n{args.recipe.name}, untrained: {backbone.config.source} ({backbone.dtype}, torch threads: "
        f"{torch.get_num_threads()}), {graft.memory.name} memory written from {n_context} tokens, {graft.injector.name} "
        f"injector; {args.new_tokens} new tokens per row; medians of {args.runs} alternating runs.\n"
        "tok/s counts all rows' new tokens over the whole call (prefill included); decode tok/s leaves out the "
        "prefill (time of a 1-token call).\n"
    )
    print(
        "| batch | question tokens | 1-token call ms bare / grafted | tok/s bare | tok/s grafted | grafted / bare "
        "| decode tok/s bare | decode tok/s grafted | decode grafted / bare |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch, width, pre_bare, pre_graft, tps, decode in rows:
        print(
            f"| {batch} | {width} | {pre_bare * 1e3:.0f} / {pre_graft * 1e3:.0f} | {tps['bare']:.1f} | {tps['graft']:.1f} "
            f"| {tps['graft'] / tps['bare']:.2f}x | {decode['bare']:.1f} | {decode['graft']:.1f} "
            f"| {decode['graft'] / decode['bare']:.2f}x |"
        )


if __name__ == "__main__":
    main()
