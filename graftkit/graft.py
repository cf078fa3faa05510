"""Graft: a frozen backbone, one memory and one injector.

Turn 1, `memorize`: text -> backbone hidden states at the memory's `write_layer` (no gradient into
the backbone; computed in independent segments of `segment_tokens`) -> `memory.write` -> new state.
Turn 2, `forward` / `generate` / `answer`: the question alone; the injector reads the state.
With the memory's `standardize` on (the default), written hidden states first go through a
`WriteNorm` calibrated on the backbone when the graft is built (see `graftkit.write_norm`).

Legend: b batch, n tokens, d hidden size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import nn

from graftkit.backbone import Backbone
from graftkit.errors import GraftkitError
from graftkit.injector import Injector
from graftkit.kv_cache import cache_kwargs, cache_name, output_cache
from graftkit.memory import Memory
from graftkit.state import MemoryState
from graftkit.write_norm import CALIBRATION_TOKENS, WriteNorm, calibration_text


class Graft(nn.Module):
    """Frozen backbone + trainable memory + trainable injector.

    The backbone is a plain attribute, not a submodule: `parameters()`, `state_dict()` and
    `trainable_parameters()` hold graft tensors only.
    """

    #: The export's configuration, on a graft loaded by `graftkit.export.load_graft` (absent otherwise).
    export_config: dict

    def __init__(self, backbone: Backbone, memory: Memory, injector: Injector, calibrate: bool = True):
        """`calibrate=False` leaves the write statistics unmeasured (the identity): for callers that load
        trained graft tensors next, which carry them."""
        super().__init__()
        if memory.dim != backbone.hidden_size:
            raise GraftkitError(f"memory.dim: {memory.dim} does not match the backbone's hidden size {backbone.hidden_size}")
        self.backbone = backbone
        self.memory = memory
        self.injector = injector
        self._prefix_kv: dict[tuple[int, ...], list] = {}  # shared-prefix keys/values, computed once
        self.write_norm = WriteNorm(backbone.hidden_size) if memory.config.standardize else None
        if self.write_norm is not None and calibrate:
            self.calibrate()  # before the injector attaches: the bare backbone's statistics
        # a plain callable, not a submodule: the statistics stay graft tensors under `write_norm` only
        injector.query_norm = None if self.write_norm is None else self.write_norm.forward
        injector.attach(backbone)
        self.to(backbone.device)

    def calibrate(self) -> None:
        """Measure the write-layer statistics of `WriteNorm` on the fixed calibration passage."""
        ids = self.backbone.text_ids(calibration_text())[:CALIBRATION_TOKENS]
        hidden = self.context_hidden(torch.tensor([ids], device=self.backbone.device))
        assert self.write_norm is not None, "calibrate: this graft's memory does not standardize its writes"
        self.write_norm.calibrate(hidden[0])

    # -- identity ------------------------------------------------------------------------------------
    def identity(self) -> dict[str, str]:
        """Metadata stamped on states this graft writes; a state from another graft is refused."""
        tensors = sorted(self.state_dict().items())
        version = tuple((name, t.data_ptr(), t._version) for name, t in tensors)  # recomputed once a tensor changes
        if getattr(self, "_identity", (None,))[0] != version:
            h = hashlib.sha256(repr(self.backbone.manifest()).encode())
            for name, tensor in tensors:
                h.update(name.encode())
                h.update(tensor.detach().float().cpu().numpy().tobytes())
            self._identity = (version, h.hexdigest()[:16])
        return {**self.memory.identity, "graft": self._identity[1]}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Memory and injector parameters; collected structurally, so never a backbone tensor."""
        return [p for p in self.parameters() if p.requires_grad]

    def freeze(self, names: list[str], apply: bool = True) -> list[str]:
        """Hold the parameters named by `names` (a parameter name or a dotted prefix) fixed; returns their names.

        Every entry must name some parameter, and some parameter must stay trainable. `apply=False` only
        checks and names them."""
        params = dict(self.named_parameters())
        for entry in names:
            if not any(n == entry or n.startswith(entry + ".") for n in params):
                heads = sorted({n.split(".")[0] for n in params})
                raise GraftkitError(f"train.freeze: {entry!r} names no graft parameter (they start with {', '.join(heads)})")
        frozen = [n for n in params if any(n == e or n.startswith(e + ".") for e in names)]
        if len(frozen) == len(params):
            raise GraftkitError(f"train.freeze: {names} holds every graft parameter fixed; nothing would train")
        for n in frozen if apply else []:
            params[n].requires_grad_(False)
        return frozen

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
        if self.write_norm is not None:
            hidden = self.write_norm(hidden.float())
        return self.memory.write(hidden.to(self.memory_dtype), state, mask)

    def write_strengths(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The memory's per-token write strengths (b n heads) for hidden states `write_hidden` would write;
        None if the memory has no per-token write gates."""
        if self.write_norm is not None:
            hidden = self.write_norm(hidden.float())
        return self.memory.write_strengths(hidden.to(self.memory_dtype))

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
            if isinstance(texts, str):
                texts = [texts]
            if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
                raise GraftkitError("memorize: texts must be a string or a list of strings, one per row")
            input_ids, attention_mask = self.tokenize_context(list(texts))
        assert input_ids is not None  # texts or input_ids, checked above
        if state is not None and state.batch_size != input_ids.shape[0]:
            raise GraftkitError(f"memorize: {input_ids.shape[0]} texts but the state has {state.batch_size} rows")
        hidden = self.context_hidden(input_ids, attention_mask)
        return self.write_hidden(hidden, None if attention_mask is None else attention_mask.bool(), state)

    @property
    def memory_dtype(self) -> torch.dtype:
        return next(self.memory.parameters()).dtype

    # -- turn 2 -----------------------------------------------------------------------------------------
    # Turn 2 may start with a shared `prefix_ids` (e.g. the chat template's system turn and the task
    # instruction): identical for every row and independent of the memory, so its keys/values are
    # computed once by the bare backbone and reused. The injector sees only what follows it.

    def _inputs(self, input_ids, attention_mask, state):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if state.batch_size != input_ids.shape[0]:
            raise GraftkitError(f"the state has {state.batch_size} rows but the input has {input_ids.shape[0]}")
        embeds = self.backbone.embedding(input_ids)
        embeds, mask = self.injector.prepare_inputs(embeds, attention_mask)
        return embeds, mask, embeds.shape[1] - input_ids.shape[1]

    @torch.no_grad()
    def prefix_kv(self, prefix_ids: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys/values (per layer) of a shared prefix, run once by the bare backbone and kept (16 at most)."""
        key = tuple(int(i) for i in prefix_ids)
        if key not in self._prefix_kv:
            assert self.injector.context is None, "the shared prefix must be computed by the bare backbone"
            ids = torch.tensor([key], device=self.backbone.device)
            cache = output_cache(self.backbone.model(input_ids=ids, use_cache=True))
            if len(self._prefix_kv) >= 16:
                self._prefix_kv.pop(next(iter(self._prefix_kv)))
            self._prefix_kv[key] = [(layer.keys, layer.values) for layer in cache.layers]
        return self._prefix_kv[key]

    def _layout(self, prefix_kv, mask: torch.Tensor):
        """(cache, full attention mask, position ids) for inputs that follow an optional shared prefix."""
        if not prefix_kv:
            return None, mask, positions(mask)
        from transformers import DynamicCache  # here, not at the top: transformers takes seconds to import

        cache = DynamicCache(config=self.backbone.model.config)  # type: ignore[arg-type]  # `model` is typed nn.Module
        batch = mask.shape[0]
        for index, (k, v) in enumerate(prefix_kv):
            cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), index)
        width = prefix_kv[0][0].shape[2]
        full = torch.cat([mask.new_ones(batch, width), mask], dim=1)
        return cache, full, positions(mask) + width

    def forward(self, input_ids: torch.Tensor, state: MemoryState, attention_mask=None, labels=None, prefix_ids=None):
        """Turn 2: the question alone (after an optional shared `prefix_ids`), read against `state`.

        Without `labels`, `logits` cover every input position. With `labels` (-100 = not scored), the
        loss is the mean cross-entropy of the scored tokens and `logits` cover only the last
        `out.logits.shape[1]` input positions: those that predict a label (answers end the rows).
        """
        prefix_kv = self.prefix_kv(prefix_ids) if prefix_ids else None
        with self.injector.reading(self.memory, state):
            embeds, mask, added = self._inputs(input_ids, attention_mask, state)
            cache, full_mask, pos = self._layout(prefix_kv, mask)
            keep = 0 if labels is None else _positions_to_score(labels)
            out = self.backbone.model(
                inputs_embeds=embeds,
                attention_mask=full_mask,
                position_ids=pos,
                **cache_kwargs(cache),
                use_cache=cache is not None,
                logits_to_keep=keep,
            )
        setattr(out, cache_name(), None)
        if labels is None:
            out.logits = out.logits[:, added:]
            return out
        logits = out.logits[:, :-1].float()  # position t predicts label t + 1
        targets = labels[:, labels.shape[1] - keep + 1 :]
        out.loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return out

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        state: MemoryState,
        attention_mask=None,
        max_new_tokens: int = 16,
        use_cache: bool = True,
        prefix_ids=None,
    ) -> torch.Tensor:
        """Greedy decoding (b n) -> new tokens (b t), padded with pad_token_id after end of sequence."""
        model, tok = self.backbone.model, self.backbone.tokenizer
        stop = torch.tensor(sorted({tok.eos_token_id, *_as_list(getattr(model.generation_config, "eos_token_id", None))} - {None}))
        prefix_kv = self.prefix_kv(prefix_ids) if prefix_ids else None
        with self.injector.reading(self.memory, state):
            embeds, mask, _ = self._inputs(input_ids, attention_mask, state)
            cache, full_mask, pos = self._layout(prefix_kv, mask)
            out = model(inputs_embeds=embeds, attention_mask=full_mask, position_ids=pos, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
            new, done = [], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            for _ in range(max_new_tokens):
                token = out.logits[:, -1].argmax(-1)
                token = torch.where(done, torch.full_like(token, tok.pad_token_id), token)
                new.append(token)
                done |= torch.isin(token, stop.to(token.device))
                if done.all() or len(new) == max_new_tokens:
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                if use_cache:
                    full_mask = torch.cat([full_mask, torch.ones_like(mask[:, :1])], dim=1)
                    pos = pos[:, -1:] + 1
                    out = model(
                        input_ids=token[:, None], attention_mask=full_mask, position_ids=pos, **cache_kwargs(output_cache(out)), use_cache=True
                    )
                else:  # recompute everything after the shared prefix (a reference for the cached path)
                    embeds = torch.cat([embeds, self.backbone.embedding(token[:, None])], dim=1)
                    cache, full_mask, pos = self._layout(prefix_kv, mask)
                    out = model(
                        inputs_embeds=embeds,
                        attention_mask=full_mask,
                        position_ids=pos,
                        **cache_kwargs(cache),
                        use_cache=cache is not None,
                        logits_to_keep=1,
                    )
        return torch.stack(new, dim=1)

    def answer(self, questions: str | Sequence[str], state: MemoryState, max_new_tokens: int = 16, instruction: str = "") -> list[str]:
        """Turn 2 in text: each question answered from its row of `state`.

        The user message is `instruction + question`; the chat template's head and the instruction form
        the shared prefix, and the injector reads the memory into what follows (as in training).
        """
        questions = [questions] if isinstance(questions, str) else list(questions)
        parts = [self.backbone.chat_parts(instruction, q) for q in questions]
        prefix = parts[0][0]
        ids, mask = pad([suffix for _, suffix in parts], self.backbone.tokenizer.pad_token_id, side="left", device=self.backbone.device)
        new = self.generate(ids, state, mask, max_new_tokens=max_new_tokens, prefix_ids=prefix)
        return [t.strip() for t in self.backbone.tokenizer.batch_decode(new, skip_special_tokens=True)]


def _positions_to_score(labels: torch.Tensor) -> int:
    """How many trailing positions are needed to predict every scored label (at least 2)."""
    scored = (labels != -100).any(0).nonzero()
    first = int(scored[0]) if len(scored) else labels.shape[1] - 1
    return min(labels.shape[1], max(2, labels.shape[1] - first + 1))


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
