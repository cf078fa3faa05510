"""Recall pre-training: teach the memory to give the answer back before the backbone learns to use it.

With `train.recall_steps` > 0, `graftkit train` runs this stage before its end-to-end steps. Per step:
write a batch's cached turn-1 states, run turn 2 (the question alone) so that the injector reads the
memory at every position, and classify reads into the answers seen in training with a linear head of
the stage's own: with `train.recall_query: mixture` (default) every question position's read, the answer
scored by the mixture of their distributions; with `last_word` only the read at the question's last
word (often what the question is about, such as a name), which learns recall better when the question
ends with what it asks about. The stage needs tasks whose answers come from a closed set. The loss
reaches the memory and the injector's query projection only, not the frozen layers and not the LM
head, where the end-to-end signal is weak. The end-to-end steps start from the memory it trained
(`train.freeze` can hold it there); with `train.recall_weight` > 0 the head (`RecallHead`) goes on
classifying the reads of every training pass, as an auxiliary loss, otherwise it is dropped. Needs an
injector that reads at every position (`reads_each_position`, e.g. mid_layer with direct_read).

Legend: b batch, n tokens, d hidden size.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from graftkit.backbone import Backbone
from graftkit.checkpoint import initial_tensors_file
from graftkit.errors import GraftkitError
from graftkit.protocol import question_parts, turn2_batch


class _Read(Exception):
    """Raised by a layer hook once the injector has read the memory: the rest of the stack is not needed."""


def question_reads(graft, cache, samples: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory's reads at each sample's question positions (b n d), written from the cached context, and
    which of them are question tokens (b n, padding False).

    Turn 2 runs only as deep as the injector's read; the layers after it cannot change it."""
    hidden, hidden_mask = cache.get(samples)
    state = graft.write_hidden(hidden, hidden_mask)
    batch = turn2_batch(graft.backbone, samples, with_answers=False)

    def stop(module, args, output):
        if graft.injector.reads is not None:
            raise _Read

    graft.injector.reads = None
    handles = [layer.register_forward_hook(stop) for layer in graft.backbone.layers]
    try:
        graft(batch["input_ids"], state, attention_mask=batch["attention_mask"], prefix_ids=batch["prefix_ids"])
    except _Read:
        pass
    finally:
        for handle in handles:
            handle.remove()
    mask = batch["attention_mask"].bool()
    return input_reads(graft, mask.shape[1], "train.recall_steps").float(), mask


def input_reads(graft, width: int, field: str) -> torch.Tensor:
    """The injector's reads (b width d) in the last forward pass at the positions of its `width` input ids (the
    tokens an injector prepends dropped); an error naming `field` if the injector recorded none."""
    reads = getattr(graft.injector, "reads", None)  # only a `PerPositionReads` injector keeps them
    if reads is None:
        raise GraftkitError(f"{field}: the injector recorded no per-position reads in this forward pass")
    return reads[:, reads.shape[1] - width :]


def answer_logprobs(head: torch.nn.Module, reads: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
    """log p(answer) (b answers) as a uniform mixture over the question positions of each position's own
    classification of its read: the position that recalls the answer (typically the name asked about)
    can carry it without the others drowning it, as an average of the reads would."""
    logp = torch.log_softmax(head(reads), dim=-1).masked_fill(~question[..., None], float("-inf"))  # b n answers
    return torch.logsumexp(logp, dim=1) - question.sum(1, keepdim=True).clamp(min=1).float().log()


def last_word_position(backbone: Backbone, sample) -> int:
    """Index, in the sample's turn-2 question part, of the last token of the question's last word."""
    _, ids = question_parts(backbone, sample)
    words = sample.question.rstrip().rstrip("?.!").rstrip()
    for i in range(len(ids)):
        if words in backbone.tokenizer.decode(ids[: i + 1]):
            return i
    raise GraftkitError(f"train.recall_query: the question {sample.question!r} is not in its own turn-2 ids")


class RecallHead(nn.Module):
    """A linear classification of the memory's reads over a question into the answers seen in training.

    `query` "mixture": every question position's read is classified and the distributions mixed;
    "last_word": only the read at the question's last word. Used by the recall stage and, with
    `train.recall_weight`, as an auxiliary loss during the end-to-end steps.
    """

    def __init__(self, hidden_size: int, answers: Sequence[str], query: str):
        super().__init__()
        self.answers, self.query = list(answers), query
        self.linear = nn.Linear(hidden_size, len(self.answers))
        self._back: dict[str, int] = {}  # sample uid -> tokens from its last word to the end of its question part

    def file_metadata(self) -> dict[str, str]:
        """What a checkpoint records beside the head's tensors, so that another run can tell whether it fits."""
        return {"answers": json.dumps(self.answers), "query": self.query}

    def targets(self, samples: Sequence) -> torch.Tensor:
        return torch.tensor([self.answers.index(s.target) for s in samples], device=self.linear.weight.device)

    def backs(self, backbone: Backbone, samples: Sequence) -> torch.Tensor | None:
        """Per sample, how many tokens before the end of its question part its last word's last token is
        (None with the mixture query, which needs none)."""
        if self.query == "mixture":
            return None
        for s in samples:
            if s.uid not in self._back:
                self._back[s.uid] = len(question_parts(backbone, s)[1]) - last_word_position(backbone, s)
        return torch.tensor([self._back[s.uid] for s in samples], device=self.linear.weight.device)

    def forward(self, reads: torch.Tensor, question: torch.Tensor, ends: torch.Tensor, backs: torch.Tensor | None) -> torch.Tensor:
        """log p(answer) (b answers) from the reads (b n d) at a batch's positions; `question` (b n) marks the
        question part's tokens, `ends` (b) is the index just past each row's question part (answers may follow)."""
        if self.query == "mixture":
            return answer_logprobs(self.linear, reads, question)
        assert backs is not None  # every query but the mixture has them
        rows = torch.arange(reads.shape[0], device=reads.device)
        return torch.log_softmax(self.linear(reads[rows, ends - backs]), dim=-1)


def load_initial_head(head: RecallHead, init_from) -> str:
    """Load into `head` the recall head saved beside the graft tensors `train.init_from` names (a run's
    checkpoint keeps it when it trained with `train.recall_weight`), if it was trained over the same answers
    with the same query; otherwise `head` stays new. Returns what was done, for the run's log."""
    file = Path(initial_tensors_file(init_from)).parent / "recall_head.safetensors"
    if not file.is_file():
        return f"a new recall head (train.init_from: no {file.name} beside the graft tensors)"
    try:
        with safe_open(str(file), "pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise GraftkitError(f"train.init_from: {file} is not a readable safetensors file ({exc})") from None
    if "answers" in metadata and (_json_or_none(metadata["answers"]) != head.answers or metadata.get("query") != head.query):
        return f"a new recall head (train.init_from: {file} was trained over other answers or with another recall_query)"
    own = head.state_dict()
    if tensors.keys() != own.keys() or any(tensors[k].shape != own[k].shape for k in own):
        return f"a new recall head (train.init_from: {file} does not fit this run's answers)"
    head.load_state_dict(tensors)
    return f"the recall head in {file}"


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def recall_stage(graft, cache, head: RecallHead, train_buckets: dict, eval_buckets: dict, cfg, metrics=None, bar=None) -> dict:
    """Train the graft on recall alone for `cfg.recall_steps` steps; returns held-out recall accuracy per bucket.

    AdamW at `cfg.lr`, constant; batches drawn uniformly over the training buckets, seeded by `cfg.seed`.
    `head` is the classification trained with the graft. `bar(iterable, **kwargs)` makes the progress bar
    (None: no bar)."""
    params = [*graft.trainable_parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    keys = sorted(train_buckets)
    window: list[float] = []

    def logprobs(samples) -> torch.Tensor:
        reads, question = question_reads(graft, cache, samples)
        ends = torch.full((len(samples),), question.shape[1], device=reads.device)  # left padding: the question ends the row
        return head(reads, question, ends, head.backs(graft.backbone, samples))

    steps: Any = range(cfg.recall_steps) if bar is None else bar(range(cfg.recall_steps), desc="recall stage")  # or a bar over it
    for step in steps:
        rng = np.random.default_rng([cfg.seed, step, 1 << 20])  # a stream apart from the end-to-end steps'
        bucket = train_buckets[keys[rng.integers(len(keys))]]
        samples = [bucket[i] for i in rng.choice(len(bucket), size=min(cfg.batch_size, len(bucket)), replace=False)]
        logits = logprobs(samples)
        loss = F.nll_loss(logits, head.targets(samples))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if torch.isfinite(loss) and torch.isfinite(norm):
            optimizer.step()
        window = (window + [(logits.argmax(-1) == head.targets(samples)).float().mean().item()])[-50:]
        if bar is not None:
            steps.set_postfix(loss=f"{loss.item():.3f}", acc=f"{np.mean(window):.1%}")
        if metrics is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.recall_steps):
            metrics.write(recall_step=step + 1, recall_loss=loss.item(), recall_acc=float(np.mean(window)))
    optimizer.zero_grad(set_to_none=True)
    scores = {}
    with torch.no_grad():
        for key, bucket in eval_buckets.items():
            seen = [s for s in bucket if s.target in head.answers]
            right = sum(
                (logprobs(seen[i : i + cfg.batch_size]).argmax(-1) == head.targets(seen[i : i + cfg.batch_size])).sum().item()
                for i in range(0, len(seen), cfg.batch_size)
            )
            scores[key] = right / max(1, len(bucket))
    graft.injector.reads = None
    return scores
