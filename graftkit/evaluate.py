"""`graftkit eval`: the two-turn graft against its baselines, per task and length.

Rows: the graft (turn 1 writes the context, turn 2 sees the question alone), the graft with an empty
memory, the bare backbone reading the full context (official BABILong prompt), the bare backbone
with the question only, and chance. Scored with the official BABILong answer check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from graftkit.errors import GraftkitError
from graftkit.graft import pad
from graftkit.progress import bar
from graftkit.protocol import HiddenCache, turn2_batch

ROWS = ("graft", "empty", "full_context", "question_only", "chance")
ROW_TITLES = {
    "graft": "graft (two-turn, answers from memory)",
    "empty": "graft with an empty memory",
    "full_context": "backbone reading the full context",
    "question_only": "backbone with the question only",
    "chance": "chance",
}
#: The final evaluation builds its samples with this offset added to the recipe's data seed, so they are
#: not the ones the in-training evaluation used to pick the best checkpoint.
EVAL_SEED_OFFSET = 1


@torch.no_grad()
def graft_predictions(graft, samples: Sequence, cache: HiddenCache | None, batch_size: int = 8, empty: bool = False,
                      corrected: bool = False, max_new_tokens: int = 8, progress: bool = False) -> list[dict]:
    """Two-turn answers: write each context, then answer its question from memory alone."""
    from graftkit.data.metric import compare_answers

    results = []
    for start in bar(range(0, len(samples), batch_size), desc="graft", disable=not progress, leave=False):
        chunk = samples[start : start + batch_size]
        if empty:
            state = graft.init_state(len(chunk))
        else:
            hidden, mask = cache.get(chunk) if cache is not None else _uncached(graft, chunk)
            state = graft.write_hidden(hidden, mask)
        batch = turn2_batch(graft.backbone, chunk, with_answers=False)
        new = graft.generate(batch["input_ids"], state, batch["attention_mask"], max_new_tokens=max_new_tokens,
                             prefix_ids=batch["prefix_ids"])
        outputs = graft.backbone.tokenizer.batch_decode(new, skip_special_tokens=True)
        results += [_scored(s, o, compare_answers, corrected) for s, o in zip(chunk, outputs)]
    return results


@torch.no_grad()
def backbone_predictions(backbone, samples: Sequence, full_context: bool, batch_size: int = 4, corrected: bool = False,
                         max_new_tokens: int = 32, progress: bool = False) -> list[dict]:
    """The bare backbone answering with the official full-context prompt, or the question alone."""
    from graftkit.data.metric import compare_answers
    from graftkit.data.prompts import full_context_prompt, question_prompt

    tok = backbone.tokenizer
    results = []
    for start in bar(range(0, len(samples), batch_size), desc="full context" if full_context else "question only",
                     disable=not progress, leave=False):
        chunk = samples[start : start + batch_size]
        prompts = [full_context_prompt(s.task, s.context, s.question) if full_context else question_prompt(s.task, s.question) for s in chunk]
        ids, mask = pad([backbone.chat_ids(p) for p in prompts], tok.pad_token_id, side="left", device=backbone.device)
        out = backbone.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id)
        outputs = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        results += [_scored(s, o, compare_answers, corrected) for s, o in zip(chunk, outputs)]
    return results


def _uncached(graft, samples):
    return HiddenCache(graft, None).get(samples)


def _scored(sample, output: str, compare, corrected: bool) -> dict:
    return {
        "uid": sample.uid, "task": sample.task, "length": sample.length, "question": sample.question,
        "target": sample.target, "output": output.strip(),
        "correct": bool(compare(sample.target, output, sample.question, sample.task, corrected=corrected)),
    }


def chance(task: str) -> float:
    from graftkit.data.metric import TASK_LABELS

    return 1.0 / len(TASK_LABELS[task])


def evaluate(graft, recipe, tasks: Sequence[str], lengths: Sequence[str], n: int, rows: Sequence[str] = ROWS,
             corrected: bool = False, progress: bool = True) -> dict:
    """Accuracy per row, task and length; returns {"table": {row: {"task/length": acc|None}}, "predictions": [...]}."""
    from graftkit.data.babilong import build_babilong

    check_request(tasks, lengths, rows)
    backbone = graft.backbone
    cache = HiddenCache(graft, "auto" if recipe.train.cache_hidden_states else None)
    max_positions = getattr(backbone.model.config, "max_position_embeddings", None)
    table = {row: {} for row in rows}
    predictions = []
    for task in tasks:
        for length in lengths:
            key = f"{task}/{length}"
            samples = build_babilong(task, "test", length, n, seed=recipe.data.seed + EVAL_SEED_OFFSET,
                                     tokenizer=backbone.tokenizer, books=recipe.data.books, babi_dir=recipe.data.babi_dir)
            for row in rows:
                if row == "chance":
                    table[row][key] = chance(task)
                    continue
                if row == "full_context" and max_positions and max(s.n_tokens for s in samples) + 300 > max_positions:
                    table[row][key] = None  # the backbone cannot read this much context at all
                    continue
                if row in ("graft", "empty"):
                    if row == "graft":
                        cache.fill(samples, progress=progress)
                    got = graft_predictions(graft, samples, cache, empty=row == "empty", corrected=corrected, progress=progress)
                else:
                    got = backbone_predictions(backbone, samples, full_context=row == "full_context", corrected=corrected, progress=progress)
                table[row][key] = float(np.mean([g["correct"] for g in got]))
                predictions += [{"row": row, **g} for g in got]
                if progress:
                    print(f"  {key:12} {row:14} {table[row][key]:.1%}", flush=True)
    return {"n": n, "tasks": list(tasks), "lengths": list(lengths), "corrected": corrected, "table": table, "predictions": predictions}


def check_request(tasks: Sequence[str], lengths: Sequence[str], rows: Sequence[str]) -> None:
    """Refuse unknown rows, tasks or lengths before any weights are loaded."""
    from graftkit.data.tasks import check_task, parse_length

    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise GraftkitError(f"--rows: unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    for task in tasks:
        check_task(task)
    for length in lengths:
        parse_length(length)


def evaluate_run(run_dir, tasks=None, lengths=None, n: int = 200, checkpoint: str = "best", rows=None,
                 corrected: bool = False, progress: bool = True, out=None, overrides=()) -> dict:
    """Evaluate a training run directory and write results.{json,md}, chart.png and predictions.jsonl
    to `out` (default RUN_DIR/eval). `overrides` (`key=value`) change the run's recipe for this
    evaluation only, e.g. a memory's `write_floor`; settings that change the shapes of the graft's
    tensors are refused when its checkpoint is loaded."""
    from graftkit.api import build_graft
    from graftkit.checkpoint import load_graft_tensors, resolve_checkpoint
    from graftkit.recipe import load_recipe

    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise GraftkitError(f"{run_dir}: not a graftkit run directory (no recipe.yaml)")
    recipe = load_recipe(run_dir / "recipe.yaml", overrides)
    tasks, lengths, rows = tasks or recipe.data.tasks, lengths or recipe.data.eval_lengths, rows or ROWS
    check_request(tasks, lengths, rows)
    graft = build_graft(recipe, calibrate=False)  # the checkpoint holds the write statistics
    info = load_graft_tensors(graft, resolve_checkpoint(run_dir, checkpoint))
    graft.eval()  # inference behaviour, e.g. a memory's write floor
    result = evaluate(graft, recipe, tasks, lengths, n, rows, corrected, progress)
    result["checkpoint"] = {"which": checkpoint, "step": info.get("step")}
    result["overrides"] = list(overrides)
    write_results(result, Path(out) if out else run_dir / "eval")
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
    keys = [f"{t}/{l}" for t in result["tasks"] for l in result["lengths"]]
    lines = [f"| n = {result['n']} per cell | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for row, cells in result["table"].items():
        values = [("n/a" if cells.get(k) is None else f"{cells[k]:.1%}") for k in keys]
        lines.append(f"| {ROW_TITLES[row]} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [f"{t}/{l}" for t in result["tasks"] for l in result["lengths"]]
    rows = list(result["table"])
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(keys) + 2), 3.8))
    for i, row in enumerate(rows):
        values = [result["table"][row].get(k) or 0.0 for k in keys]
        ax.bar(np.arange(len(keys)) + i * width, values, width, label=ROW_TITLES[row])
    ax.set_xticks(np.arange(len(keys)) + width * (len(rows) - 1) / 2, keys)
    ax.set(ylabel="accuracy", ylim=(0, 1), title=f"BABILong two-turn, n = {result['n']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
