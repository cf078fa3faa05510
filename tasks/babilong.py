"""BABILong: bAbI facts hidden in background books, asked about after the context (Kuratov et al., 2024).

The data side (bAbI parsing, the sample builder, the official prompts and answer check) lives in
`graftkit.data`; this module makes it a task. Buckets are `{bAbI task}/{length}`, e.g. `qa1/1k`.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
from graftkit.tasks.held_out import retell
from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from graftkit.data.babilong import build_babilong, fact_token_mask
from graftkit.data.metric import compare_answers, task_labels
from graftkit.data.prompts import full_context_prompt as official_prompt
from graftkit.data.prompts import turn2_prompt
from graftkit.data.tasks import TASKS, DataError, check_split, check_task, each_valid, length_label, parse_length
from graftkit.task import Example, Prompt, Task, TaskConfig, load_examples


class BabilongConfig(TaskConfig):
    tasks: list[str] = Field(
        ["qa1"], min_length=1, description="bAbI tasks to train and evaluate on (qa1..qa5 vendored; any of qa1..qa20 with babi_dir)."
    )
    train_lengths: list[str] = Field(["0k", "1k"], min_length=1, description="Context lengths sampled for training.")
    eval_lengths: list[str] = Field(["1k"], min_length=1, description="Context lengths evaluated (in training and by `graftkit eval`).")
    train_samples: int | dict[str, int] = Field(
        2000,
        description="Training samples per bAbI task and length; a mapping such as {0k: 1000, 1k: 1000, 4k: 300} "
        "sets it per length (every training length must be named).",
    )
    eval_samples: int = Field(100, gt=0, description="Evaluation samples per bAbI task and length during training.")
    babi_dir: str | None = Field(None, description="A bAbI v1.2 directory to use instead of the vendored subset.")
    books: list[str] | None = Field(None, description="Background text files to use instead of the vendored books.")
    corrected: bool = Field(False, description="Score with the corrected answer check (whole words: qa7's none/one).")
    vocabulary: Literal["babi", "held_out"] = Field(
        "babi",
        description="held_out: test stories are retold with people, places, objects and movement verbs bAbI "
        "never uses, drawn per story (`graftkit.tasks.held_out`); training stories keep bAbI's words, so a graft "
        "passes only by recalling words it was not trained on. The answer check uses each story's renamed labels.",
    )

    train_vocabulary: Literal["babi", "varied"] = Field(
        "babi",
        description="varied: a share (`varied_share`) of training stories is retold, story by story, with "
        "people, places, objects and movement verbs drawn from training pools disjoint from bAbI's and from the "
        "held-out ones (`graftkit.tasks.held_out`), so a graft learns to recall whatever words a story uses. Not with "
        "the recall stage or loss, which classify into bAbI's answers.",
    )
    varied_share: float = Field(0.5, ge=0, le=1, description="Share of training stories retold with train_vocabulary: varied.")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, value: list[str]) -> list[str]:
        return each_valid(value, check_task)

    @field_validator("train_lengths", "eval_lengths")
    @classmethod
    def _lengths(cls, value: list[str]) -> list[str]:
        return each_valid(value, parse_length)

    @model_validator(mode="after")
    def _vendored(self) -> BabilongConfig:
        missing = [t for t in self.tasks if t not in TASKS]
        if self.babi_dir is None and missing:
            raise ValueError(
                f"tasks: {', '.join(missing)} not in the vendored data (it holds {', '.join(TASKS)}); "
                "set babi_dir to a bAbI v1.2 folder (tasks_1-20_v1-2)"
            )
        return self

    @field_validator("train_samples", mode="before")
    @classmethod
    def _counts(cls, value: Any, info: ValidationInfo) -> int | dict[str, int]:
        def count(n: Any) -> int:
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise PydanticCustomError("count", "expected a positive integer or a mapping {length: positive integer}")
            return n

        if not isinstance(value, dict):
            return count(value)
        counts = {str(length): count(n) for length, n in value.items()}
        named, lengths = set(map(_label, counts)), set(map(_label, info.data.get("train_lengths", [])))
        if len(named) != len(counts) or named != lengths:
            raise PydanticCustomError(
                "lengths",
                "names the lengths {named} but train_lengths is {lengths}; name each training length once",
                {"named": sorted(named), "lengths": sorted(lengths)},
            )
        return counts

    def samples_for(self, length: str) -> int:
        """Training samples per bAbI task at `length`."""
        if isinstance(self.train_samples, int):
            return self.train_samples
        return {_label(k): n for k, n in self.train_samples.items()}[_label(length)]


def _label(length: str) -> str:
    try:
        return length_label(length)
    except DataError:
        return str(length)


class BabilongTask(Task):
    """BABILong two-turn: bAbI stories in book text, the official prompts and answer check."""

    name = "babilong"
    Config = BabilongConfig
    marks_facts = True
    closed_answers = True
    demo = ("Mary went to the kitchen. John moved to the garden.", "Where is Mary?")

    def buckets(self, split: str) -> list[str]:
        check_split(split)
        lengths = self.config.train_lengths if split == "train" else self.config.eval_lengths
        return [f"{task}/{length_label(length)}" for task in self.config.tasks for length in lengths]

    def train_count(self, bucket: str) -> int:
        return self.config.samples_for(bucket.split("/")[1])

    def eval_count(self) -> int:
        return self.config.eval_samples

    def examples(self, split, bucket, n, tokenizer=None, seed_offset=0):
        task, length = bucket.split("/")
        if n is None:
            n = self.train_count(bucket) if split == "train" else self.config.eval_samples
        samples = build_babilong(
            task, split, length, n, seed=self.config.seed + seed_offset, tokenizer=tokenizer, books=self.config.books, babi_dir=self.config.babi_dir
        )
        labels = [None] * len(samples)
        words = self._retold_words(split)  # whose pools stories are retold from: "test" (held out), "train" or None
        if words is not None:
            share = 1.0 if words == "test" else self.config.varied_share
            picked = [share >= 1 or np.random.default_rng([self.config.seed, 41, int(s.uid[:8], 16)]).random() < share for s in samples]
            retold = [retell(s, task_labels(task), self.config.seed, split=words) if pick else (s, None) for s, pick in zip(samples, picked)]
            samples, labels = zip(*retold) if retold else ((), ())
        return [
            Example(
                uid=s.uid,
                sessions=(s.context,),
                question=s.question,
                target=s.target,
                bucket=bucket,
                length=s.length,
                info={
                    "task": s.task,
                    "facts": list(s.facts),
                    "source": s.source,
                    "n_tokens": s.n_tokens,
                    **({"labels": sorted(l)} if l is not None else {}),
                },
            )
            for s, l in zip(samples, labels)
        ]

    def _retold_words(self, split: str) -> str | None:
        if split == "test" and self.config.vocabulary == "held_out":
            return "test"
        if split == "train" and self.config.train_vocabulary == "varied":
            return "train"
        return None

    def prompt(self, example: Example) -> Prompt:
        return self.task_prompt(self._bab(example))

    def prompts(self) -> dict[str, Prompt]:
        return {task: self.task_prompt(task) for task in self.config.tasks}

    @staticmethod
    def task_prompt(task: str) -> Prompt:
        """The turn-2 prompt of a bAbI task: the official instruction, then "Question: ..."."""
        return turn2_prompt(task)

    def score(self, example: Example, output: str) -> bool:
        return bool(
            compare_answers(
                example.target, output, example.question, self._bab(example), corrected=self.config.corrected, labels=example.info.get("labels")
            )
        )

    def labels(self, example: Example):
        return example.info.get("labels") or sorted(task_labels(self._bab(example)))

    def full_context_prompt(self, example: Example) -> str:
        return official_prompt(self._bab(example), example.context, example.question)

    def fact_mask(self, example: Example, offsets):
        return fact_token_mask(SimpleNamespace(context=example.context, facts=example.info["facts"]), offsets)

    @staticmethod
    def _bab(example: Example) -> str:
        return example.info.get("task") or example.bucket.split("/")[0]


def babilong_examples(task: str, split: str, length: str, n: int, seed: int = 0, tokenizer=None, books=None, babi_dir=None) -> list[Example]:
    """Examples of one bAbI task at one length, with their turn-2 prompts: `build_babilong`'s samples as a
    task's examples (for scripts and tests that need one bucket)."""
    config = BabilongConfig(task="babilong", tasks=[task], seed=seed, books=books, babi_dir=babi_dir)
    return load_examples(BabilongTask(config), split, f"{task}/{length_label(length)}", n, tokenizer)
