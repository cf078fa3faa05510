"""The BABILong answer check, official behaviour by default, with an opt-in correction.

Official rule (``compare_answers`` in ``booydar/babilong``, ``babilong/metrics.py``), re-implemented:

1. The output is lower-cased and cut to its first sentence (everything before the first ``.``), then
   before any ``<context>`` or ``<example>``. Upstream also cuts before ``'Question'``, *after*
   lower-casing, so that cut never fires; it is reproduced as a no-op.
2. The task's labels (:data:`TASK_LABELS`) found in the question, as substrings, are excluded: a
   label the question mentions is never the answer.
3. The labels found in the output, as substrings, minus those: the answer is correct iff the target
   is among them and is the only one.

Substring matching has a defect in qa7, whose labels are ``one``, ``two`` and ``none``: "none"
contains "one", so an output "none" finds two labels and is always wrong, even when the target is
"none". (It also finds "no" in "not" or "know" for qa6, qa9 and qa10.) ``corrected=True`` matches
labels as whole words (``\\b`` boundaries) in both the question and the output; everything else is
unchanged. Report official numbers unless you say otherwise.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence

from graftkit.data.tasks import DataError

#: Official answer labels per task (qa8 and qa11-qa20 have none upstream).
TASK_LABELS: dict[str, frozenset[str]] = {
    "qa1": frozenset({"bathroom", "bedroom", "garden", "hallway", "kitchen", "office"}),
    "qa2": frozenset({"bathroom", "bedroom", "garden", "hallway", "kitchen", "office"}),
    "qa3": frozenset({"bathroom", "bedroom", "garden", "hallway", "kitchen", "office"}),
    "qa4": frozenset({"bathroom", "bedroom", "garden", "hallway", "kitchen", "office"}),
    "qa5": frozenset({"Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"}),
    "qa6": frozenset({"no", "yes"}),
    "qa7": frozenset({"two", "one", "none"}),
    "qa9": frozenset({"no", "yes"}),
    "qa10": frozenset({"maybe", "no", "yes"}),
}


def preprocess_output(output: str) -> str:
    """The part of a model output the official check looks at (lower-cased first sentence)."""
    output = output.lower()
    output = output.split(".")[0]
    output = output.split("<context>")[0]
    output = output.split("<example>")[0]
    output = output.split("Question")[0]  # upstream quirk: after lower(), this never matches
    return output


@functools.lru_cache(maxsize=256)
def _word(label: str) -> re.Pattern[str]:
    return re.compile(rf"\b{re.escape(label)}\b")


def _found(labels: Iterable[str], text: str, corrected: bool) -> set[str]:
    if corrected:
        return {label for label in labels if _word(label).search(text)}
    return {label for label in labels if label in text}


def task_labels(task: str) -> frozenset[str]:
    """The official labels of ``task``."""
    try:
        return TASK_LABELS[task]
    except KeyError:
        raise DataError(f"no BABILong answer labels for task {task!r}: the official check covers {', '.join(TASK_LABELS)}") from None


def compare_answers(
    target: str,
    output: str,
    question: str,
    task: str,
    corrected: bool = False,
    labels: Iterable[str] | None = None,
) -> bool:
    """Whether ``output`` answers ``question`` with ``target`` by the BABILong rule (module docstring).

    ``labels`` overrides the task's label set; ``corrected=True`` matches whole words.
    """
    output = preprocess_output(output)
    target = target.lower()
    label_set = {label.lower() for label in (task_labels(task) if labels is None else labels)}
    in_question = _found(label_set, question.lower(), corrected)
    in_output = _found(label_set, output, corrected) - in_question
    return target in in_output and len(in_output) == 1


def accuracy(
    targets: Sequence[str],
    outputs: Sequence[str],
    questions: Sequence[str],
    task: str,
    corrected: bool = False,
) -> float:
    """Fraction of outputs :func:`compare_answers` accepts."""
    if not (len(targets) == len(outputs) == len(questions)):
        raise DataError(f"accuracy needs as many targets, outputs and questions; got {len(targets)}, {len(outputs)}, {len(questions)}")
    if not targets:
        raise DataError("accuracy of zero samples is undefined")
    hits = sum(compare_answers(t, o, q, task, corrected) for t, o, q in zip(targets, outputs, questions))
    return hits / len(targets)
