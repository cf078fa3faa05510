"""The strict two-turn protocol on BABILong samples.

Turn 1 sees only the context (facts hidden in background text) and writes it into memory. Turn 2 sees
only the chat-templated question with the task's instruction: its token ids do not depend on the
context at all, so the answer can come from nothing but the memory state.

This module turns samples into tensors for both turns and caches turn-1 hidden states on disk: the
backbone is frozen, so the cache is exact.

Legend: b batch, n tokens, d hidden size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from graftkit.backbones.sources import cache_dir
from graftkit.data.prompts import question_prompt
from graftkit.errors import GraftkitError
from graftkit.graft import Graft, pad


def question_parts(backbone, sample) -> tuple[list[int], list[int]]:
    """Turn-2 ids as (shared prefix, question part): the chat-templated instruction, then the question.

    The prefix (chat head + task instruction and answer format) is the same for every sample of a
    task; the question part starts at the prompt's last paragraph ("Question: ..."). Neither holds
    any of the context.
    """
    head, tail = split_prompt(question_prompt(sample.task, sample.question), sample.question)
    return backbone.chat_parts(head, tail)


def split_prompt(prompt: str, question: str) -> tuple[str, str]:
    """Split a question prompt before the paragraph that holds the question."""
    at = prompt.rfind(question)
    cut = prompt.rfind("\n\n", 0, at)
    cut = 0 if cut < 0 else cut + 2
    return prompt[:cut], prompt[cut:]


def answer_ids(backbone, sample) -> list[int]:
    """The training target after the question: the answer word, then end of turn."""
    return backbone.text_ids(sample.target) + [backbone.tokenizer.eos_token_id]


def turn2_batch(backbone, samples: Sequence, with_answers: bool) -> dict:
    """Left-padded turn-2 ids, mask, the shared prefix and (with answers) labels scoring only the answer."""
    rows, labels, prefix = [], [], None
    for sample in samples:
        head, q = question_parts(backbone, sample)
        if prefix is not None and head != prefix:
            raise GraftkitError("turn2_batch: samples of one batch must share their instruction (one task per batch)")
        prefix = head
        a = answer_ids(backbone, sample) if with_answers else []
        rows.append(q + a)
        labels.append([-100] * len(q) + a)
    ids, mask = pad(rows, backbone.tokenizer.pad_token_id, side="left", device=backbone.device)
    batch = {"input_ids": ids, "attention_mask": mask, "prefix_ids": prefix}
    if with_answers:
        batch["labels"], _ = pad(labels, -100, side="left", device=backbone.device)
    return batch


class HiddenCache:
    """Turn-1 hidden states per sample, one safetensors file each, memory-mapped on read.

    Keyed by the backbone fingerprint, the write layer, the segment length and the sample uid. With
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
        return self.directory / f"{sample.uid}.safetensors"

    def has(self, sample) -> bool:
        return self.directory is not None and self.path(sample).is_file()

    def compute(self, samples: Sequence) -> list[torch.Tensor]:
        """Run the backbone (no grad) over the contexts; one (n d) tensor per sample."""
        ids, mask = self.graft.tokenize_context([s.context for s in samples])
        hidden = self.graft.context_hidden(ids, mask)
        lengths = mask.sum(-1).tolist()
        return [hidden[i, :n].contiguous() for i, n in enumerate(lengths)]

    def fill(self, samples: Sequence, batch_size: int = 4, progress: bool = True) -> None:
        """Compute and store what is missing (sorted by length so batches pad little)."""
        if self.directory is None:
            return
        from graftkit.progress import bar

        missing = sorted((s for s in samples if not self.has(s)), key=lambda s: len(s.context))
        if not missing:
            return
        with bar(total=len(missing), desc="caching turn-1 hidden states", unit="sample", disable=not progress) as pbar:
            for start in range(0, len(missing), batch_size):
                chunk = missing[start : start + batch_size]
                for sample, hidden in zip(chunk, self.compute(chunk)):
                    self._store(sample, hidden)
                pbar.update(len(chunk))

    def _store(self, sample, hidden: torch.Tensor) -> None:
        target = self.path(sample)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        save_file({"hidden": hidden.cpu()}, str(tmp), metadata={"uid": sample.uid})
        os.replace(tmp, target)

    def get(self, samples: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded hidden states (b n d) and mask (b n) for a batch of samples."""
        if self.directory is None:
            rows = self.compute(samples)
        else:
            missing = [s for s in samples if not self.has(s)]
            for sample, hidden in zip(missing, self.compute(missing) if missing else []):
                self._store(sample, hidden)
            rows = [load_file(str(self.path(s)))["hidden"] for s in samples]
        device = self.graft.backbone.device
        width = max(r.shape[0] for r in rows)
        hidden = torch.zeros(len(rows), width, rows[0].shape[-1], device=device)
        mask = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
        for i, row in enumerate(rows):
            hidden[i, : row.shape[0]] = row.to(device)
            mask[i, : row.shape[0]] = True
        return hidden, mask
