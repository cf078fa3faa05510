"""Graft: a frozen backbone, one memory and one injector.

Turn 1, `memorize`: text -> backbone hidden states at the memory's `write_layer` (no gradient into
the backbone; computed in independent segments of `segment_tokens`) -> `memory.write` -> new state.
Turn 2, `forward` / `generate` / `answer`: the question alone; the injector reads the state.

Legend: b batch, n tokens, d hidden size.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from torch import nn

from graftkit.errors import GraftkitError
from graftkit.injector import Injector
from graftkit.memory import Memory
from graftkit.state import MemoryState


class Graft(nn.Module):
    """Frozen backbone + trainable memory + trainable injector.

    The backbone is a plain attribute, not a submodule: `parameters()`, `state_dict()` and
    `trainable_parameters()` hold graft tensors only.
    """

    def __init__(self, backbone, memory: Memory, injector: Injector):
        super().__init__()
        if memory.dim != backbone.hidden_size:
            raise GraftkitError(f"memory.dim: {memory.dim} does not match the backbone's hidden size {backbone.hidden_size}")
        self.backbone = backbone
        self.memory = memory
        self.injector = injector
        injector.attach(backbone)
        self.to(backbone.device)

    # -- identity ------------------------------------------------------------------------------------
    def identity(self) -> dict[str, str]:
        """Metadata stamped on states this graft writes; a state from another graft is refused."""
        h = hashlib.sha256(repr(self.backbone.manifest()).encode())
        for name, tensor in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().numpy().tobytes())
        return {**self.memory.identity, "graft": h.hexdigest()[:16]}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Memory and injector parameters; collected structurally, so never a backbone tensor."""
        return [p for p in self.parameters() if p.requires_grad]

    def graft_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.state_dict().items()}

    # -- turn 1 -----------------------------------------------------------------------------------------
    def init_state(self, batch_size: int = 1) -> MemoryState:
        return self.memory.init_state(batch_size, device=self.backbone.device)

    def tokenize_context(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and mask of turn-1 texts (no chat template, no special tokens)."""
        rows = [self.backbone.text_ids(t) for t in texts]
        return pad(rows, self.backbone.tokenizer.pad_token_id, side="right", device=self.backbone.device)

    @torch.no_grad()
    def context_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Backbone hidden states at the write layer, segment by segment (b n d), float32, no grad."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        seg = self.memory.config.segment_tokens
        layer = self.memory.config.write_layer
        parts = []
        for start in range(0, input_ids.shape[1], seg):
            ids, mask = input_ids[:, start : start + seg], attention_mask[:, start : start + seg]
            hidden = self.backbone.hidden_states(ids, layer, mask).float()
            parts.append(hidden.masked_fill(~mask.bool()[..., None], 0.0))  # padding carries nothing
        if not parts:
            return torch.zeros(input_ids.shape[0], 0, self.backbone.hidden_size, device=self.backbone.device)
        return torch.cat(parts, dim=1)

    def write_hidden(self, hidden: torch.Tensor, mask: torch.Tensor | None = None, state: MemoryState | None = None) -> MemoryState:
        """Write precomputed hidden states (b n d) into memory; differentiable w.r.t. graft parameters."""
        if state is None:
            state = self.init_state(hidden.shape[0])
        if hidden.shape[1] == 0:
            return state
        return self.memory.write(hidden.to(self.memory_dtype), state, mask)

    def memorize(
        self,
        texts: str | Sequence[str] | None = None,
        state: MemoryState | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> MemoryState:
        """Turn 1: write texts (one per row) or token ids into memory; returns the new state."""
        if (texts is None) == (input_ids is None):
            raise GraftkitError("memorize: pass either texts or input_ids")
        if texts is not None:
            texts = [texts] if isinstance(texts, str) else list(texts)
            input_ids, attention_mask = self.tokenize_context(texts)
        if state is not None and state.batch_size != input_ids.shape[0]:
            raise GraftkitError(f"memorize: {input_ids.shape[0]} texts but the state has {state.batch_size} rows")
        hidden = self.context_hidden(input_ids, attention_mask)
        return self.write_hidden(hidden, None if attention_mask is None else attention_mask.bool(), state)

    @property
    def memory_dtype(self) -> torch.dtype:
        return next(self.memory.parameters()).dtype

    # -- turn 2 -----------------------------------------------------------------------------------------
    def _inputs(self, input_ids, attention_mask, state):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if state.batch_size != input_ids.shape[0]:
            raise GraftkitError(f"the state has {state.batch_size} rows but the input has {input_ids.shape[0]}")
        embeds = self.backbone.embedding(input_ids)
        embeds, mask = self.injector.prepare_inputs(embeds, attention_mask)
        return embeds, mask, embeds.shape[1] - input_ids.shape[1]

    def forward(self, input_ids: torch.Tensor, state: MemoryState, attention_mask=None, labels=None):
        """Turn 2: the question alone, read against `state`. Returns the backbone output with logits
        (and loss when `labels` are given) for the input positions only."""
        with self.injector.reading(self.memory, state):
            embeds, mask, prefix = self._inputs(input_ids, attention_mask, state)
            if labels is not None and prefix:
                # The model predicts label t+1 from position t: without this, the last prepended token
                # would be scored on the first input label, which the bare backbone never predicts.
                labels = torch.cat([labels.new_full((labels.shape[0], prefix + 1), -100), labels[:, 1:]], dim=1)
            out = self.backbone.model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask), labels=labels, use_cache=False
            )
        out.logits = out.logits[:, prefix:]
        return out

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, state: MemoryState, attention_mask=None, max_new_tokens: int = 16, use_cache: bool = True
    ) -> torch.Tensor:
        """Greedy decoding (b n) -> new tokens (b t), padded with pad_token_id after end of sequence."""
        model, tok = self.backbone.model, self.backbone.tokenizer
        stop = {tok.eos_token_id, *_as_list(getattr(model.generation_config, "eos_token_id", None))}
        stop.discard(None)
        with self.injector.reading(self.memory, state):
            embeds, mask, _ = self._inputs(input_ids, attention_mask, state)
            out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask), use_cache=use_cache)
            new, done = [], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            for _ in range(max_new_tokens):
                token = out.logits[:, -1].argmax(-1)
                token = torch.where(done, torch.full_like(token, tok.pad_token_id), token)
                new.append(token)
                done |= torch.isin(token, torch.tensor(sorted(stop), device=token.device))
                if done.all():
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                if use_cache:
                    pos = positions(mask)[:, -1:]
                    out = model(input_ids=token[:, None], attention_mask=mask, position_ids=pos,
                                past_key_values=out.past_key_values, use_cache=True)
                else:
                    embeds = torch.cat([embeds, self.backbone.embedding(token[:, None])], dim=1)
                    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask), use_cache=False)
        return torch.stack(new, dim=1)

    def answer(self, questions: str | Sequence[str], state: MemoryState, max_new_tokens: int = 16) -> list[str]:
        """Turn 2 in text: each question (a chat user message) answered from its row of `state`."""
        questions = [questions] if isinstance(questions, str) else list(questions)
        rows = [self.backbone.chat_ids(q) for q in questions]
        ids, mask = pad(rows, self.backbone.tokenizer.pad_token_id, side="left", device=self.backbone.device)
        new = self.generate(ids, state, mask, max_new_tokens=max_new_tokens)
        return [t.strip() for t in self.backbone.tokenizer.batch_decode(new, skip_special_tokens=True)]


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding (b n)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def pad(rows: Sequence[Sequence[int]], pad_id: int, side: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id rows to one length; returns (ids, mask) as (b n) tensors."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
