"""Per-user memories: one `MemoryState` per user (or conversation), kept in a safetensors file.

A graft is shared; what each user told it lives in their own state::

    from graftkit import load_graft
    from graftkit.sessions import ask, fork, load_state, memorize, reset, save_state

    graft = load_graft("exports/my-graft")
    state = load_state(graft, "alice.safetensors", missing_ok=True)  # a fresh memory the first time
    state = memorize(graft, "Priya lives in Lisbon.", state)         # turn 1, appended
    ask(graft, "Where does Priya live?", state)                      # turn 2, from memory alone
    save_state(graft, state, "alice.safetensors")

- `save_state(graft, state, path)` stamps the graft's identity (`graft.identity()`: memory kind, memory
  config hash and a hash of the backbone manifest and graft weights) into the state's metadata and
  writes it atomically. A state already stamped by another graft is refused instead of relabelled.
- `load_state(graft, path)` reads a state and refuses (`StateError`) one saved by another graft: a
  memory written by other weights means nothing to this one. `missing_ok=True` gives a fresh memory
  when the file does not exist yet.
- `memorize(graft, text, state)` writes text into a state (no gradients), continuing it the way one
  running text would continue (a space joins it to what the state already holds).
- `ask(graft, question, state, task=None)` answers from the state alone, the question sent as it is;
  with `task` (a prompt name the export recorded, `graft.export_config["prompts"]`) it is put into that
  task's prompt the way the graft saw questions in training.
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
from graftkit.task import Prompt


def save_state(graft, state: MemoryState, path: str | os.PathLike) -> Path:
    """Write `state` to `path` (safetensors, atomic), stamped with `graft.identity()`; returns the path."""
    identity = graft.identity()
    for key in ("memory_kind", "graft"):
        got = state.metadata.get(key)
        if got is not None and got != identity[key]:
            raise StateError(
                f"{path}: refusing to save a state of another {key.replace('_', ' ')} ({got!r}) as one of this graft ({identity[key]!r})"
            )
    return MemoryState(state.tensors, {**state.metadata, **identity}).save(path)


def load_state(graft, path: str | os.PathLike, missing_ok: bool = False) -> MemoryState:
    """Read a state saved by `save_state` for this graft; another graft's state, or one whose tensors are
    not this graft's memory's (names, shapes, dtypes), raises `StateError`.

    With `missing_ok`, a path that does not exist yet gives a fresh memory (`reset(graft)`).
    """
    if missing_ok and not Path(path).exists():
        return reset(graft)
    state = MemoryState.load(path, expect=graft.identity(), device=graft.backbone.device)
    fresh = graft.init_state(state.batch_size if state.batch_size > 0 else 1)
    if set(state.tensors) != set(fresh.tensors):
        raise StateError(f"{path}: holds tensors {sorted(state.tensors)}, this graft's memory has {sorted(fresh.tensors)}")
    for name, want in fresh.tensors.items():
        got = state.tensors[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise StateError(f"{path}: {name} is {got.dtype} {tuple(got.shape)}, this graft's memory has {want.dtype} {tuple(want.shape)}")
    return state


def is_utf8(text: str) -> bool:
    """False for text holding lone surrogates (bytes that were not UTF-8, as Python keeps them from argv or stdin)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_utf8(text: str, what: str) -> None:
    if not is_utf8(text):
        raise GraftkitError(f"{what} is not valid UTF-8 text")


def _own(graft, state: MemoryState, where: str) -> None:
    """Refuse a state another graft wrote (the stamp `reset` and `save_state` put on it)."""
    got = state.metadata.get("graft")
    if got is None:
        return
    want = graft.identity()["graft"]
    if got != want:
        raise StateError(f"{where}: this memory was written by another graft ({got!r}); this one is {want!r}")


def memorize(graft, text: str, state: MemoryState | None = None) -> MemoryState:
    """Turn 1 for one user: append `text` to `state` (a fresh memory if None); returns the new state."""
    if not isinstance(text, str):
        raise GraftkitError(f"memorize: the text must be a string, not {type(text).__name__}")
    _check_utf8(text, "memorize: the text")
    if not text.strip():
        raise GraftkitError("nothing to memorize: the text is empty")
    if state is None:
        state = reset(graft)
    if state.batch_size != 1:
        raise StateError(f"a user's memory has one row; this state has {state.batch_size}")
    _own(graft, state, "memorize")
    if not bool(state.is_empty.all()) and not text[:1].isspace():
        text = " " + text  # as inside one running text, so the tokens match what training wrote
    with torch.no_grad():
        return graft.memorize(text, state).detach()


#: Longest question `ask` takes: turn 2 is one pass over the question, and its attention grows with its square.
MAX_QUESTION_CHARS = 8000


def ask(graft, question: str, state: MemoryState, task=None, max_new_tokens: int = 32) -> str:
    """Turn 2 for one user: the answer to `question` from `state` alone, the question sent as it is.

    With `task` (a prompt name the export recorded, see `task_prompts(graft)`, or a `graftkit.task.Prompt`),
    the question goes into that prompt exactly as in training and evaluation: the instruction is the shared
    prefix, the memory is read into the question part.
    """
    if state.batch_size != 1:
        raise StateError(f"a user's memory has one row; this state has {state.batch_size}")
    if not isinstance(question, str) or not question.strip():
        raise GraftkitError("ask: the question is empty")
    _check_utf8(question, "ask: the question")
    _own(graft, state, "ask")
    if max_new_tokens <= 0:
        raise GraftkitError(f"max_new_tokens: must be at least 1, got {max_new_tokens}")
    if len(question) > MAX_QUESTION_CHARS:
        raise GraftkitError(
            f"the question is {len(question)} characters long; a question may have at most "
            f"{MAX_QUESTION_CHARS} (memorize long text, then ask about it)"
        )
    if task is None:
        return graft.answer(question, state, max_new_tokens=max_new_tokens)[0]
    prompt = task if hasattr(task, "parts") else task_prompts(graft).get(task)
    if prompt is None:
        known = ", ".join(task_prompts(graft)) or "none (this graft sends questions as they are)"
        raise GraftkitError(f"--task {task}: not a prompt this graft was trained with (it has: {known})")
    head, tail = prompt.parts(question)
    return graft.answer(tail, state, max_new_tokens=max_new_tokens, instruction=head)[0]


def task_prompts(graft) -> dict:
    """The named task prompts an exported graft was trained with ({} for a graft not loaded from an export)."""
    recorded = (getattr(graft, "export_config", None) or {}).get("prompts") or {}
    return {name: Prompt(p.get("instruction", ""), p.get("template", "{question}")) for name, p in recorded.items()}


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
    """An empty memory (one row) for `graft`, stamped with its identity."""
    state = graft.init_state(1)
    return MemoryState(state.tensors, {**state.metadata, **graft.identity()})
