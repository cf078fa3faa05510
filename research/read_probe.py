"""Does what the memory recalls carry the answer? Linear probes on a trained graft's reads of the question.

For a run whose injector reads the memory at every position (`direct_read`), write each qa1 context,
run turn 2 (the question alone) and keep the memory's read at the asked person's name and at the last
question position. A multinomial logistic regression (the one of `binding_probe.py`) fitted on
train-split samples predicts the answer location from those reads, scored on the test-split samples
`graftkit eval` uses (data seed + 1). Next to the graft's own two-turn accuracy on the same samples it
tells where answers are lost: a probe well above the graft means the backbone does not use what the
memory returns; a probe at or below it means the memory does not return it.

    python research/read_probe.py RUN_DIR [--checkpoint best] [--length 1k] [--train 400] [--test 200] [--threads N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from binding_probe import probe


@torch.no_grad()
def collect(graft, samples, cache, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Reads (f d) at the name and at the last position, and the answers (f)."""
    from graftkit.protocol import question_parts, turn2_batch
    from graftkit.recall import last_word_position

    at_name, at_last, answers = [], [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        hidden, mask = cache.get(chunk)
        state = graft.write_hidden(hidden, mask)
        batch = turn2_batch(graft.backbone, chunk, with_answers=False)
        graft(batch["input_ids"], state, batch["attention_mask"], prefix_ids=batch["prefix_ids"])
        width = batch["input_ids"].shape[1]
        reads = graft.injector.reads[:, -width:].float()
        for row, sample in enumerate(chunk):
            _, question = question_parts(graft.backbone, sample)
            at_name.append(reads[row, width - len(question) + last_word_position(graft.backbone, sample)])
            at_last.append(reads[row, -1])
            answers.append(sample.target)
    return torch.stack(at_name), torch.stack(at_last), answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--checkpoint", default="best", help="best, last, a step number or a folder under RUN_DIR/checkpoints")
    parser.add_argument("--length", default="1k")
    parser.add_argument("--train", type=int, default=400, help="train split samples")
    parser.add_argument("--test", type=int, default=200, help="test split samples")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from graftkit.checkpoint import load_run
    from graftkit.data.babilong import build_babilong
    from graftkit.evaluate import EVAL_SEED_OFFSET
    from graftkit.injector import reads_each_position
    from graftkit.protocol import HiddenCache

    run = Path(args.run_dir)
    recipe, graft, _ = load_run(run, args.checkpoint)
    if not reads_each_position(type(graft.injector), recipe.component_config("injector")):
        raise SystemExit(f"{run}: the injector does not read the memory at every position (direct_read)")
    tok = graft.backbone.tokenizer
    cache = HiddenCache(graft)
    train = build_babilong("qa1", "train", args.length, args.train, seed=recipe.task_configs()[0].seed, tokenizer=tok)
    test = build_babilong("qa1", "test", args.length, args.test, seed=recipe.task_configs()[0].seed + EVAL_SEED_OFFSET, tokenizer=tok)
    cache.fill(train)
    cache.fill(test)
    fit, scored = collect(graft, train, cache), collect(graft, test, cache)
    both = lambda reads: torch.cat([reads[0], reads[1]], dim=-1)  # noqa: E731
    print(
        f"{run} ({args.checkpoint}), qa1 at {args.length}: probe fitted on {len(fit[2])} train samples, "
        f"scored on {len(scored[2])} test samples (chance 1/6)"
    )
    print("| read at | answer from a linear probe |")
    print("|---|---:|")
    print(f"| the name asked about | {probe(fit[0], fit[2], scored[0], scored[2]):.1%} |")
    print(f"| the last question position | {probe(fit[1], fit[2], scored[1], scored[2]):.1%} |")
    print(f"| both, concatenated | {probe(both(fit), fit[2], both(scored), scored[2]):.1%} |")


if __name__ == "__main__":
    main()
