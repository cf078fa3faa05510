"""The task contract: where training and evaluation episodes come from, and how answers are judged.

A task yields *examples*. An example is one question of an episode: the episode's turn-1 sessions
(texts written into memory in order, each its own write), then the question and its answer. Examples
of one episode share `context_uid`, the key their turn-1 hidden states are cached under.

A task also says how a question is put to the model in turn 2 (`prompt`: an instruction that forms the
shared prefix, and the question message), how an answer is scored (`score`), whether its answers come
from a closed set (`labels`, which enables the chance row and objectives that need a label set), and
what the bare backbone reads for the full-context baseline (`full_context_prompt`).

Examples come in *buckets* (e.g. one per context length): every example of a training batch comes
from one bucket, and evaluation reports one cell per bucket. A task and its prompts are the same for
every example of a bucket.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from pydantic import Field

from graftkit.config import Config
from graftkit.plugins import get_plugins

SPLITS = ("train", "test")


class TaskConfig(Config):
    """Fields every task block has; a task's own Config adds its options."""

    task: str = Field("", description="Registered task name (see `graftkit plugins`).")
    weight: float = Field(1.0, gt=0, description="Share of training batches drawn from this task, relative to the others.")
    seed: int = Field(0, description="Seed of the data construction (which stories, names, background text).")


@dataclass(frozen=True)
class Example:
    """One question of an episode, ready for both turns."""

    uid: str  #: stable id of this question (a cache and prediction key)
    sessions: tuple[str, ...]  #: turn-1 texts, written into memory in this order
    question: str
    target: str  #: the reference answer
    bucket: str  #: which bucket it belongs to, e.g. "profile/4s/1k"
    context_uid: str = ""  #: shared by the questions of one episode; defaults to `uid`
    length: str = ""  #: a length label where the task has lengths ("1k"), else ""
    info: dict[str, Any] = field(default_factory=dict, compare=False)  #: task-specific details (kept in predictions)
    prompt: Prompt | None = field(default=None, compare=False)  #: set by `load_examples` from the task

    def __post_init__(self):
        if not self.context_uid:
            object.__setattr__(self, "context_uid", self.uid)

    @property
    def context(self) -> str:
        """All sessions as one text (for the full-context baseline and for display)."""
        return "\n\n".join(self.sessions)


@dataclass(frozen=True)
class Prompt:
    """How a question is put in turn 2: `instruction` is the shared prefix of the user message, then
    `template` with `{question}` in it. An empty instruction sends the question as it is."""

    instruction: str = ""
    template: str = "{question}"

    def parts(self, question: str) -> tuple[str, str]:
        head = self.instruction + ("\n\n" if self.instruction else "")
        return head, self.template.format(question=question.strip())


class Task:
    """Base class of every task plugin. Subclasses set `name` and `Config` and implement `buckets` and
    `examples`; the rest has plain defaults (no instruction, exact match after normalisation, open answers)."""

    name: ClassVar[str]
    Config: ClassVar[type[TaskConfig]] = TaskConfig
    #: Whether `fact_mask` can say which context tokens are facts (for `train.background_cost`).
    marks_facts: ClassVar[bool] = False
    #: Whether every answer comes from a closed set (`labels`): needed by the recall stage and loss.
    closed_answers: ClassVar[bool] = False
    #: A statement and a question about it, for model cards and help texts.
    demo: ClassVar[tuple[str, str]] = ("My sister Ana lives in Porto.", "Where does my sister live?")

    def __init__(self, config: TaskConfig):
        self.config = config if config.task else config.model_copy(update={"task": self.name})

    def buckets(self, split: str) -> list[str]:
        """Bucket names of a split ("train" or "test"), in order."""
        raise NotImplementedError

    def examples(self, split: str, bucket: str, n: int | None, tokenizer=None, seed_offset: int = 0) -> list[Example]:
        """Up to `n` examples of a bucket (all of them with None). `tokenizer` is the backbone's, for tasks
        that size contexts in tokens; `seed_offset` is added to the configured seed (a fresh draw)."""
        raise NotImplementedError

    def train_count(self, bucket: str) -> int | None:
        """How many training examples to draw from a bucket (None: all there are)."""
        return None

    def eval_count(self) -> int | None:
        """How many examples per bucket the in-training evaluation uses (None: all there are)."""
        return None

    def prompt(self, example: Example) -> Prompt:
        return Prompt()

    def prompts(self) -> dict[str, Prompt]:
        """The named prompts this task puts questions in (recorded in exports, so that `graftkit ask --task
        NAME` can put a question the way training did); none for tasks that send questions as they are."""
        return {}

    def score(self, example: Example, output: str) -> bool:
        return exact_match(example.target, output)

    def labels(self, example: Example) -> Sequence[str] | None:
        """The closed set the answer comes from, or None for open answers."""
        return None

    def full_context_prompt(self, example: Example) -> str:
        """What the bare backbone reads for the full-context baseline (one user message)."""
        head, question = self.prompt(example).parts(example.question)
        return f"{head}{example.context}\n\n{question}"

    def fact_mask(self, example: Example, offsets) -> Any:
        """Which turn-1 tokens (character `offsets` into `example.context`) are facts; tasks with
        `marks_facts` implement it."""
        raise NotImplementedError(f"task {self.name!r} does not mark facts")

    def describe(self) -> str:
        """One line for logs and model cards."""
        options = self.config.model_dump(exclude={"task", "weight", "seed"})
        return f"{self.name} (" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")"


def build_task(config: TaskConfig) -> Task:
    """The task a validated data block names."""
    return get_plugins().registries["task"].get(config.task)(config)


def load_examples(task: Task, split: str, bucket: str, n: int | None, tokenizer=None, seed_offset: int = 0) -> list[Example]:
    """`task.examples(...)`, each with the task's turn-2 prompt attached (what the protocol needs of the task)."""
    return [replace(e, prompt=task.prompt(e)) for e in task.examples(split, bucket, n, tokenizer, seed_offset)]


# -- scorers -------------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """Lower case, punctuation and articles dropped, white space folded (the SQuAD normalisation)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(target: str, output: str) -> bool:
    """The output's first line equals the target after `normalize`."""
    lines = output.strip().splitlines()
    return normalize(lines[0] if lines else "") == normalize(target)


def contains(target: str, output: str) -> bool:
    """The normalised target appears as whole words in the normalised output."""
    t, o = normalize(target), normalize(output)
    return bool(t) and f" {t} " in f" {o} "


def token_f1(target: str, output: str) -> float:
    """SQuAD token F1 between target and output."""
    t, o = normalize(target).split(), normalize(output).split()
    common = sum((Counter(t) & Counter(o)).values())
    if not t or not o or not common:
        return float(t == o)
    precision, recall = common / len(o), common / len(t)
    return 2 * precision * recall / (precision + recall)


SCORERS = {"exact": exact_match, "contains": contains, "f1": lambda t, o: token_f1(t, o) >= 0.5}
