"""Per-user memories: one `MemoryState` per user (or conversation), kept in a safetensors file.

A graft is shared; what each user told it lives in their own state::

    from graftkit import load_graft
    from graftkit.sessions import ask, fork, load_state, memorize, reset, save_state

    graft = load_graft("exports/babi-qa1")
    state = load_state(graft, "alice.safetensors", missing_ok=True)  # a fresh memory the first time
    state = memorize(graft, "Mary went to the kitchen.", state)      # turn 1, appended
    ask(graft, "Where is Mary?", state, task="qa1")                  # turn 2, from memory alone
    save_state(graft, state, "alice.safetensors")

- `save_state(graft, state, path)` stamps the graft's identity (`graft.identity()`: memory kind, memory
  config hash and a hash of the backbone manifest and graft weights) into the state's metadata and
  writes it atomically. A state already stamped by another graft is refused instead of relabelled.
- `load_state(graft, path)` reads a state and refuses (`StateError`) one saved by another graft: a
  memory written by other weights means nothing to this one. `missing_ok=True` gives a fresh memory
  when the file does not exist yet.
- `memorize(graft, text, state)` writes text into a state (no gradients), continuing it the way one
  running text would continue (a space joins it to what the state already holds).
- `ask(graft, question, state, task=None)` answers from the state alone; with `task` the question is
  put into that BABILong task's prompt the way the graft saw questions in training.
- `chat_turn(graft, state, line, task=None)`: one line of a conversation; questions (ending in "?")
  are answered, anything else is memorized.
- `fork(state)` is an independent copy (`state.clone()`): writing into the fork leaves the original
  as it was, e.g. to try a "what if" without touching the user's memory.
- `reset(graft)` is an empty memory of one row (`graft.init_state(1)`).

The command line wraps these: `graftkit memorize`, `graftkit ask` and `graftkit chat`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from graftkit.errors import GraftkitError, StateError
from graftkit.state import MemoryState


def save_state(graft, state: MemoryState, path: str | os.PathLike) -> Path:
    """Write `state` to `path` (safetensors, atomic), stamped with `graft.identity()`; returns the path."""
    identity = graft.identity()
    for key in ("memory_kind", "graft"):
        got = state.metadata.get(key)
        if got is not None and got != identity[key]:
            raise StateError(
                f"{path}: refusing to save a state of another {key.replace('_', ' ')} ({got!r}) as one of this graft "
                f"({identity[key]!r})"
            )
    return MemoryState(state.tensors, {**state.metadata, **identity}).save(path)


def load_state(graft, path: str | os.PathLike, missing_ok: bool = False) -> MemoryState:
    """Read a state saved by `save_state` for this graft; another graft's state raises `StateError`.

    With `missing_ok`, a path that does not exist yet gives a fresh memory (`reset(graft)`).
    """
    if missing_ok and not Path(path).exists():
        return reset(graft)
    return MemoryState.load(path, expect=graft.identity(), device=graft.backbone.device)


def memorize(graft, text: str, state: MemoryState | None = None) -> MemoryState:
    """Turn 1 for one user: append `text` to `state` (a fresh memory if None); returns the new state."""
    if not text or not text.strip():
        raise GraftkitError("nothing to memorize: the text is empty")
    if state is None:
        state = reset(graft)
    if state.batch_size != 1:
        raise StateError(f"a user's memory has one row; this state has {state.batch_size}")
    if not bool(state.is_empty.all()) and not text[:1].isspace():
        text = " " + text  # as inside one running text, so the tokens match what training wrote
    with torch.no_grad():
        return graft.memorize(text, state).detach()


def ask(graft, question: str, state: MemoryState, task: str | None = None, max_new_tokens: int = 32) -> str:
    """Turn 2 for one user: the answer to `question` from `state` alone.

    With `task` (a BABILong task the graft was trained on, e.g. `graft.export_config["tasks"][0]`), the
    question goes into that task's prompt exactly as in training and evaluation: the instruction is
    the shared prefix, the memory is read into the question part.
    """
    if state.batch_size != 1:
        raise StateError(f"a user's memory has one row; this state has {state.batch_size}")
    if task is None:
        return graft.answer(question, state, max_new_tokens=max_new_tokens)[0]
    from graftkit.data.prompts import question_prompt
    from graftkit.protocol import split_prompt

    question = question.strip()
    head, tail = split_prompt(question_prompt(task, question), question)
    return graft.answer(tail, state, max_new_tokens=max_new_tokens, instruction=head)[0]


def chat_turn(graft, state: MemoryState, line: str, task: str | None = None, max_new_tokens: int = 32) -> tuple[MemoryState, str | None]:
    """One line of a conversation: a line ending in "?" is answered from memory (the reply), any other
    non-empty line is memorized (no reply). Returns (the new state, the reply or None)."""
    line = line.strip()
    if line.endswith("?"):
        return state, ask(graft, line, state, task=task, max_new_tokens=max_new_tokens)
    if line:
        state = memorize(graft, line, state)
    return state, None


def fork(state: MemoryState) -> MemoryState:
    """An independent copy of a memory: writing into it leaves `state` unchanged."""
    return state.clone()


def reset(graft) -> MemoryState:
    """An empty memory (one row) for `graft`."""
    return graft.init_state(1)
