"""`graftkit train`: two-turn training of a graft on a frozen backbone, on the recipe's tasks.

Every step: a batch from one bucket of one task (tasks drawn by their `weight`); turn-1 hidden states (cached on disk) are written
into a fresh memory state with gradients flowing into the memory's meta-parameters; turn 2 (the
question alone) is scored on the answer tokens. Only graft parameters are optimised (AdamW, warm-up +
cosine, clipping). A step whose loss or gradient norm is not finite is skipped (its update dropped,
counted in the metrics); MAX_NONFINITE_STEPS of them in a row stop the run with an error. accelerate
places the work (CPU, one or several GPUs, bf16 where supported).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from graftkit.api import build_graft, load_backbone
from graftkit.checkpoint import (
    initial_tensors_file,
    load_checkpoint,
    load_initial_tensors,
    mark_best,
    resolve_checkpoint,
    save_checkpoint,
)
from graftkit.data.tasks import length_label
from graftkit.errors import GraftkitError
from graftkit.progress import bar, status
from graftkit.protocol import HiddenCache, turn2_batch
from graftkit.recall import RecallHead, input_reads, load_initial_head, recall_stage
from graftkit.recipe import Recipe
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
    """Turn-1 write + turn-2 loss as one forward, so data-parallel wrappers see a single call."""

    def __init__(self, graft, read_loss: float = 0.0, recall_head: RecallHead | None = None, recall_weight: float = 0.0,
                 write_cost: float = 0.0, background_cost: float = 0.0):
        super().__init__()
        self.graft = graft
        self.read_loss = read_loss  # weight of `read_loss` in the loss; 0 = answer loss only
        self.recall_head = recall_head  # with recall_weight > 0: the recall loss on the same pass's reads
        self.recall_weight = recall_weight
        self.write_cost = write_cost  # weight of the write mass (`write_mass`) in the loss; 0 = off
        self.background_cost = background_cost  # weight of the write mass on background tokens only; 0 = off

    def forward(self, hidden, hidden_mask, input_ids, attention_mask, labels, prefix_ids=None, recall_targets=None, recall_backs=None,
                background=None):
        state = self.graft.write_hidden(hidden, hidden_mask)
        out = self.graft(input_ids, state, attention_mask=attention_mask, labels=labels, prefix_ids=prefix_ids)
        if self.read_loss:
            out.read_loss = read_loss(self.graft, attention_mask, labels)
            out.loss = out.loss + self.read_loss * out.read_loss
        if self.recall_weight:
            logp = recall_logprobs(self.graft, self.recall_head, attention_mask, labels, recall_backs)
            out.recall_loss = F.nll_loss(logp, recall_targets)
            out.recall_acc = (logp.argmax(-1) == recall_targets).float().mean()
            out.loss = out.loss + self.recall_weight * out.recall_loss
        if self.write_cost:
            out.write_mass = write_mass(self.graft, hidden, hidden_mask)
            out.loss = out.loss + self.write_cost * out.write_mass
        if self.background_cost:
            out.background_mass = write_mass(self.graft, hidden, hidden_mask * background)
            out.loss = out.loss + self.background_cost * out.background_mass
        return out


def write_mass(graft, hidden: torch.Tensor, hidden_mask: torch.Tensor) -> torch.Tensor:
    """The memory's write strengths summed over each context's written tokens, averaged over rows and heads."""
    strengths = graft.write_strengths(hidden)  # b n heads
    return (strengths * hidden_mask[..., None].to(strengths.dtype)).sum(1).mean()


def background_tokens(tokenizer, task: Task, samples, n_tokens: int, known: dict | None = None) -> torch.Tensor:
    """(b n_tokens) 1.0 on the context tokens that lie outside the samples' facts (as `task.fact_mask` says),
    else 0. `known` (sample uid -> mask) keeps each sample's mask, so a sample drawn again is not tokenized again."""
    rows = torch.zeros(len(samples), n_tokens)
    for row, sample in zip(rows, samples):
        mask = known.get(sample.uid) if known is not None else None
        if mask is None:
            offsets = tokenizer(sample.context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            mask = torch.from_numpy(~task.fact_mask(sample, offsets))
            if known is not None:
                known[sample.uid] = mask
        row[: min(len(mask), n_tokens)] = mask[:n_tokens].float()
    return rows


def recall_logprobs(graft, head: RecallHead, attention_mask: torch.Tensor, labels: torch.Tensor, backs) -> torch.Tensor:
    """The recall head's log p(answer) (b answers) from the reads of a training pass, whose rows end with answers."""
    reads = input_reads(graft, labels.shape[1], "train.recall_weight").float()
    scored = labels != -100
    ends = scored.int().argmax(-1)  # index of each row's first answer token: its question part ends there
    return head(reads, attention_mask.bool() & ~scored, ends, backs)


def read_loss(graft, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How well the memory's reads over the question name the answer, with the frozen backbone's own decoder.

    Each question position's read (the injector's `reads`, b n d) goes through the backbone's final norm
    and LM head; the loss is -log of the answer's first token's probability averaged over the row's
    question positions (padding and answer positions excluded), so one position that recalls the answer
    suffices: typically the name asked about. It reaches the memory without passing through the frozen
    layers, where the answer loss's signal is weak.
    """
    reads = input_reads(graft, labels.shape[1], "train.read_loss")
    scored = labels != -100
    first = scored.int().argmax(-1)  # rows end with their answers: index of the first answer token
    rows = torch.arange(labels.shape[0], device=labels.device)
    target = labels[rows, first]
    question = attention_mask.bool() & ~scored
    logp = torch.log_softmax(graft.backbone.logits(reads).float(), dim=-1)  # b n vocab
    at = logp.gather(-1, target[:, None, None].expand(-1, logp.shape[1], 1)).squeeze(-1)  # b n
    at = at.masked_fill(~question, float("-inf"))
    mixture = torch.logsumexp(at, dim=-1) - question.sum(-1).clamp(min=1).float().log()
    return -mixture.mean()


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


def make_accelerator(train_config):
    from accelerate import Accelerator

    precision = train_config.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())


def train(recipe: Recipe, resume: bool = False, progress: bool = True) -> TrainResult:
    cfg = recipe.train
    run_dir = Path(recipe.output_dir)
    ckpt_root = run_dir / "checkpoints"
    if (ckpt_root / "latest.json").is_file() and not resume:
        raise GraftkitError(
            f"output_dir: {run_dir} already holds a run; pass --resume to continue it, "
            f"or set output_dir=... to start another"
        )
    if resume and not (ckpt_root / "latest.json").is_file():
        raise GraftkitError(f"--resume: {run_dir} has no checkpoint to resume from")
    if cfg.init_from and not resume:
        initial_tensors_file(cfg.init_from)  # a wrong path stops the run before the backbone loads
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))

    accelerator = make_accelerator(cfg)
    with status(f"loading backbone {recipe.backbone.kind}:{recipe.backbone.options().get('source')}"):
        backbone = load_backbone({"kind": recipe.backbone.kind, **recipe.backbone.options()})
    torch.manual_seed(cfg.seed)  # after loading: building a tiny-random backbone draws numbers too
    graft = build_graft(recipe, backbone=backbone, calibrate=not resume)  # a resumed run loads its statistics
    if cfg.init_from and not resume:
        file, kept = load_initial_tensors(graft, cfg.init_from)
        print(f"starting from the graft tensors in {file}" + (f" ({len(kept)} keep their initialisation)" if kept else ""))
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
        scores = recall_stage(graft, cache, head, drawn, eval_buckets, cfg, metrics, lambda it, **kw: bar(it, disable=not show, **kw))
        metrics.write(recall_eval={names[k]: v for k, v in scores.items()})
        print("recall stage: held-out recall accuracy " + " ".join(f"{names[k]}={v:.1%}" for k, v in scores.items()))
    if cfg.freeze:
        frozen = graft.freeze(cfg.freeze)
        print(f"holding {len(frozen)} graft parameters fixed ({', '.join(cfg.freeze)})")

    kept = {"recall_head": head} if cfg.recall_weight else {}  # trained beside the graft, checkpointed apart from it
    params = [*graft.trainable_parameters(), *(p for module in kept.values() for p in module.parameters())]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.steps))
    model = TwoTurn(graft, cfg.read_loss, kept.get("recall_head"), cfg.recall_weight, cfg.write_cost, cfg.background_cost)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    start, best = 0, {"accuracy": -1.0, "step": 0}
    if resume:
        info = load_checkpoint(resolve_checkpoint(run_dir, "last"), graft, optimizer, scheduler, kept)
        start, best = info["step"], info.get("best", best)
        print(f"resuming {run_dir} from step {start}")
        metrics = Metrics(run_dir / "metrics.jsonl", resume_from=start)
    keys, weights = sorted(train_buckets), [c.weight for c in recipe.task_configs()]
    rank = accelerator.process_index
    background_masks = {}  # sample uid -> its book-text mask, for train.background_cost
    t0, window, recall_window = time.perf_counter(), [], []
    skipped, bad_run = 0, 0  # updates dropped for a non-finite loss or gradient: in all, in a row
    pbar = bar(range(start, cfg.steps), initial=start, total=cfg.steps, desc="training", disable=not (progress and accelerator.is_main_process))
    model.train()
    for step in pbar:
        step_loss, step_read, step_mass, step_background, step_recall, step_acc = 0.0, 0.0, 0.0, 0.0, [], []
        for micro in range(cfg.grad_accum):
            rng = np.random.default_rng([cfg.seed, step, micro, rank])
            key = draw_bucket(rng, keys, weights)
            bucket = train_buckets[key]
            samples = [bucket[i] for i in rng.choice(len(bucket), size=min(cfg.batch_size, len(bucket)), replace=False)]
            hidden, hidden_mask = cache.get(samples)
            batch = turn2_batch(graft.backbone, samples, with_answers=True)
            if cfg.recall_weight:
                batch.update(recall_targets=head.targets(samples), recall_backs=head.backs(graft.backbone, samples))
            if cfg.background_cost:
                batch["background"] = background_tokens(graft.backbone.tokenizer, tasks[key[0]], samples, hidden.shape[1],
                                                        background_masks).to(hidden.device)
            with accelerator.autocast():
                out = model(hidden, hidden_mask, **batch)
            accelerator.backward(out.loss / cfg.grad_accum)
            step_loss += out.loss.item() / cfg.grad_accum
            if cfg.read_loss:
                step_read += out.read_loss.item() / cfg.grad_accum
            if cfg.write_cost:
                step_mass += out.write_mass.item() / cfg.grad_accum
            if cfg.background_cost:
                step_background += out.background_mass.item() / cfg.grad_accum
            if cfg.recall_weight:
                step_recall.append((out.recall_loss.item(), out.recall_acc.item()))
            step_acc.append(answer_accuracy(out.logits.detach(), batch["labels"]))
        norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        if all_finite(accelerator, step_loss, norm) or accelerator.scaler is not None:  # fp16's scaler skips itself
            optimizer.step()
            bad_run = 0
        else:  # one overflowing batch would turn every weight into NaN: drop its update instead
            skipped, bad_run = skipped + 1, bad_run + 1
            pbar.write(f"step {step + 1}: non-finite loss or gradients, update skipped ({skipped} so far)")
            if bad_run >= MAX_NONFINITE_STEPS:
                kept = f"checkpoints so far are in {ckpt_root}" if (ckpt_root / "latest.json").is_file() else "no checkpoint was written"
                raise GraftkitError(
                    f"training diverged: {bad_run} steps in a row up to step {step + 1} had a non-finite loss or "
                    f"gradients (train.lr is {cfg.lr:g}; try a lower one); {kept}"
                )
        with warnings.catch_warnings():  # the schedule follows the step count, skipped steps included
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        window = (window + [float(np.mean(step_acc))])[-50:]
        extra = {"read_loss": step_read} if cfg.read_loss else {}
        if cfg.write_cost:
            extra["write_mass"] = step_mass
        if cfg.background_cost:
            extra["background_mass"] = step_background
        if cfg.recall_weight:
            recall_window = (recall_window + [float(np.mean([a for _, a in step_recall]))])[-50:]
            extra.update(aux_recall_loss=float(np.mean([v for v, _ in step_recall])), aux_recall_acc=float(np.mean(recall_window)))
        pbar.set_postfix(loss=f"{step_loss:.3f}", acc=f"{np.mean(window):.1%}", **{k: f"{v:.3f}" for k, v in extra.items()})
        if done % cfg.log_every == 0 or done == cfg.steps:
            metrics.write(step=done, loss=step_loss, answer_acc=float(np.mean(window)), lr=scheduler.get_last_lr()[0],
                          skipped_steps=skipped, elapsed=time.perf_counter() - t0, **extra)
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
        from graftkit.plots import plot_metrics

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
    from graftkit.evaluate import graft_predictions

    return {key: float(np.mean([p["correct"] for p in graft_predictions(graft, tasks[key[0]], samples, cache, batch_size)]))
            for key, samples in buckets.items()}


class Metrics:
    """metrics.jsonl: one JSON object per line (training lines and evaluation lines)."""

    def __init__(self, path: Path, resume_from: int | None = None):
        self.path = path
        kept = []
        if resume_from is not None and path.is_file():  # drop lines logged after the checkpoint resumed from
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_from]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, **fields) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"time": time.time(), **fields}) + "\n")
