"""Recall latency: answering one question from memory vs the bare backbone reading the full context.

For each context length (BABILong qa1 test samples built with `prompt_reserve=0`, so the context itself
has that many tokens) this times the graft `--recipe` builds (default: the `make train` default,
`recipes/smollm2_linear_mid_layer.yaml`: the embedded SmolLM2-135M-Instruct, a linear memory written from
layer 8, a `mid_layer` injector), in eval mode:

- turn 1, memorize: the frozen backbone up to the write layer over the context, then the memory write
  (reported separately; it is paid once per text, not per question);
- turn 2, answer from memory: the chat-templated question prompt alone (its length does not depend on
  the context), read against the written state, greedy decoding of exactly `--new-tokens` tokens;
- the bare backbone answering with the official full-context prompt: prefill over context + prompt (in
  chunks of `--prefill-chunk` tokens with a KV cache, so memory stays bounded; the compute is the full
  causal attention all the same), then the same greedy decoding.

Both decoders generate exactly `--new-tokens` tokens: a hook on the LM head masks the end-of-sequence
ids. Each cell is the median of `--runs` timed runs, after one warm-up of every path at the first length.

The graft is untrained (fresh weights from the recipe): timings do not depend on the weights, but the
answers mean nothing. SmolLM2 has an 8192-token window: past it the full-context run is timed as what it
costs to push that many tokens through the model, and its answer is meaningless too.

    python bench/recall_latency.py            # 1k, 4k, 16k tokens, 3 runs
    python bench/recall_latency.py --quick    # 1k and 4k, 3 runs
    python bench/recall_latency.py --recipe recipes/experiments/smollm2_titans_layer0.yaml
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import add_recipe_option, no_eos

from graftkit.api import build_graft
from graftkit.data.babilong import build_babilong
from graftkit.data.prompts import full_context_prompt, question_prompt
from graftkit.data.tasks import parse_length
from graftkit.graft import positions
from graftkit.kv_cache import cache_kwargs, output_cache

TASK = "qa1"


@torch.no_grad()
def bare_answer(model, ids: torch.Tensor, new_tokens: int, chunk: int) -> torch.Tensor:
    """Greedy decoding on the bare model: chunked prefill with a KV cache, then one cached step per token."""
    mask = torch.ones_like(ids)
    pos = positions(mask)
    cache, out = None, None
    for start in range(0, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        out = model(
            input_ids=ids[:, start:end],
            attention_mask=mask[:, :end],
            position_ids=pos[:, start:end],
            **cache_kwargs(cache),
            use_cache=True,
            logits_to_keep=1,
        )
        cache = output_cache(out)
    new = []
    for _ in range(new_tokens):
        token = out.logits[:, -1].argmax(-1)
        new.append(token)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(
            input_ids=token[:, None], attention_mask=mask, position_ids=positions(mask)[:, -1:], **cache_kwargs(output_cache(out)), use_cache=True
        )
    return torch.stack(new, dim=1)


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_recipe_option(parser)
    parser.add_argument("--quick", action="store_true", help="lengths 1k and 4k only")
    parser.add_argument("--lengths", nargs="+", default=["1k", "4k", "16k"])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per cell, median reported (at least 3)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prefill-chunk", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths = ["1k", "4k"]
    args.runs = max(3, args.runs)
    return args


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    graft = build_graft(args.recipe).eval()
    backbone = graft.backbone
    window = backbone.model.config.max_position_embeddings
    handle = no_eos(backbone)
    rows = []
    for index, length in enumerate(args.lengths):
        sample = build_babilong(TASK, "test", length, 1, seed=0, tokenizer=backbone.tokenizer, prompt_reserve=0)[0]
        context_ids = backbone.text_ids(sample.context)
        question = backbone.chat_ids(question_prompt(TASK, sample.question))
        question_ids = torch.tensor([question], device=backbone.device)
        full = torch.tensor([backbone.chat_ids(full_context_prompt(TASK, sample.context, sample.question))], device=backbone.device)

        def memorize():
            with torch.no_grad():
                return graft.memorize(sample.context).detach()

        state = memorize()

        def from_memory():
            return graft.generate(question_ids, state, max_new_tokens=args.new_tokens)

        def full_context():
            return bare_answer(backbone.model, full, args.new_tokens, args.prefill_chunk)

        if index == 0:  # warm-up of every path
            assert from_memory().shape[1] == args.new_tokens and full_context().shape[1] == args.new_tokens
        t_write = median_time(memorize, args.runs)
        t_memory = median_time(from_memory, args.runs)
        t_full = median_time(full_context, args.runs)
        state_mb = sum(t.numel() * t.element_size() for t in state.tensors.values()) / 2**20
        rows.append((length, len(context_ids), t_write, question_ids.shape[1], t_memory, full.shape[1], t_full, state_mb))
        print(f"  {length}: memorize {t_write:.2f}s, answer from memory {t_memory:.2f}s, full context {t_full:.2f}s", flush=True)
    handle.remove()

    print(
        f"\n{backbone.config.source} ({backbone.dtype}, {torch.get_num_threads()} threads) + untrained graft from "
        f"{args.recipe.name} ({graft.memory.name} memory, {graft.injector.name} injector); BABILong {TASK} test sample "
        f"per length (prompt_reserve=0); greedy, exactly {args.new_tokens} new tokens; median of {args.runs} runs\n"
    )
    print(
        "| context | turn 1: memorize | memory state | turn 2 input | turn 2: answer from memory | full-context input | "
        "full context: answer | full ÷ memory |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for length, n_ctx, t_write, n_q, t_memory, n_full, t_full, state_mb in rows:
        note = "" if n_full <= window else f" (beyond the {window}-token window: timing only)"
        print(
            f"| {length} ({n_ctx} tokens) | {t_write:.2f} s | {state_mb:.1f} MB | {n_q} tokens | {t_memory:.2f} s | "
            f"{n_full} tokens{note} | {t_full:.2f} s | {t_full / t_memory:.1f}× |"
        )
    first, last = rows[0], rows[-1]
    growth = last[4] / first[4]
    print(f"\nanswer from memory at {last[0]} vs {first[0]}: {growth:.2f}× (target ≤ 1.2×: {'met' if growth <= 1.2 else 'NOT met'})")
    if parse_length(last[0]) >= 16000:
        speedup = last[6] / last[4]
        print(f"full context vs memory at {last[0]}: {speedup:.1f}× slower (target ≥ 10×: {'met' if speedup >= 10 else 'NOT met'})")


if __name__ == "__main__":
    main()
