"""`graftkit train`: two-turn training of a graft on a frozen backbone, on the recipe's tasks.

Every step: a batch from one bucket of one task (tasks drawn by their `weight`); turn-1 hidden states
(cached on disk) are written into a fresh memory state with gradients flowing into the memory's
meta-parameters; turn 2 (the question alone) is scored on the answer tokens, plus the weighted terms of
the auxiliary objectives the recipe turns on (`graftkit.objectives`). Only graft parameters are optimised (AdamW, warm-up +
cosine, clipping). A step whose loss or gradient norm is not finite is skipped (its update dropped,
counted in the metrics); MAX_NONFINITE_STEPS of them in a row stop the run with an error. accelerate
places the work (CPU, one or several GPUs, bf16 where supported).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from torch import nn

from graftkit.api import build_graft, load_backbone
from graftkit.checkpoint import (
    best_marked,
    initial_tensors_file,
    load_initial_tensors,
    load_newest,
    mark_best,
    save_checkpoint,
)
from graftkit.data.tasks import length_label
from graftkit.errors import GraftkitError
from graftkit.evaluate import graft_predictions
from graftkit.objectives import Objective, build_objectives
from graftkit.plots import metric_lines, plot_metrics
from graftkit.progress import bar, status
from graftkit.protocol import HiddenCache, turn2_batch
from graftkit.recall import RecallHead, load_initial_head, recall_stage
from graftkit.recipe import Recipe, load_recipe, resolved_recipe
from graftkit.run_dir import MARKER, check_foreign, run_lock
from graftkit.task import Task, build_task, load_examples

# updates in a row dropped for a non-finite loss or gradient before a run is declared diverged
MAX_NONFINITE_STEPS = 10


@dataclass
class TrainResult:
    run_dir: Path
    best_accuracy: float
    best_step: int
    last_step: int


class TwoTurn(nn.Module):
    """Turn-1 write + turn-2 loss (+ each objective's weighted term) as one forward, so data-parallel
    wrappers see a single call. `out.terms` holds what the objectives report."""

    def __init__(self, graft, objectives: Sequence[Objective] = ()):
        super().__init__()
        self.graft = graft
        self.objectives = nn.ModuleList(objectives)

    def forward(self, hidden, hidden_mask, input_ids, attention_mask, labels, prefix_ids=None, **inputs):
        state = self.graft.write_hidden(hidden, hidden_mask)
        out = self.graft(input_ids, state, attention_mask=attention_mask, labels=labels, prefix_ids=prefix_ids)
        out.terms = {}
        batch = {"attention_mask": attention_mask, "labels": labels, "state": state, **inputs}
        for objective in self.objectives:
            term, logged = objective(self.graft, hidden, hidden_mask, batch)
            out.loss = out.loss + objective.weight * term
            out.terms.update(logged)
        return out


def build_buckets(tasks: list[Task], tokenizer, split: str, seed_offset: int = 0) -> dict[tuple[int, str], list]:
    """Examples per (task index, bucket): training examples from each task's train split, evaluation examples
    from its test split (as many as the task's `train_count` / `eval_count` say)."""
    buckets = {}
    for index, task in enumerate(tasks):
        for name in task.buckets(split):
            count = task.train_count(name) if split == "train" else task.eval_count()
            what = f"{count} " if count is not None else ""
            with status(f"building {what}{task.name} {split} examples ({name})"):
                buckets[(index, name)] = load_examples(task, split, name, count, tokenizer, seed_offset)
            if not buckets[(index, name)]:
                raise GraftkitError(f"data.{index}: task {task.name!r} has no {split} examples in bucket {name!r}")
    return buckets


def bucket_names(keys) -> dict[tuple[int, str], str]:
    """How a bucket is named in logs and metrics: its name, prefixed with its task's index where two tasks share it."""
    keys = list(dict.fromkeys(keys))
    names = [name for _, name in keys]
    return {(i, name): name if names.count(name) == 1 else f"{i}:{name}" for i, name in keys}


def draw_bucket(rng: np.random.Generator, keys: list, weights: list[float]):
    """A training bucket: a task by weight (when there are several), then one of its buckets uniformly."""
    if len(weights) > 1:
        task = int(rng.choice(len(weights), p=np.asarray(weights) / sum(weights)))
        keys = [k for k in keys if k[0] == task]
    return keys[rng.integers(len(keys))]


#: What a resumed run may change: how long it goes on, how often it logs and evaluates, and its peak learning
#: rate (to go on more gently after a divergence).
RESUMABLE = {"train.steps", "train.eval_every", "train.log_every", "train.lr"}


def check_resumable(run_dir: Path, resolved: dict) -> None:
    """Refuse to resume a run with a recipe that differs from its own `recipe.yaml` other than in `RESUMABLE`.

    Both are compared as `resolved_recipe` writes them, the run's own read as it was trained (`load_recipe`
    reads a run's saved recipe with the defaults of its time)."""
    path = run_dir / "recipe.yaml"
    try:
        saved = resolved_recipe(load_recipe(path, training=False, saved=True))
    except GraftkitError as error:
        raise GraftkitError(f"--resume: cannot read the run's recipe {path}: {error}") from None
    was, now = _flat(saved), _flat(resolved)
    changed = [key for key in sorted(set(was) | set(now)) if was.get(key) != now.get(key) and key not in RESUMABLE]
    if changed:
        shown = "; ".join(f"{k}: {was.get(k)!r} in the run, {now.get(k)!r} now" for k in changed[:4])
        raise GraftkitError(
            f"--resume: the recipe differs from the run's own ({shown}); a resumed run may change only "
            f"{', '.join(sorted(RESUMABLE))} (resume with {path})"
        )


def set_learning_rate(optimizer, scheduler, lr: float) -> float | None:
    """Make `lr` the peak rate of a restored optimizer and its schedule, from the current step on; returns the
    peak rate it had, or None when it was `lr` already."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps the scheduler
    was = inner.base_lrs[0]
    if math.isclose(was, lr, rel_tol=1e-12):
        return None
    inner.base_lrs = [lr for _ in inner.base_lrs]
    for group, rule in zip(optimizer.param_groups, inner.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * rule(inner.last_epoch)
    return was


def _saved_so_far(ckpt_root: Path) -> str:
    return f"checkpoints so far are in {ckpt_root}" if (ckpt_root / "latest.json").is_file() else "no checkpoint was written"


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def make_accelerator(train_config):
    precision = train_config.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())


def train(recipe: Recipe, resume: bool = False, progress: bool = True) -> TrainResult:
    cfg = recipe.train
    run_dir = Path(recipe.output_dir)
    ckpt_root = run_dir / "checkpoints"
    if (ckpt_root / "latest.json").is_file() and not resume:
        raise GraftkitError(f"output_dir: {run_dir} already holds a run; pass --resume to continue it, or set output_dir=... to start another")
    if resume and not (ckpt_root / "latest.json").is_file():
        raise GraftkitError(f"--resume: {run_dir} has no checkpoint to resume from")
    if cfg.init_from and not resume:
        initial_tensors_file(cfg.init_from)  # a wrong path stops the run before the backbone loads
    resolved = resolved_recipe(recipe)
    if resume:
        check_resumable(run_dir, resolved)
    check_foreign(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).touch()
    with run_lock(run_dir):
        return _train(recipe, resume, progress, resolved)


def _train(recipe: Recipe, resume: bool, progress: bool, resolved: dict) -> TrainResult:
    cfg = recipe.train
    run_dir = Path(recipe.output_dir)
    ckpt_root = run_dir / "checkpoints"
    if not resume:  # a resumed run's recipe is rewritten once its checkpoint has loaded
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    accelerator = make_accelerator(cfg)
    with status(f"loading backbone {recipe.backbone.kind}:{recipe.backbone.options().get('source')}"):
        backbone = load_backbone({"kind": recipe.backbone.kind, **recipe.backbone.options()})
    torch.manual_seed(cfg.seed)  # after loading: building a tiny-random backbone draws numbers too
    graft = build_graft(recipe, backbone=backbone, calibrate=not resume)  # a resumed run loads its statistics
    if cfg.init_from and not resume:
        file, untouched = load_initial_tensors(graft, cfg.init_from)
        print(f"starting from the graft tensors in {file}" + (f" ({len(untouched)} keep their initialisation)" if untouched else ""))
    graft.freeze(cfg.freeze, apply=False)  # a wrong name stops the run before the caches fill
    if recipe.backbone.options().get("quantize") is None:  # quantized weights are placed at load time
        graft.backbone.model.to(accelerator.device)
    graft.to(accelerator.device)
    tokenizer = graft.backbone.tokenizer
    tasks = [build_task(c) for c in recipe.task_configs()]
    train_buckets = build_buckets(tasks, tokenizer, "train")
    eval_buckets = build_buckets(tasks, tokenizer, "test")
    names = bucket_names([*train_buckets, *eval_buckets])
    cache = HiddenCache(graft, "auto" if cfg.cache_hidden_states else None)
    for bucket in [*train_buckets.values(), *eval_buckets.values()]:
        cache.fill(bucket, progress=progress and accelerator.is_main_process)
    metrics = None if resume else Metrics(run_dir / "metrics.jsonl")
    head = None
    if cfg.recall_steps or cfg.recall_weight:
        answers = sorted({s.target for bucket in train_buckets.values() for s in bucket})
        head = RecallHead(graft.backbone.hidden_size, answers, cfg.recall_query).to(accelerator.device)
        if cfg.init_from and not resume:
            print(f"recall: {load_initial_head(head, cfg.init_from)}")
    if cfg.recall_steps and not resume:  # a resumed run's checkpoint already holds what the stage trained
        show = progress and accelerator.is_main_process
        wanted = {length_label(n) for n in cfg.recall_lengths}
        drawn = {k: v for k, v in train_buckets.items() if not wanted or length_label(v[0].length or "0") in wanted}
        assert head is not None and metrics is not None  # made above for a recall stage of a new run
        scores = recall_stage(graft, cache, head, drawn, eval_buckets, cfg, metrics, lambda it, **kw: bar(it, disable=not show, **kw))
        metrics.write(recall_eval={names[k]: v for k, v in scores.items()})
        print("recall stage: held-out recall accuracy " + " ".join(f"{names[k]}={v:.1%}" for k, v in scores.items()))
    if cfg.freeze:
        frozen = graft.freeze(cfg.freeze)
        print(f"holding {len(frozen)} graft parameters fixed ({', '.join(cfg.freeze)})")

    kept = {"recall_head": head} if cfg.recall_weight and head is not None else {}  # trained beside the graft, checkpointed apart from it
    params = [*graft.trainable_parameters(), *(p for module in kept.values() for p in module.parameters())]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.steps))
    objectives = build_objectives(cfg, head)
    model = TwoTurn(graft, objectives)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    start = 0
    best: dict[str, Any] = {"accuracy": -1.0, "step": 0}
    if resume:
        last, info = load_newest(run_dir, graft, optimizer, scheduler, kept)
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        start, best = info["step"], info.get("best", best)
        if best["step"] == start and best_marked(ckpt_root) != start:  # stopped between the checkpoint and its best copy
            mark_best(ckpt_root, last, best["accuracy"])
        was = set_learning_rate(optimizer, scheduler, cfg.lr)
        print(f"resuming {run_dir} from step {start}" + (f" with learning rate {cfg.lr:g} (was {was:g})" if was is not None else ""))
        metrics = Metrics(run_dir / "metrics.jsonl", resume_from=start)
    assert metrics is not None  # a new run's was opened above, a resumed run's just now
    keys, weights = sorted(train_buckets), [c.weight for c in recipe.task_configs()]
    rank = accelerator.process_index
    windowed = {name for objective in objectives for name in objective.windowed}
    t0 = time.perf_counter()
    window: list[float] = []
    windows: dict[str, list[float]] = {name: [] for name in windowed}
    skipped, bad_run = 0, 0  # updates dropped for a non-finite loss or gradient: in all, in a row
    pbar = bar(range(start, cfg.steps), initial=start, total=cfg.steps, desc="training", disable=not (progress and accelerator.is_main_process))
    model.train()
    for step in pbar:
        step_loss = 0.0
        step_terms: dict[str, float] = {}
        step_acc: list[float] = []
        for micro in range(cfg.grad_accum):
            rng = np.random.default_rng([cfg.seed, step, micro, rank])
            key = draw_bucket(rng, keys, weights)
            bucket = train_buckets[key]
            samples = [bucket[i] for i in rng.choice(len(bucket), size=min(cfg.batch_size, len(bucket)), replace=False)]
            hidden, hidden_mask = cache.get(samples)
            batch = turn2_batch(graft.backbone, samples, with_answers=True, leading_space=cfg.answer_space)
            for objective in objectives:
                batch.update(objective.inputs(graft, tasks[key[0]], samples, hidden))
            with accelerator.autocast():
                out = model(hidden, hidden_mask, **batch)
            accelerator.backward(out.loss / cfg.grad_accum)
            step_loss += out.loss.item() / cfg.grad_accum
            for name, value in out.terms.items():
                step_terms[name] = step_terms.get(name, 0.0) + value.item() / cfg.grad_accum
            step_acc.append(answer_accuracy(out.logits.detach(), batch["labels"]))
        norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        if all_finite(accelerator, step_loss, norm) or accelerator.scaler is not None:  # fp16's scaler skips itself
            optimizer.step()
            bad_run = 0
            if not all(torch.isfinite(p).all() for p in params):  # never checkpoint (or mark best) broken weights
                raise GraftkitError(
                    f"training diverged: the update of step {step + 1} made graft weights non-finite (train.lr is "
                    f"{cfg.lr:g}; try a lower one); {_saved_so_far(ckpt_root)}"
                )
        else:  # one overflowing batch would turn every weight into NaN: drop its update instead
            skipped, bad_run = skipped + 1, bad_run + 1
            pbar.write(f"step {step + 1}: non-finite loss or gradients, update skipped ({skipped} so far)")
            if bad_run >= MAX_NONFINITE_STEPS:
                raise GraftkitError(
                    f"training diverged: {bad_run} steps in a row up to step {step + 1} had a non-finite loss or "
                    f"gradients (train.lr is {cfg.lr:g}; try a lower one); {_saved_so_far(ckpt_root)}"
                )
        with warnings.catch_warnings():  # the schedule follows the step count, skipped steps included
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        window = (window + [float(np.mean(step_acc))])[-50:]
        extra = dict(step_terms)
        for name in windowed:
            windows[name] = (windows[name] + [step_terms[name]])[-50:]
            extra[name] = float(np.mean(windows[name]))
        pbar.set_postfix(loss=f"{step_loss:.3f}", acc=f"{np.mean(window):.1%}", **{k: f"{v:.3f}" for k, v in extra.items()})
        if done % cfg.log_every == 0 or done == cfg.steps:
            metrics.write(
                step=done,
                loss=step_loss,
                answer_acc=float(np.mean(window)),
                lr=scheduler.get_last_lr()[0],
                skipped_steps=skipped,
                elapsed=time.perf_counter() - t0,
                **extra,
            )
        if done % cfg.eval_every == 0 or done == cfg.steps:
            model.eval()
            scores = evaluate_buckets(graft, tasks, eval_buckets, cache, cfg.batch_size)
            model.train()
            accuracy = float(np.mean(list(scores.values())))
            named = {names[k]: v for k, v in scores.items()}
            metrics.write(step=done, eval=named, eval_accuracy=accuracy)
            pbar.write(f"step {done}: eval accuracy {accuracy:.1%} " + " ".join(f"{k}={v:.1%}" for k, v in named.items()))
            if accelerator.is_main_process:
                is_best = accuracy > best["accuracy"]
                if is_best:
                    best = {"accuracy": accuracy, "step": done}
                path = save_checkpoint(ckpt_root, done, graft, optimizer, scheduler, {"best": best, "eval": named}, kept=kept)
                if is_best:
                    mark_best(ckpt_root, path, accuracy)
    pbar.close()
    if accelerator.is_main_process:
        plot_metrics(run_dir / "metrics.jsonl", run_dir)
    return TrainResult(run_dir, best["accuracy"], best["step"], cfg.steps)


def all_finite(accelerator, loss: float, grad_norm) -> bool:
    """Whether this step's loss and (clipped-before) gradient norm are finite on every process, so that
    all processes take or skip the update together."""
    ok = math.isfinite(loss) and (grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm))))
    flags = accelerator.reduce(torch.tensor([float(ok)], device=accelerator.device), reduction="sum")
    return int(flags.item()) == accelerator.num_processes


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose answer tokens are all predicted right under teacher forcing.

    `logits` cover the last positions of the rows (see `Graft.forward` with labels)."""
    pred = logits[:, :-1].argmax(-1)
    gold = labels[:, labels.shape[1] - logits.shape[1] + 1 :]
    scored = gold != -100
    right = ((pred == gold) | ~scored).all(-1)
    return right.float().mean().item()


@torch.no_grad()
def evaluate_buckets(graft, tasks: list[Task], buckets: dict, cache: HiddenCache, batch_size: int) -> dict[tuple[int, str], float]:
    """Two-turn accuracy (each task's own scorer) per (task index, bucket)."""
    return {
        key: float(np.mean([p["correct"] for p in graft_predictions(graft, tasks[key[0]], samples, cache, batch_size)]))
        for key, samples in buckets.items()
    }


class Metrics:
    """metrics.jsonl: one JSON object per line (training lines and evaluation lines)."""

    def __init__(self, path: Path, resume_from: int | None = None):
        self.path = path
        kept = []
        if resume_from is not None and path.is_file():  # drop lines logged after the checkpoint resumed from
            kept = [line for line, row in metric_lines(path) if row.get("step", 0) <= resume_from]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, **fields) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"time": time.time(), **fields}) + "\n")
