"""`train.preserve_weight`: where its memory is not asked for, the grafted model should stay the backbone.

Each step the grafted model reads, with the batch's memory states (written from the batch's own contexts,
which have nothing to do with them), a few rows of two kinds:

- general prompts (`graftkit.preservation.training_prompts`, disjoint from the prompts the preservation
  row scores), each followed by the bare backbone's own greedy answer, after the chat template's head
  (a shared prefix, as `Graft.answer` reads it); compared over the answer's positions;
- passages of the training books (`graftkit.preservation.training_passages`, not the test book the
  preservation row scores), as plain text; compared at every position.

The term is the KL divergence from the bare backbone's next-token distribution to the grafted model's,
averaged over the compared positions, each distribution coarsened to the bare backbone's `TOP_K` most
likely tokens and one bucket for the rest. The bare backbone's side is computed once per row and kept
(a few hundred kilobytes in all), so a step costs one grafted pass over short rows.

Legend: b batch, n tokens, m compared positions, k kept tokens, V vocabulary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from graftkit.graft import pad
from graftkit.objectives.base import Objective
from graftkit.preservation import training_passages, training_prompts

#: rows of each kind per step, the length of the bare backbone's answers, and the tokens kept per position
PROMPTS_PER_STEP = 4
PASSAGES_PER_STEP = 1
ANSWER_TOKENS = 16
PASSAGE_TOKENS = 64
TOP_K = 128


@dataclass
class Row:
    ids: list[int]  # what the grafted model reads (after the shared prefix, for a prompt)
    first: int  # the first compared position (it predicts ids[first + 1])
    top: torch.Tensor  # m k: the bare backbone's most likely next tokens at each compared position
    logp: torch.Tensor  # m k+1: their log-probabilities, and the log-probability of every other token


def coarse_kl(logits: torch.Tensor, top: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(bare ‖ graft), both distributions coarsened to `top` (m k) and the rest."""
    log_q = torch.log_softmax(logits.float(), -1)  # m V
    kept = log_q.gather(-1, top)
    rest = log_q.scatter(-1, top, float("-inf")).logsumexp(-1, keepdim=True)
    q = torch.cat([kept, rest], -1)
    p = logp.float()
    return (p.exp() * (p - q)).sum(-1).mean()


class PreserveLoss(Objective):
    field = "preserve_weight"

    def __init__(self, weight: float, seed: int = 0):
        super().__init__(weight)
        self.prompts = training_prompts()
        self.passages = training_passages()
        self.seed = seed
        self.rows: dict[tuple[str, int], Row] = {}

    @torch.no_grad()
    def _row(self, graft, kind: str, index: int) -> Row:
        if (kind, index) not in self.rows:
            backbone = graft.backbone
            if kind == "prompt":
                head, ids = backbone.chat_parts("", self.prompts[index])
                whole = torch.tensor([head + ids], device=backbone.device)
                out = backbone.model.generate(
                    input_ids=whole,
                    attention_mask=torch.ones_like(whole),
                    max_new_tokens=ANSWER_TOKENS,
                    do_sample=False,
                    pad_token_id=backbone.tokenizer.pad_token_id,
                )
                ids, first, skip = ids + out[0, whole.shape[1] :].tolist(), len(ids) - 1, len(head)
            else:
                ids, first, skip, head = backbone.text_ids(self.passages[index])[:PASSAGE_TOKENS], 0, 0, []
            logits = backbone.model(input_ids=torch.tensor([head + ids], device=backbone.device)).logits[0, skip + first : -1]
            logp = torch.log_softmax(logits.float(), -1)
            kept, top = logp.topk(min(TOP_K, logp.shape[-1] - 1), -1)
            rest = torch.log1p(-kept.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))
            self.rows[(kind, index)] = Row(ids, first, top.cpu(), torch.cat([kept, rest], -1).cpu())
        return self.rows[(kind, index)]

    def inputs(self, graft, task, samples, hidden):
        batch_key = int(hashlib.sha256("".join(s.uid for s in samples).encode()).hexdigest()[:8], 16)
        rng = np.random.default_rng([self.seed, 31, batch_key])  # fixed by the batch, so a resumed run draws the same
        out = {}
        for kind, pool, count in (("prompt", self.prompts, PROMPTS_PER_STEP), ("passage", self.passages, PASSAGES_PER_STEP)):
            chosen = rng.choice(len(pool), size=min(count, len(samples), len(pool)), replace=False)
            rows = [self._row(graft, kind, int(i)) for i in chosen]
            ids, mask = pad([r.ids for r in rows], graft.backbone.tokenizer.pad_token_id, side="left", device=hidden.device)
            compared = torch.zeros_like(mask, dtype=torch.bool)
            for k, row in enumerate(rows):
                start = ids.shape[1] - len(row.ids)
                compared[k, start + row.first : ids.shape[1] - 1] = True
            out[kind] = {
                "ids": ids,
                "mask": mask,
                "compared": compared,
                "top": torch.cat([r.top for r in rows]).to(hidden.device),
                "logp": torch.cat([r.logp for r in rows]).to(hidden.device),
            }
        return {"preserve": out}

    def forward(self, graft, hidden, hidden_mask, batch):
        terms = []
        for kind, rows in batch["preserve"].items():
            ids, compared = rows["ids"], rows["compared"]
            state = batch["state"].select(range(ids.shape[0]))
            # labels where compared make the graft compute logits only there (the compared positions end the rows)
            labels = torch.full_like(ids, -100)
            labels[:, 1:] = torch.where(compared[:, :-1], ids[:, 1:], -100)
            prefix = graft.backbone.chat_parts("", "")[0] if kind == "prompt" else None
            logits = graft(ids, state, attention_mask=rows["mask"], labels=labels, prefix_ids=prefix).logits
            terms.append(coarse_kl(logits[compared[:, -logits.shape[1] :]], rows["top"], rows["logp"]))
        kl = torch.stack(terms).mean()
        return kl, {"preserve_kl": kl}
