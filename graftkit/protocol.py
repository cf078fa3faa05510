"""The strict two-turn protocol on task examples (`graftkit.task.Example`).

Turn 1 sees only the episode's sessions and writes them into memory. Turn 2 sees only the
chat-templated question with the task's instruction: its token ids do not depend on the sessions at
all, so the answer can come from nothing but the memory state.

This module turns examples into tensors for both turns and caches turn-1 hidden states on disk: the
backbone is frozen, so the cache is exact.

Legend: b batch, n tokens, d hidden size.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from graftkit.backbone import Backbone
from graftkit.cache import cache_dir
from graftkit.errors import GraftkitError
from graftkit.graft import Graft, pad
from graftkit.progress import bar


def question_parts(backbone: Backbone, sample) -> tuple[list[int], list[int]]:
    """Turn-2 ids as (shared prefix, question part): the chat-templated instruction, then the question.

    The prefix (chat head + the task's instruction) is the same for every example of a bucket; the
    question part is the task's question message. Neither holds any of the sessions.
    """
    if sample.prompt is None:
        raise GraftkitError("an example without its task's prompt: build examples with graftkit.task.load_examples")
    head, tail = sample.prompt.parts(sample.question)
    return backbone.chat_parts(head, tail)


def answer_ids(backbone: Backbone, sample, leading_space: bool = False) -> list[int]:
    """The training target after the question: the answer, then end of turn. With `leading_space`, the
    answer as it reads inside a sentence (after a space), so its tokens are those a memory read it from."""
    text = " " + sample.target.strip() if leading_space else sample.target
    return backbone.text_ids(text) + [backbone.tokenizer.eos_token_id]


def turn2_batch(backbone: Backbone, samples: Sequence, with_answers: bool, leading_space: bool = False) -> dict:
    """Left-padded turn-2 ids, mask, the shared prefix and (with answers) labels scoring only the answer
    (see `answer_ids` for `leading_space`)."""
    rows, labels, prefix = [], [], None
    for sample in samples:
        head, q = question_parts(backbone, sample)
        if prefix is not None and head != prefix:
            raise GraftkitError("turn2_batch: samples of one batch must share their instruction (one task per batch)")
        prefix = head
        a = answer_ids(backbone, sample, leading_space) if with_answers else []
        rows.append(q + a)
        labels.append([-100] * len(q) + a)
    ids, mask = pad(rows, backbone.tokenizer.pad_token_id, side="left", device=backbone.device)
    batch = {"input_ids": ids, "attention_mask": mask, "prefix_ids": prefix}
    if with_answers:
        batch["labels"], _ = pad(labels, -100, side="left", device=backbone.device)
    return batch


class HiddenCache:
    """Turn-1 hidden states per episode, one safetensors file each, memory-mapped on read.

    Keyed by the backbone fingerprint, the write layer, the segment length and the example's
    `context_uid` (the questions of one episode share it). Each session runs through the backbone on its
    own (as a separate `memorize` call would) and their states are concatenated in order; a session after
    the first is read with a leading space, as `graftkit.sessions.memorize` continues a memory. With
    `directory=None` nothing is stored and every request runs the backbone.
    """

    def __init__(self, graft: Graft, directory: str | os.PathLike | None = "auto"):
        self.graft = graft
        if directory == "auto":
            cfg = graft.memory.config
            key = f"{graft.backbone.fingerprint()}-L{cfg.write_layer}-S{cfg.segment_tokens}"
            directory = cache_dir() / "hidden" / key
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, sample) -> Path:
        assert self.directory is not None, "a cache without a directory stores nothing"
        return self.directory / f"{sample.context_uid}.safetensors"

    def has(self, sample) -> bool:
        return self.directory is not None and self.path(sample).is_file()

    def compute(self, samples: Sequence) -> list[torch.Tensor]:
        """Run the backbone (no grad) over each sample's sessions; one (n d) tensor per sample."""
        texts = [t if i == 0 or t[:1].isspace() else " " + t for s in samples for i, t in enumerate(s.sessions)]
        ids, mask = self.graft.tokenize_context(texts)
        hidden = self.graft.context_hidden(ids, mask)
        rows = [hidden[i, :n] for i, n in enumerate(mask.sum(-1).tolist())]
        out, at = [], 0
        for s in samples:
            parts, at = rows[at : at + len(s.sessions)], at + len(s.sessions)
            out.append(torch.cat(parts).contiguous() if parts else hidden.new_zeros(0, hidden.shape[-1]))
        return out

    def fill(self, samples: Sequence, batch_size: int = 4, progress: bool = True) -> None:
        """Compute and store what is missing (sorted by length so batches pad little)."""
        if self.directory is None:
            return
        unique = {s.context_uid: s for s in samples}.values()
        missing = sorted((s for s in unique if not self.has(s)), key=lambda s: sum(map(len, s.sessions)))
        if not missing:
            return
        with bar(total=len(missing), desc="caching turn-1 hidden states", unit="sample", disable=not progress) as pbar:
            for start in range(0, len(missing), batch_size):
                chunk = missing[start : start + batch_size]
                for sample, hidden in zip(chunk, self.compute(chunk)):
                    self._store(sample, hidden)
                pbar.update(len(chunk))

    def _load(self, sample) -> torch.Tensor:
        """A stored entry; one that cannot be read (a truncated file) is computed again and replaced, with a warning."""
        path = self.path(sample)
        try:
            return load_file(str(path))["hidden"]
        except (SafetensorError, OSError, KeyError) as exc:
            warnings.warn(f"{path}: damaged hidden-state cache entry ({exc}); computing it again", stacklevel=3)
        hidden = self.compute([sample])[0]
        self._store(sample, hidden)
        return hidden.cpu()

    def _store(self, sample, hidden: torch.Tensor) -> None:
        target = self.path(sample)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        save_file({"hidden": hidden.cpu()}, str(tmp), metadata={"uid": sample.context_uid})
        os.replace(tmp, target)

    def get(self, samples: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded hidden states (b n d) and mask (b n) for a batch of samples."""
        if self.directory is None:
            rows = self.compute(samples)
        else:
            missing = list({s.context_uid: s for s in samples if not self.has(s)}.values())
            for sample, hidden in zip(missing, self.compute(missing) if missing else []):
                self._store(sample, hidden)
            rows = [self._load(s) for s in samples]
        device = self.graft.backbone.device
        width = max(1, max(r.shape[0] for r in rows))
        hidden = torch.zeros(len(rows), width, rows[0].shape[-1], device=device)
        mask = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
        for i, row in enumerate(rows):
            hidden[i, : row.shape[0]] = row.to(device)
            mask[i, : row.shape[0]] = True
        return hidden, mask
