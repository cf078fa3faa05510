"""What a perfect write gate would give: two-turn accuracy when the memory writes only the facts.

For each length, the same BABILong test samples as `graftkit eval` are answered twice from memory: once
with the whole context written (as `graftkit eval` does) and once with only the tokens of the story's
facts written, the book text masked out of the write (`graftkit.train.background_tokens`). The
facts keep the hidden states they have inside the long context. The gap between the two columns is what
writing book text costs; a gap between lengths in the second column would come from elsewhere.

    python research/facts_only.py RUN_DIR [key=value ...] [--checkpoint best] [--lengths 1k,16k] [--n 100] [--threads N] [--out FILE]

`key=value` change the run's recipe for this measurement, as with `graftkit eval`. `--out` writes every
answer as a line of JSON in the format of `graftkit eval`'s predictions.jsonl (row `graft` for the whole
context, `facts_only` for the facts alone), so `research/qa1_errors.py --row facts_only` can break it down.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from run_cli import run, run_parser


def main() -> None:
    parser = run_parser(__doc__, lengths="1k,16k", n=100, n_help="test samples per length")
    parser.add_argument("--out", default=None, help="write every answer to this JSONL file")
    args = parser.parse_args()
    if args.out and not Path(args.out).resolve().parent.is_dir():  # before the measurement, not after it
        raise SystemExit(f"facts_only: --out {args.out}: its folder does not exist")
    run("facts_only", measure, args)


def measure(args) -> None:
    from graftkit.checkpoint import load_run
    from graftkit.data.babilong import build_babilong
    from graftkit.data.metric import compare_answers
    from graftkit.evaluate import EVAL_SEED_OFFSET
    from graftkit.objectives.write import background_tokens
    from graftkit.progress import bar
    from graftkit.protocol import HiddenCache, turn2_batch

    recipe, graft, info = load_run(args.run_dir, args.checkpoint, overrides=args.overrides)
    graft.eval()
    cache = HiddenCache(graft, "auto")
    tokenizer = graft.backbone.tokenizer
    task = recipe.task_configs()[0].tasks[0]
    changed = f", {' '.join(args.overrides)}" if args.overrides else ""
    print(f"{args.run_dir} ({args.checkpoint}: step {info.get('step')}{changed}), {task}, n = {args.n} per length")
    print("length | whole context written | facts only")
    answers = []
    for length in args.lengths.split(","):
        samples = build_babilong(
            task,
            "test",
            length,
            args.n,
            seed=recipe.task_configs()[0].seed + EVAL_SEED_OFFSET,
            tokenizer=tokenizer,
            books=recipe.task_configs()[0].books,
            babi_dir=recipe.task_configs()[0].babi_dir,
        )
        cache.fill(samples)
        right = {"graft": 0, "facts_only": 0}
        for start in bar(range(0, len(samples), 4), desc=length, leave=False):
            chunk = samples[start : start + 4]
            hidden, mask = cache.get(chunk)
            facts = mask.to(hidden.dtype) * (1 - background_tokens(tokenizer, chunk, hidden.shape[1]))
            batch = turn2_batch(graft.backbone, chunk, with_answers=False)
            for name, written in (("graft", mask), ("facts_only", facts)):
                with torch.no_grad():
                    state = graft.write_hidden(hidden, written)
                    new = graft.generate(batch["input_ids"], state, batch["attention_mask"], max_new_tokens=8, prefix_ids=batch["prefix_ids"])
                for sample, output in zip(chunk, tokenizer.batch_decode(new, skip_special_tokens=True)):
                    correct = bool(compare_answers(sample.target, output, sample.question, sample.task))
                    right[name] += correct
                    answers.append(
                        {
                            "row": name,
                            "uid": sample.uid,
                            "task": sample.task,
                            "length": sample.length,
                            "question": sample.question,
                            "target": sample.target,
                            "output": output,
                            "correct": correct,
                        }
                    )
        print(f"{length:>6} | {right['graft'] / len(samples):21.1%} | {right['facts_only'] / len(samples):10.1%}")
    if args.out:
        with open(args.out, "w") as handle:
            handle.writelines(json.dumps(answer) + "\n" for answer in answers)


if __name__ == "__main__":
    main()
