"""`train.preserve_weight`: where its memory is not asked for, the grafted model should stay the backbone.

Each step, a few general prompts (`graftkit.preservation.training_prompts`, disjoint from the prompts the
preservation row scores), each followed by the bare backbone's own greedy answer, are read by the
grafted model with the batch's memory states (written from the batch's own contexts, which have nothing
to do with the prompts). The term is the KL divergence from the bare backbone's next-token distributions
to the grafted model's, averaged over the answer's positions.

Legend: b batch, n tokens, v vocabulary.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from graftkit.graft import pad
from graftkit.objectives import Objective

#: prompts per step, and the length of the bare backbone's answers they are followed by
PROMPTS_PER_STEP = 4
ANSWER_TOKENS = 16


class PreserveLoss(Objective):
    field = "preserve_weight"

    def __init__(self, weight: float, seed: int = 0):
        super().__init__(weight)
        from graftkit.preservation import training_prompts

        self.prompts = training_prompts()
        self.seed = seed
        self.rows: dict[int, tuple[list[int], int]] = {}  # prompt index -> (chat ids + the bare answer, prompt length)

    @torch.no_grad()
    def _row(self, graft, index: int) -> tuple[list[int], int]:
        if index not in self.rows:
            backbone = graft.backbone
            ids = backbone.chat_ids(self.prompts[index])
            out = backbone.model.generate(input_ids=torch.tensor([ids], device=backbone.device), max_new_tokens=ANSWER_TOKENS,
                                          do_sample=False, pad_token_id=backbone.tokenizer.pad_token_id)
            self.rows[index] = (out[0].tolist(), len(ids))
        return self.rows[index]

    def inputs(self, graft, task, samples, hidden):
        batch_key = int(hashlib.sha256("".join(s.uid for s in samples).encode()).hexdigest()[:8], 16)
        rng = np.random.default_rng([self.seed, 31, batch_key])  # fixed by the batch, so a resumed run draws the same
        chosen = rng.choice(len(self.prompts), size=min(PROMPTS_PER_STEP, len(samples)), replace=False)
        rows = [self._row(graft, int(i)) for i in chosen]
        ids, mask = pad([r for r, _ in rows], graft.backbone.tokenizer.pad_token_id, side="left", device=hidden.device)
        answer = torch.zeros_like(mask, dtype=torch.bool)
        for k, (row, prompt) in enumerate(rows):
            answer[k, ids.shape[1] - len(row) + prompt - 1 : ids.shape[1] - 1] = True  # positions that predict answer tokens
        with torch.no_grad():
            bare = graft.backbone.model(input_ids=ids, attention_mask=mask).logits.float()
        return {"preserve_ids": ids, "preserve_mask": mask, "preserve_answer": answer, "preserve_logits": bare}

    def forward(self, graft, hidden, hidden_mask, batch):
        ids, answer = batch["preserve_ids"], batch["preserve_answer"]
        state = batch["state"].select(range(ids.shape[0]))
        # labels on the answer make the graft compute logits only where they are compared (the answers end the rows)
        labels = torch.full_like(ids, -100)
        labels[:, 1:] = torch.where(answer[:, :-1], ids[:, 1:], -100)
        logits = graft(ids, state, attention_mask=batch["preserve_mask"], labels=labels).logits.float()
        keep = logits.shape[1]
        answer, bare = answer[:, -keep:], batch["preserve_logits"][:, -keep:]
        kl = F.kl_div(torch.log_softmax(logits[answer], -1), torch.log_softmax(bare[answer], -1),
                      log_target=True, reduction="batchmean")
        return kl, {"preserve_kl": kl}
