"""Your own episodes, from JSON Lines files.

One episode per line::

    {"sessions": ["I moved to Porto in May.", "My cat is called Miso."], "question": "What is my cat called?", "answer": "Miso"}
    {"sessions": "The vault code is 4471.", "questions": [{"question": "What is the vault code?", "answer": "4471"}],
     "instruction": "Answer with the code only.", "choices": ["4471", "1234"]}

- `sessions`: a text, or a list of texts written into memory in order (each its own write);
- `question` and `answer`, or `questions`: a list of `{question, answer}` about the same sessions;
- `instruction` (optional): put before the question in turn 2 (the block's `instruction` otherwise);
- `choices` (optional): the closed set the answer comes from (gives the chance row).

A file is read whole and checked line by line before anything is used: every bad line is reported with
its file and line number, and one bad line loads nothing. Without a `test` file, a seeded tenth of the
training episodes (`test_fraction`) is held out for evaluation.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from graftkit.errors import GraftkitError
from graftkit.task import SCORERS, Example, Prompt, Task, TaskConfig

#: At most this many bad lines are listed in one message (the count of all of them is given).
MAX_LISTED = 20


class JsonlError(GraftkitError):
    """A JSON Lines file that cannot be used; the message names the file and the lines."""

    exit_code = 2


class QA(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1)
    answer: str = Field(min_length=1)


class Line(BaseModel):
    """One episode as written in the file."""

    model_config = ConfigDict(extra="forbid")

    sessions: list[str]
    question: str | None = Field(None, min_length=1)
    answer: str | None = Field(None, min_length=1)
    questions: list[QA] | None = None
    instruction: str | None = None
    choices: list[str] | None = Field(None, min_length=2)

    @field_validator("sessions", mode="before")
    @classmethod
    def _sessions(cls, value: Any) -> list[str]:
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError("expected a text or a list of texts")
        if not value or not all(s.strip() for s in value):
            raise ValueError("needs at least one non-empty text")
        return value

    @model_validator(mode="after")
    def _one_form(self) -> Line:
        single = self.question is not None or self.answer is not None
        if single and self.questions is not None:
            raise ValueError("give either question and answer, or questions, not both")
        if self.questions is None and (self.question is None or self.answer is None):
            raise ValueError("needs question and answer (or questions: a list of {question, answer})")
        if self.questions is not None and not self.questions:
            raise ValueError("questions: needs at least one {question, answer}")
        for qa in self.pairs():
            if self.choices is not None and qa.answer not in self.choices:
                raise ValueError(f"answer {qa.answer!r} is not one of choices")
        return self

    def pairs(self) -> list[QA]:
        return self.questions if self.questions is not None else [QA(question=self.question, answer=self.answer)]


def read_episodes(path: str | Path) -> list[Line]:
    """Every line of a JSON Lines file, validated; a `JsonlError` naming each bad line otherwise."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise JsonlError(f"{path}: no such file") from None
    except OSError as exc:
        raise JsonlError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise JsonlError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    lines, problems = [], []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            lines.append(Line.model_validate(json.loads(raw)))
        except json.JSONDecodeError as exc:
            problems.append(f"{path.name}:{number}: not valid JSON ({exc.msg}, column {exc.colno})")
        except ValidationError as exc:
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"]) or "line"
                message = "field required" if err["type"] == "missing" else err["msg"].removeprefix("Value error, ")
                problems.append(f"{path.name}:{number}: {where}: {message}")
    if problems:
        listed = problems[:MAX_LISTED] + ([f"... and {len(problems) - MAX_LISTED} more"] if len(problems) > MAX_LISTED else [])
        raise JsonlError(f"{path}: {len(problems)} problem(s); nothing was loaded\n  " + "\n  ".join(listed))
    if not lines:
        raise JsonlError(f"{path}: holds no episode (one JSON object per line)")
    return lines


class JsonlConfig(TaskConfig):
    train: str = Field(description="JSON Lines file of training episodes (one per line; see `graftkit.tasks.jsonl`).")
    test: str | None = Field(None, description="JSON Lines file of test episodes; none = hold out test_fraction of train.")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="Share of training episodes held out when there is no test file.")
    instruction: str = Field("", description="Put before every question in turn 2, unless a line has its own.")
    scorer: Literal["exact", "contains", "f1"] = Field(
        "exact",
        description="exact: the answer's first line equals the reference after normalisation (case, "
        "punctuation, articles, spaces); contains: the reference appears in the answer; f1: token F1 >= 0.5.",
    )
    eval_samples: int | None = Field(None, gt=0, description="Test questions per bucket used during training (none = all).")

    @field_validator("train", "test")
    @classmethod
    def _exists(cls, value: str | None) -> str | None:
        if value is None:
            return value
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError(f"no such file: {value}")
        try:
            read_episodes(path)  # a damaged or malformed file is refused here, before a run folder is made
        except JsonlError as exc:
            raise ValueError(str(exc)) from None
        return str(path.resolve())  # a run's recipe.yaml then works from any folder


class JsonlTask(Task):
    """Your own episodes from JSON Lines files: sessions, questions, answers (optional instruction, choices)."""

    name = "jsonl"
    Config = JsonlConfig
    demo = ("The vault code is 4471.", "What is the vault code?")

    def __init__(self, config: JsonlConfig):
        super().__init__(config)
        self._splits: dict[str, list[Example]] = {}

    def _load(self, split: str) -> list[Example]:
        if split not in self._splits:
            cfg = self.config
            if cfg.test is not None:
                lines = read_episodes(cfg.train if split == "train" else cfg.test)
                self._splits[split] = self._examples(lines, split)
            else:
                lines = read_episodes(cfg.train)
                held = np.random.default_rng(cfg.seed).random(len(lines)) < cfg.test_fraction
                if held.all() or not held.any():  # tiny files: keep at least one episode on each side
                    held = np.arange(len(lines)) == len(lines) - 1
                keep = held if split == "test" else ~held
                self._splits[split] = self._examples([l for l, k in zip(lines, keep) if k], split)
        return self._splits[split]

    def _examples(self, lines: list[Line], split: str) -> list[Example]:
        instructions = sorted({self._instruction(l) for l in lines})
        out = []
        for line in lines:
            context = hashlib.sha256(json.dumps(["jsonl", line.sessions]).encode()).hexdigest()[:20]
            bucket = _bucket(instructions.index(self._instruction(line)), len(instructions))
            for k, qa in enumerate(line.pairs()):
                uid = hashlib.sha256(json.dumps([context, split, k, qa.question, qa.answer]).encode()).hexdigest()[:20]
                out.append(
                    Example(
                        uid=uid,
                        sessions=tuple(line.sessions),
                        question=qa.question,
                        target=qa.answer,
                        bucket=bucket,
                        context_uid=context,
                        info={"instruction": self._instruction(line), "choices": line.choices},
                    )
                )
        return out

    def _instruction(self, line: Line) -> str:
        return self.config.instruction if line.instruction is None else line.instruction

    def buckets(self, split: str) -> list[str]:
        return sorted({e.bucket for e in self._load(split)})

    def eval_count(self) -> int | None:
        return self.config.eval_samples

    def examples(self, split, bucket, n, tokenizer=None, seed_offset=0):
        pool = [e for e in self._load(split) if e.bucket == bucket]
        if n is None or n >= len(pool):
            return pool
        order = np.random.default_rng([self.config.seed, seed_offset]).permutation(len(pool))[:n]
        return [pool[i] for i in sorted(order)]

    def prompt(self, example: Example) -> Prompt:
        return Prompt(example.info["instruction"])

    def prompts(self) -> dict[str, Prompt]:
        found = sorted({e.info["instruction"] for e in self._load("train")} - {""})
        return {_bucket(i, len(found)): Prompt(text) for i, text in enumerate(found)}

    def score(self, example: Example, output: str) -> bool:
        return bool(SCORERS[self.config.scorer](example.target, output))

    def labels(self, example: Example):
        return example.info["choices"]


def _bucket(index: int, count: int) -> str:
    return "jsonl" if count == 1 else f"jsonl/{index + 1}"
