"""`graftkit eval`: the two-turn graft against its baselines, per task and bucket, and what it preserves.

Rows per bucket: the graft (turn 1 writes the sessions, turn 2 sees the question alone), the graft
with an empty memory, the bare backbone reading the full context (the task's own prompt), the bare
backbone with the question only, and chance (tasks with a closed answer set). Each task scores with its
own scorer. The preservation row (`graftkit.preservation`) asks whether the graft leaves the backbone
alone when its memory is not asked for.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from graftkit.api import build_graft
from graftkit.backbone import Backbone
from graftkit.checkpoint import load_graft_tensors, resolve_checkpoint
from graftkit.errors import GraftkitError
from graftkit.graft import pad
from graftkit.preservation import preservation, preservation_table
from graftkit.progress import bar
from graftkit.protocol import HiddenCache, turn2_batch
from graftkit.recipe import load_recipe
from graftkit.task import Task, build_task, load_examples

ROWS = ("graft", "empty", "full_context", "question_only", "chance", "preservation")
ROW_TITLES = {
    "graft": "graft (two-turn, answers from memory)",
    "empty": "graft with an empty memory",
    "full_context": "backbone reading the full context",
    "question_only": "backbone with the question only",
    "chance": "chance",
}
#: The final evaluation builds its examples with this offset added to each task's data seed, so they are
#: not the ones the in-training evaluation used to pick the best checkpoint.
EVAL_SEED_OFFSET = 1


@torch.no_grad()
def graft_predictions(
    graft,
    task: Task,
    samples: Sequence,
    cache: HiddenCache | None,
    batch_size: int = 8,
    empty: bool = False,
    max_new_tokens: int = 8,
    progress: bool = False,
) -> list[dict]:
    """Two-turn answers: write each example's sessions, then answer its question from memory alone."""
    results = []
    for start in bar(range(0, len(samples), batch_size), desc="graft", disable=not progress, leave=False):
        chunk = samples[start : start + batch_size]
        if empty:
            state = graft.init_state(len(chunk))
        else:
            hidden, mask = cache.get(chunk) if cache is not None else _uncached(graft, chunk)
            state = graft.write_hidden(hidden, mask)
        batch = turn2_batch(graft.backbone, chunk, with_answers=False)
        new = graft.generate(batch["input_ids"], state, batch["attention_mask"], max_new_tokens=max_new_tokens, prefix_ids=batch["prefix_ids"])
        outputs = graft.backbone.tokenizer.batch_decode(new, skip_special_tokens=True)
        results += [_scored(task, s, o) for s, o in zip(chunk, outputs)]
    return results


@torch.no_grad()
def backbone_predictions(
    backbone: Backbone, task: Task, samples: Sequence, full_context: bool, batch_size: int = 4, max_new_tokens: int = 32, progress: bool = False
) -> list[dict] | None:
    """The bare backbone answering with the task's full-context prompt, or the question alone; None when a
    full-context prompt is longer than the backbone can read."""
    tok = backbone.tokenizer
    limit = getattr(backbone.model.config, "max_position_embeddings", None)
    prompts = []
    for s in samples:
        head, question = s.prompt.parts(s.question)
        prompts.append(backbone.chat_ids(task.full_context_prompt(s) if full_context else head + question))
    if limit and max(map(len, prompts)) + max_new_tokens > limit:
        return None  # the backbone cannot read this much context at all
    results = []
    for start in bar(range(0, len(samples), batch_size), desc="full context" if full_context else "question only", disable=not progress, leave=False):
        chunk = samples[start : start + batch_size]
        ids, mask = pad(prompts[start : start + batch_size], tok.pad_token_id, side="left", device=backbone.device)
        out = backbone.model.generate(  # type: ignore[operator]  # `model` is typed nn.Module
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
        outputs = tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        results += [_scored(task, s, o) for s, o in zip(chunk, outputs)]
    return results


def _uncached(graft, samples):
    return HiddenCache(graft, None).get(samples)


def _scored(task: Task, sample, output: str) -> dict:
    return {
        "uid": sample.uid,
        "task": sample.info.get("task", task.name),
        "bucket": sample.bucket,
        "length": sample.length,
        "question": sample.question,
        "target": sample.target,
        "output": output.strip(),
        "correct": bool(task.score(sample, output)),
        **({"kind": sample.info["kind"]} if "kind" in sample.info else {}),
    }


def accuracy_by_kind(predictions: Sequence[dict]) -> dict:
    """{row: {kind: {"accuracy", "n"}}} over the predictions whose task names a kind of question (e.g. `profile`:
    told, updated, untold, stranger), every bucket together."""
    groups: dict[str, dict[str, list[bool]]] = {}
    for p in predictions:
        if "kind" in p:
            groups.setdefault(p["row"], {}).setdefault(p["kind"], []).append(p["correct"])
    return {row: {kind: {"accuracy": float(np.mean(v)), "n": len(v)} for kind, v in sorted(kinds.items())} for row, kinds in groups.items()}


def chance(task: Task, samples: Sequence) -> float | None:
    """Expected accuracy of a uniform guess from the closed answer set; None for open answers."""
    label_sets = [task.labels(s) for s in samples]
    sizes = [len(labels) for labels in label_sets if labels is not None]
    if len(sizes) < len(label_sets):
        return None
    return float(np.mean([1.0 / size for size in sizes]))


def cell_names(tasks: Sequence[Task]) -> list[list[str]]:
    """Per task, the table column of each test bucket: the bucket's name, prefixed by its task's where names repeat."""
    names = [task.buckets("test") for task in tasks]
    flat = [n for per in names for n in per]
    return [[n if flat.count(n) == 1 else f"{task.name}:{n}" for n in per] for task, per in zip(tasks, names)]


def evaluate(graft, recipe, n: int, rows: Sequence[str] = ROWS, progress: bool = True) -> dict:
    """Accuracy per row and bucket of each of the recipe's tasks, and the preservation figures; returns
    {"table": {row: {cell: acc|None}}, "cells": [...], "preservation": {...}|None, "predictions": [...]}."""
    check_rows(rows)
    backbone = graft.backbone
    cache = HiddenCache(graft, "auto" if recipe.train.cache_hidden_states else None)
    tasks = [build_task(c) for c in recipe.task_configs()]
    table: dict[str, dict[str, float | None]] = {row: {} for row in rows if row != "preservation"}
    predictions, cells = [], []
    for task, names in zip(tasks, cell_names(tasks)):
        for bucket, key in zip(task.buckets("test"), names):
            cells.append(key)
            samples = load_examples(task, "test", bucket, n, backbone.tokenizer, seed_offset=EVAL_SEED_OFFSET)
            for row in table:
                if row == "chance":
                    table[row][key] = chance(task, samples)
                    continue
                if row in ("graft", "empty"):
                    if row == "graft":
                        cache.fill(samples, progress=progress)
                    got: list[dict] | None = graft_predictions(graft, task, samples, cache, empty=row == "empty", progress=progress)
                else:
                    got = backbone_predictions(backbone, task, samples, full_context=row == "full_context", progress=progress)
                if got is None:
                    table[row][key] = None
                    continue
                table[row][key] = float(np.mean([g["correct"] for g in got]))
                predictions += [{"row": row, **g} for g in got]
                if progress:
                    print(f"  {key:14} {row:14} {table[row][key]:.1%}", flush=True)
    preserved = None
    if "preservation" in rows:
        preserved = preservation(graft, n=n, progress=progress)
        predictions += [{"row": "preservation", **p} for p in preserved.pop("answers")]
    return {
        "n": n,
        "tasks": [t.describe() for t in tasks],
        "cells": cells,
        "table": table,
        "preservation": preserved,
        "kinds": accuracy_by_kind(predictions),
        "predictions": predictions,
    }


def check_rows(rows: Sequence[str]) -> None:
    """Refuse unknown rows before any weights are loaded."""
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise GraftkitError(f"--rows: unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")


def evaluate_run(run_dir, n: int = 200, checkpoint: str = "best", rows=None, progress: bool = True, out=None, overrides=()) -> dict:
    """Evaluate a training run directory and write results.{json,md}, chart.png and predictions.jsonl
    to `out` (default RUN_DIR/eval). `overrides` (`key=value`) change the run's recipe for this
    evaluation only, e.g. `data.eval_lengths=[16k]` or a memory's `write_floor`; settings that change the
    shapes of the graft's tensors are refused when its checkpoint is loaded."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise GraftkitError(f"{run_dir}: not a graftkit run directory (no recipe.yaml)")
    if n <= 0:
        raise GraftkitError(f"--n: must be a positive number of examples, got {n}")
    recipe = load_recipe(run_dir / "recipe.yaml", overrides, training=False)
    rows = rows or ROWS
    check_rows(rows)
    out = Path(out) if out else run_dir / "eval"
    try:  # before the evaluation: its results must have somewhere to go
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GraftkitError(f"--out {out}: cannot create the folder ({exc.strerror})") from None
    graft = build_graft(recipe, calibrate=False)  # the checkpoint holds the write statistics
    info = load_graft_tensors(graft, resolve_checkpoint(run_dir, checkpoint))
    graft.eval()  # inference behaviour, e.g. a memory's write floor
    result = evaluate(graft, recipe, n, rows, progress)
    result["checkpoint"] = {"which": checkpoint, "step": info.get("step")}
    result["overrides"] = list(overrides)
    write_results(result, out)
    print(markdown_table(result))
    return result


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in result.items() if k != "predictions"}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(markdown_table(result) + "\n")
    with (out / "predictions.jsonl").open("w") as f:
        for p in result["predictions"]:
            f.write(json.dumps(p) + "\n")
    chart(result, out / "chart.png")


def markdown_table(result: dict) -> str:
    keys = result["cells"]
    lines = [f"| n = {result['n']} per cell | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for row, cells in result["table"].items():
        values = [("n/a" if cells.get(k) is None else f"{cells[k]:.1%}") for k in keys]
        lines.append(f"| {ROW_TITLES[row]} | " + " | ".join(values) + " |")
    for row, kinds in (result.get("kinds") or {}).items():
        lines += [
            "",
            f"| {ROW_TITLES[row]}, by kind of question | " + " | ".join(kinds) + " |",
            "|---|" + "---|" * len(kinds),
            "| accuracy (questions) | " + " | ".join(f"{k['accuracy']:.1%} ({k['n']})" for k in kinds.values()) + " |",
        ]
    kept = result.get("preservation")
    if kept:
        lines += ["", preservation_table(kept)]
    return "\n".join(lines)


def chart(result: dict, path: Path) -> None:
    import matplotlib  # imported only to draw: it takes a while to load

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = result["cells"]
    rows = list(result["table"])
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(keys) + 2), 3.8))
    for i, row in enumerate(rows):
        values = [result["table"][row].get(k) or 0.0 for k in keys]
        ax.bar(np.arange(len(keys)) + i * width, values, width, label=ROW_TITLES[row])
    ax.set_xticks(np.arange(len(keys)) + width * (len(rows) - 1) / 2, keys)
    ax.set(ylabel="accuracy", ylim=(0, 1), title=f"two-turn accuracy, n = {result['n']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
