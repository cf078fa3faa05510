"""bAbI v1.2 task files -> one :class:`BabiQuestion` per question.

File format (Weston et al., 2015)::

    1 Mary moved to the bathroom.
    2 John went to the hallway.
    3 Where is Mary? <TAB>bathroom<TAB>1

Line ids restart at 1 with each new story; a question line carries ``question<TAB>answer<TAB>ids``
where ids are the supporting line ids. As in BABILong (``get_dataset_df`` in ``booydar/babilong``),
each question becomes one sample whose facts are the story's statements *before* it, in order,
without line ids, and without the story's earlier questions.
"""

from __future__ import annotations

import functools
import gzip
import lzma
import os
from dataclasses import dataclass
from pathlib import Path

from graftkit.data.tasks import TASK_FILES, TASKS, DataError, check_split, check_task, vendor_dir


@dataclass(frozen=True)
class BabiQuestion:
    """One bAbI question with the facts of its story that precede it."""

    task: str
    split: str
    index: int  #: position of the question in its file, from 0
    story: int  #: position of the story in its file, from 0
    line: int  #: the question's line id inside its story
    facts: tuple[str, ...]
    fact_ids: tuple[int, ...]  #: original line id of each fact
    question: str
    answer: str
    supporting_ids: tuple[int, ...]  #: line ids of the supporting facts

    @property
    def supporting_facts(self) -> tuple[str, ...]:
        """The supporting facts' texts, in the order the file lists their ids."""
        where = dict(zip(self.fact_ids, self.facts))
        return tuple(where[i] for i in self.supporting_ids)


def parse_babi(text: str, task: str = "", split: str = "", source: str = "<text>") -> list[BabiQuestion]:
    """Parse the text of one bAbI task file; ``source`` names it in error messages."""
    questions: list[BabiQuestion] = []
    facts: list[tuple[int, str]] = []
    story = -1
    previous = 0
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        head, _, rest = raw.lstrip("\ufeff").partition(" ")
        try:
            line = int(head)
        except ValueError:
            raise DataError(f"{source}:{lineno}: a bAbI line starts with its id, got {raw[:60]!r}") from None
        if line == 1:
            story, facts = story + 1, []
        elif story < 0 or line != previous + 1:
            raise DataError(f"{source}:{lineno}: line id {line} does not follow {previous}")
        previous = line
        if "\t" not in rest:
            facts.append((line, rest.strip()))
            continue
        parts = rest.split("\t")
        if len(parts) < 2 or not parts[1].strip():
            raise DataError(f"{source}:{lineno}: a question line needs 'question<TAB>answer<TAB>ids'")
        try:
            supporting = tuple(int(i) for i in parts[2].split()) if len(parts) > 2 else ()
        except ValueError:
            raise DataError(f"{source}:{lineno}: supporting fact ids must be integers, got {parts[2]!r}") from None
        known = {i for i, _ in facts}
        if any(i not in known for i in supporting):
            raise DataError(f"{source}:{lineno}: supporting ids {supporting} are not facts of this story")
        questions.append(
            BabiQuestion(
                task=task,
                split=split,
                index=len(questions),
                story=story,
                line=line,
                facts=tuple(f for _, f in facts),
                fact_ids=tuple(i for i, _ in facts),
                question=parts[0].strip(),
                answer=parts[1].strip(),
                supporting_ids=supporting,
            )
        )
    return questions


def read_text(path: str | os.PathLike) -> str:
    """A text file's content, transparently decompressing ``.xz`` and ``.gz``."""
    path = Path(path)
    if path.suffix == ".xz":
        with lzma.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return path.read_text(encoding="utf-8")


def _with_compressed(path: Path) -> list[Path]:
    return [path, path.with_name(path.name + ".xz"), path.with_name(path.name + ".gz")]


def babi_file(task: str, split: str, babi_dir: str | os.PathLike | None = None) -> Path:
    """The file a task's split is read from.

    Without ``babi_dir``: the vendored copy (tasks in :data:`~graftkit.data.tasks.TASKS`). With it:
    ``babi_dir`` may be the ``tasks_1-20_v1-2`` folder (train from ``en-10k``, falling back to ``en``;
    test from ``en``, falling back to ``en-10k``) or a flat folder holding ``{stem}_{split}.txt``
    files (optionally ``.xz``/``.gz``).
    """
    check_task(task)
    check_split(split)
    name = f"{TASK_FILES[task]}_{split}.txt"
    if babi_dir is None:
        if task not in TASKS:
            raise DataError(
                f"task {task!r} is not in the vendored data (it holds {', '.join(TASKS)}); "
                "pass babi_dir= pointing at a bAbI v1.2 folder (tasks_1-20_v1-2)"
            )
        return vendor_dir() / "babi" / (name + ".xz")
    root = Path(babi_dir)
    subdirs = ["en-10k", "en", "."] if split == "train" else ["en", "en-10k", "."]
    tried = [p for sub in subdirs for p in _with_compressed(root / sub / name)]
    for path in tried:
        if path.is_file():
            return path
    raise DataError(f"no bAbI file for {task} {split} under {root}; looked for {name} in {', '.join(subdirs)}")


@functools.lru_cache(maxsize=64)
def _load(task: str, split: str, path: Path, mtime: float) -> tuple[BabiQuestion, ...]:
    return tuple(parse_babi(read_text(path), task=task, split=split, source=str(path)))


def load_babi(task: str, split: str, babi_dir: str | os.PathLike | None = None) -> tuple[BabiQuestion, ...]:
    """All questions of one task split, in file order (cached per file)."""
    path = babi_file(task, split, babi_dir)
    return _load(task, split, path, path.stat().st_mtime)
