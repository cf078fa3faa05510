"""The task registry, BABILong length labels and where the vendored data lives.

BABILong names its lengths ``0k, 1k, 2k, 4k, ..., 128k, 512k, 1M``. In the official generator
(``booydar/babilong``, ``data/create_tasks.py``) they are decimal: ``"1k"`` is 1000 tokens, ``"1M"``
1 000 000, counted with the GPT-2 tokenizer, and the generator subtracts 300 tokens from each length
"to take the prompt length into account", so the context (facts + background) of a ``"1k"`` sample
targets 700 tokens and the whole prompt lands near 1000. ``"0k"`` means the facts alone.
:func:`context_tokens` applies that reserve.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from graftkit.errors import GraftkitError

#: Token budget the official generator reserves for instruction, examples and question.
PROMPT_RESERVE = 300

#: The splits a BABILong sample can come from. Training samples use bAbI *train* stories and the
#: training books; evaluation samples use bAbI *test* stories and the test books.
SPLITS = ("train", "test")

#: The official length labels, in order.
LENGTHS = ("0k", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k", "256k", "512k", "1M")

#: bAbI v1.2 file stems for all 20 tasks (``{stem}_{split}.txt``); any of them loads from a user's
#: bAbI directory, the vendored subset holds the ones in :data:`TASKS`.
TASK_FILES = {
    "qa1": "qa1_single-supporting-fact",
    "qa2": "qa2_two-supporting-facts",
    "qa3": "qa3_three-supporting-facts",
    "qa4": "qa4_two-arg-relations",
    "qa5": "qa5_three-arg-relations",
    "qa6": "qa6_yes-no-questions",
    "qa7": "qa7_counting",
    "qa8": "qa8_lists-sets",
    "qa9": "qa9_simple-negation",
    "qa10": "qa10_indefinite-knowledge",
    "qa11": "qa11_basic-coreference",
    "qa12": "qa12_conjunction",
    "qa13": "qa13_compound-coreference",
    "qa14": "qa14_time-reasoning",
    "qa15": "qa15_basic-deduction",
    "qa16": "qa16_basic-induction",
    "qa17": "qa17_positional-reasoning",
    "qa18": "qa18_size-reasoning",
    "qa19": "qa19_path-finding",
    "qa20": "qa20_agents-motivations",
}


class DataError(GraftkitError):
    """A data request that cannot be served: unknown task or length, wrong split, missing files."""

    exit_code = 2


@dataclass(frozen=True)
class TaskInfo:
    """One bAbI task as vendored: where each split comes from and how many questions it holds."""

    name: str
    stem: str
    title: str
    train_source: str
    test_source: str
    n_train: int
    n_test: int


def _info(name: str, n_train: int, train_source: str = "en-10k") -> TaskInfo:
    stem = TASK_FILES[name]
    return TaskInfo(name, stem, stem.split("_", 1)[1].replace("-", " "), train_source, "en", n_train, 1000)


#: Tasks available in the vendored data (``graftkit/data/vendor``). Test splits come from bAbI ``en``
#: (1000 questions; byte-identical to ``en-10k`` test files). Training splits come from ``en-10k``
#: (10 000 questions), except qa3 whose ``en-10k`` train file was not available to vendor: its
#: training split is the 1000-question ``en`` file.
TASKS: dict[str, TaskInfo] = {
    "qa1": _info("qa1", 10000),
    "qa2": _info("qa2", 10000),
    "qa3": _info("qa3", 1000, train_source="en"),
    "qa4": _info("qa4", 10000),
    "qa5": _info("qa5", 10000),
}

_LENGTH = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_length(length: str | int) -> int:
    """A BABILong length label in tokens, decimal as in the official generator.

    ``parse_length("1k") == 1000``, ``parse_length("1M") == 1_000_000``, ``parse_length("0k") == 0``;
    a plain number (``512`` or ``"512"``) is taken as tokens.
    """
    if isinstance(length, bool):
        raise DataError(f"invalid length {length!r}: use a label like '1k' or a token count")
    if isinstance(length, int):
        if length < 0:
            raise DataError(f"invalid length {length}: must be >= 0")
        return length
    match = _LENGTH.match(str(length))
    if not match:
        raise DataError(f"invalid length {length!r}: use a label like '0k', '1k', '32k', '1M' or a token count")
    number, unit = match.groups()
    scale = {"": 1, "k": 1000, "m": 1_000_000}[unit.lower()]
    value = float(number) * scale
    if value != int(value):
        raise DataError(f"invalid length {length!r}: not a whole number of tokens")
    return int(value)


def length_label(length: str | int) -> str:
    """The canonical label of a length: ``"1K" -> "1k"``, ``1000 -> "1k"``, ``1_000_000 -> "1M"``, ``512 -> "512"``."""
    tokens = parse_length(length)
    if tokens == 0:
        return "0k"
    if tokens % 1_000_000 == 0:
        return f"{tokens // 1_000_000}M"
    if tokens % 1000 == 0:
        return f"{tokens // 1000}k"
    return str(tokens)


def context_tokens(length: str | int, prompt_reserve: int = PROMPT_RESERVE) -> int:
    """Token budget of a sample's context (facts + background) for a length label.

    As in the official generator: the label's tokens minus ``prompt_reserve``, and 0 (facts only)
    when that is not positive. ``context_tokens("1k") == 700``; ``context_tokens("1k", 0) == 1000``.
    """
    if prompt_reserve < 0:
        raise DataError(f"prompt_reserve must be >= 0, got {prompt_reserve}")
    return max(0, parse_length(length) - prompt_reserve)


def check_task(task: str) -> str:
    """``task`` if it is a known bAbI task name (``qa1`` ... ``qa20``), else a :class:`DataError`."""
    if task not in TASK_FILES:
        raise DataError(f"unknown task {task!r}: known tasks are {', '.join(TASK_FILES)}")
    return task


def check_split(split: str) -> str:
    """``split`` if it is ``"train"`` or ``"test"``, else a :class:`DataError`."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use 'train' (bAbI train stories, training books) or 'test' (bAbI test stories, test books)")
    return split


def each_valid(values: list, check) -> list:
    """`values` if `check` accepts each of them; else the first refusal as a ValueError (for config validators)."""
    for value in values:
        try:
            check(value)
        except DataError as exc:
            raise ValueError(str(exc)) from None
    return values


def vendor_dir() -> Path:
    """The folder of the vendored data inside the installed package."""
    return Path(__file__).resolve().parent / "vendor"
