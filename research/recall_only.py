"""Can the memory learn to recall bAbI answers on its own? Train it on recall alone, no backbone pass.

A fresh graft from a recipe whose injector reads the memory at every position (`direct_read`). Per
step: write the cached turn-1 hidden states of a training batch, read the memory once per sample with
the injector's own query (`to_query` of the frozen backbone's state at the injector's depth, on the
question's name token, the instruction before it), and classify the read into the task's locations
with a linear head. Only the memory, `to_query` and the head learn (AdamW at the recipe's `train.lr`,
constant; batches drawn as `graftkit train` draws them); no turn-2 pass through the frozen
stack, so a step costs the write and its backward. Held-out accuracy is on the test-split samples
`graftkit eval` uses (data seed + 1). It separates what the memory can store and give back from what
the backbone makes of it: `graftkit train` reaching about the same accuracy means the memory is the
limit.

`--query mean` reads at every position of the question part instead and averages the reads (no
task-specific position; any task, the head over every answer in the training data); `--query mixture`
classifies each question position's read and mixes the distributions, as `graftkit train`'s recall
stage (`train.recall_steps`) does; `--query attention` weighs the question positions' reads by a learned
score of each position's query state (softmax over the question) and classifies the weighted read, so
training can find the position that asks (the name) without being told where it is.

`--save FILE` writes the graft's tensors after the last step (memory and injector; the head is left
out), in the layout `train.init_from` reads, so `graftkit train` can start from the recalled memory.

    python research/recall_only.py RECIPE [key=value ...] [--steps 600] [--every 100] [--test 200] [--save FILE] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F


class _Stop(Exception):
    pass


@torch.no_grad()
def name_states(graft, samples, batch_size: int = 16, whole: bool = False) -> dict[str, torch.Tensor]:
    """Per sample uid, the hidden state (d) entering the injector's hook at the question's name token
    (`whole`: the states (t d) at every position of the question part).

    The shared instruction runs once (the graft's prefix cache); each batch runs only its question
    parts, and only up to the injector's layer."""
    from graftkit.kv_cache import cache_kwargs
    from graftkit.protocol import question_parts
    from graftkit.recall import last_word_position

    backbone, tok = graft.backbone, graft.backbone.tokenizer
    grabbed = []

    def grab(module, args, output):
        grabbed.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    states = {}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        parts = [question_parts(backbone, s) for s in chunk]
        where = [last_word_position(backbone, s) for s in chunk]  # qa1: the name asked about
        width = max(len(q) for _, q in parts)
        ids = torch.tensor([q + [tok.pad_token_id] * (width - len(q)) for _, q in parts])
        mask = (torch.arange(width)[None] < torch.tensor([len(q) for _, q in parts])[:, None]).long()
        cache, full_mask, pos = graft._layout(graft.prefix_kv(parts[0][0]), mask)  # the prefix runs the whole stack
        grabbed.clear()
        handle = backbone.layers[graft.injector.layer].register_forward_hook(grab)
        try:
            backbone.model.model(input_ids=ids, attention_mask=full_mask, position_ids=pos, **cache_kwargs(cache), use_cache=True)
        except _Stop:
            pass
        finally:
            handle.remove()
        if whole:
            states.update({s.uid: grabbed[0][i, : len(q)].float() for i, (s, (_, q)) in enumerate(zip(chunk, parts))})
        else:
            states.update({s.uid: grabbed[0][i, w].float() for i, (s, w) in enumerate(zip(chunk, where))})
    return states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=100, help="evaluate every N steps")
    parser.add_argument("--test", type=int, default=200, help="held-out samples at 1k")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--query",
        choices=["name", "mean", "mixture", "attention"],
        default="name",
        help="read once at the name token, or at every question position: average the reads, mix their "
        "classifications, or weigh them by a learned score",
    )
    parser.add_argument("--save", default=None, help="write the graft tensors (safetensors) after the last step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from graftkit.api import build_graft
    from graftkit.checkpoint import save_graft_tensors
    from graftkit.data.babilong import build_babilong
    from graftkit.evaluate import EVAL_SEED_OFFSET
    from graftkit.protocol import HiddenCache
    from graftkit.recall import answer_logprobs
    from graftkit.recipe import load_recipe
    from graftkit.task import build_task
    from graftkit.train import build_buckets

    recipe = load_recipe(args.recipe, args.overrides)
    torch.manual_seed(recipe.train.seed)
    graft = build_graft(recipe)
    if not (isinstance(getattr(graft.injector, "layer", None), int) and getattr(graft.injector, "to_query", None) is not None):
        raise SystemExit("injector: recall_only needs an injector that reads at a decoder layer with direct_read (mid_layer)")
    if args.query == "name" and recipe.task_configs()[0].tasks != ["qa1"]:
        raise SystemExit(f"data.tasks: recall_only reads the name in qa1 questions; got {recipe.task_configs()[0].tasks}")
    tok = graft.backbone.tokenizer
    train = build_buckets([build_task(c) for c in recipe.task_configs()], tok, "train")
    test = [
        s
        for task in recipe.task_configs()[0].tasks
        for s in build_babilong(task, "test", "1k", args.test, seed=recipe.task_configs()[0].seed + EVAL_SEED_OFFSET, tokenizer=tok)
    ]
    cache = HiddenCache(graft)
    for bucket in [*train.values(), test]:
        cache.fill(bucket)
    started = time.perf_counter()
    queries = name_states(graft, [s for bucket in [*train.values(), test] for s in bucket], whole=args.query != "name")
    print(f"question states of {len(queries)} samples in {time.perf_counter() - started:.0f} s")
    places = sorted({s.target for bucket in train.values() for s in bucket})
    head = torch.nn.Linear(graft.backbone.hidden_size, len(places))
    injector = graft.injector
    score = torch.nn.Linear(graft.backbone.hidden_size, 1)  # only --query attention uses it
    params = [*graft.memory.parameters(), *injector.to_query.parameters(), *head.parameters(), *score.parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe.train.lr)

    def logits(samples) -> torch.Tensor:
        hidden, mask = cache.get(samples)
        state = graft.write_hidden(hidden, mask)
        if args.query == "name":
            query = injector.to_query(injector.normalize_query(torch.stack([queries[s.uid] for s in samples])[:, None]))
            return head(graft.memory.read(query, state)[:, 0].float())
        states = torch.nn.utils.rnn.pad_sequence([queries[s.uid] for s in samples], batch_first=True)
        kept = (torch.arange(states.shape[1])[None] < torch.tensor([len(queries[s.uid]) for s in samples])[:, None]).float()
        normed = injector.normalize_query(states)
        reads = graft.memory.read(injector.to_query(normed), state).float()
        if args.query == "attention":
            weights = torch.softmax(score(normed).squeeze(-1).float().masked_fill(kept == 0, float("-inf")), dim=1)
            return head((weights[..., None] * reads).sum(1))
        if args.query == "mixture":  # log-probabilities: cross_entropy's log_softmax leaves them as they are
            return answer_logprobs(head, reads, kept.bool())
        return head((reads * kept[..., None]).sum(1) / kept.sum(1, keepdim=True))

    def answers(samples) -> torch.Tensor:
        return torch.tensor([places.index(s.target) for s in samples])

    keys, right_in_training = sorted(train), []
    print(f"| step | training accuracy (last {args.every} batches) | held-out 1k (n = {len(test)}) | seconds |")
    print("|---:|---:|---:|---:|")
    for step in range(1, args.steps + 1):
        rng = np.random.default_rng([recipe.train.seed, step])
        bucket = train[keys[rng.integers(len(keys))]]
        batch = [bucket[i] for i in rng.choice(len(bucket), size=min(recipe.train.batch_size, len(bucket)), replace=False)]
        out = logits(batch)
        loss = F.cross_entropy(out, answers(batch))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.train.max_grad_norm)
        optimizer.step()
        right_in_training.append((out.argmax(-1) == answers(batch)).float().mean().item())
        if step % args.every == 0 or step == args.steps:
            with torch.no_grad():
                right = sum((logits(test[i : i + 8]).argmax(-1) == answers(test[i : i + 8])).sum().item() for i in range(0, len(test), 8))
            print(
                f"| {step} | {np.mean(right_in_training[-args.every :]):.1%} | {right / len(test):.1%} | {time.perf_counter() - started:.0f} |",
                flush=True,
            )
    if args.save:
        save_graft_tensors(graft, args.save)
        print(f"graft tensors written to {args.save}")


if __name__ == "__main__":
    main()
