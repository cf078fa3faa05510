"""Classify a graft's wrong qa1 answers: another person's location, the person's earlier location, or neither.

Reads the `predictions.jsonl` that `graftkit eval` writes, rebuilds the evaluated samples (same data
seed + the evaluation offset) to see their facts, and counts the wrong outputs by kind.

    python bench/qa1_errors.py RUN_DIR/eval/predictions.jsonl --length 1k --n 200 [--recipe RUN_DIR/recipe.yaml]
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path


def location(fact: str) -> str:
    return fact.rstrip(". ").split()[-1].lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions")
    parser.add_argument("--length", default="1k")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--recipe", default=None, help="default: recipe.yaml of the run the predictions belong to")
    args = parser.parse_args()

    from graftkit.api import load_backbone
    from graftkit.data.babilong import build_babilong
    from graftkit.evaluate import EVAL_SEED_OFFSET
    from graftkit.recipe import load_recipe

    path = Path(args.predictions)
    recipe = load_recipe(args.recipe or path.parent.parent / "recipe.yaml")
    backbone = load_backbone({"kind": recipe.backbone.kind, **recipe.backbone.options()})
    samples = build_babilong("qa1", "test", args.length, args.n, seed=recipe.data.seed + EVAL_SEED_OFFSET,
                             tokenizer=backbone.tokenizer, books=recipe.data.books, babi_dir=recipe.data.babi_dir)
    by_uid = {s.uid: s for s in samples}
    counts = collections.Counter()
    for line in path.read_text().splitlines():
        p = json.loads(line)
        if p["row"] != "graft" or p["task"] != "qa1" or p["length"] != args.length:
            continue
        sample = by_uid.get(p["uid"])
        if sample is None:
            counts["sample not rebuilt (other --n or seed?)"] += 1
        elif p["correct"]:
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
    for kind, count in counts.most_common():
        print(f"{count:5d}  {kind}")


if __name__ == "__main__":
    main()
