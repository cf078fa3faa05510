"""Classify a graft's wrong qa1 answers: another person's location, the person's earlier location, or neither.

Reads the `predictions.jsonl` that `graftkit eval` writes, rebuilds the evaluated samples (same data
seed + the evaluation offset) to see their facts, and counts the wrong outputs by kind. With
`--after`, it also gives the accuracy by how many context tokens follow the answer's supporting fact,
that is, how much the memory writes after it: with a memory that never forgets, everything written later
can wear the fact out. With `--later`, the accuracy by how many of the story's facts follow it (0, 1, 2 or
more), and how many wrong answers name the place of one of those later facts; this depends on the bAbI
question only, not on the length, so two lengths' evaluations of the same questions compare question by
question (at 1k, 4k and 16k the first 100 test questions are the same).

    python research/qa1_errors.py RUN_DIR/eval/predictions.jsonl --length 1k --n 200 [--recipe RUN_DIR/recipe.yaml] [--row graft] [--after] [--later]
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

#: Upper edges (in tokens) of the `--after` bins; the last bin is open.
AFTER_EDGES = (1000, 2000, 4000, 8000)


def location(fact: str) -> str:
    return fact.rstrip(". ").split()[-1].lower()


def answer_index(sample) -> int:
    """Index in `sample.facts` of the last telling of the last supporting fact."""
    told = [i for i, fact in enumerate(sample.facts) if fact == sample.supporting_facts[-1]]
    if not told:
        raise SystemExit(f"qa1_errors: the supporting fact of {sample.source} is not among its facts")
    return told[-1]


def tokens_after_answer(sample, tokenizer) -> int:
    """Context tokens after the end of the answer's fact (`answer_index`) in the sample's context."""
    text, position, last = sample.context, 0, answer_index(sample)
    for fact in sample.facts[: last + 1]:  # facts appear in story order
        start = text.find(fact, position)
        if start < 0:
            raise SystemExit(f"qa1_errors: a fact of {sample.source} is not in its context: {fact!r}")
        position = start + len(fact)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return sum(1 for a, _ in offsets if a >= position)


def bin_label(tokens: int) -> str:
    lower = 0
    for edge in AFTER_EDGES:
        if tokens < edge:
            return f"{lower}-{edge}"
        lower = edge
    return f"{lower}+"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions")
    parser.add_argument("--length", default="1k")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--recipe", default=None, help="default: recipe.yaml of the run the predictions belong to")
    parser.add_argument("--row", default="graft", help="which row of the predictions to read (default: graft)")
    parser.add_argument("--after", action="store_true", help="accuracy by context tokens after the answer's fact")
    parser.add_argument("--later", action="store_true", help="accuracy by the story's facts after the answer's fact")
    args = parser.parse_args()

    from graftkit.api import load_backbone
    from graftkit.data.babilong import build_babilong
    from graftkit.errors import GraftkitError
    from graftkit.evaluate import EVAL_SEED_OFFSET
    from graftkit.recipe import load_recipe

    path = Path(args.predictions)
    if not path.is_file():
        raise SystemExit(f"qa1_errors: {path}: no such predictions file")
    try:
        recipe = load_recipe(args.recipe or path.parent.parent / "recipe.yaml")
    except GraftkitError as exc:
        raise SystemExit(f"qa1_errors: {exc} (give the run's recipe with --recipe)") from None
    backbone = load_backbone({"kind": recipe.backbone.kind, **recipe.backbone.options()})
    samples = build_babilong(
        "qa1",
        "test",
        args.length,
        args.n,
        seed=recipe.task_configs()[0].seed + EVAL_SEED_OFFSET,
        tokenizer=backbone.tokenizer,
        books=recipe.task_configs()[0].books,
        babi_dir=recipe.task_configs()[0].babi_dir,
    )
    by_uid = {s.uid: s for s in samples}
    counts = collections.Counter()
    after = collections.defaultdict(list)  # bin -> correct flags
    later = collections.defaultdict(list)  # 0, 1, 2 (2 or more) -> correct flags
    wrong, taken_over = 0, 0  # wrong answers; of them, those naming the place of a fact told after the answer's
    for line in path.read_text().splitlines():
        p = json.loads(line)
        if p["row"] != args.row or p["task"] != "qa1" or p["length"] != args.length:
            continue
        sample = by_uid.get(p["uid"])
        if sample is None:
            counts["sample not rebuilt (other --n or seed?)"] += 1
            continue
        if args.after:
            after[bin_label(tokens_after_answer(sample, backbone.tokenizer))].append(bool(p["correct"]))
        if args.later:
            index = answer_index(sample)
            later[min(len(sample.facts) - 1 - index, 2)].append(bool(p["correct"]))
            if not p["correct"]:
                wrong += 1
                taken_over += any(location(f) in p["output"].lower() for f in sample.facts[index + 1 :])
        if p["correct"]:
            counts["right"] += 1
        else:
            person = p["question"].rstrip("?").split()[-1]
            output = p["output"].lower()
            own = {location(f) for f in sample.facts if f.split()[0] == person}
            other = {location(f) for f in sample.facts if f.split()[0] != person}
            if any(place in output for place in own):
                counts["the person's earlier location"] += 1
            elif any(place in output for place in other):
                counts["another person's location"] += 1
            else:
                counts["not a location of the story"] += 1
    if not counts:
        raise SystemExit(f"qa1_errors: no {args.row!r} qa1 predictions at {args.length} in {path}")
    for kind, count in counts.most_common():
        print(f"{count:5d}  {kind}")
    if args.after:
        print("tokens after the answer's fact | right | of")
        for label in sorted(after, key=lambda b: int(b.split("-")[0].rstrip("+"))):
            flags = after[label]
            print(f"{label:>30} | {sum(flags) / len(flags):5.1%} | {len(flags)}")
    if args.later:
        print("story facts after the answer's fact | right | of")
        for count in sorted(later):
            flags = later[count]
            print(f"{str(count) + ('+' if count == 2 else ''):>35} | {sum(flags) / len(flags):5.1%} | {len(flags)}")
        print(f"wrong answers naming the place of a fact told after the answer's: {taken_over} of {wrong}")


if __name__ == "__main__":
    main()
