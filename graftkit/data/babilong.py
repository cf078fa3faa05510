"""BABILong samples: the facts of a bAbI story hidden, in order, between sentences of background books.

Construction follows the official generator (Kuratov et al., 2024; ``booydar/babilong``,
``babilong_utils.py`` and ``data/create_tasks.py``), re-implemented here:

1. A length label is decimal tokens (``"1k"`` = 1000) minus a 300-token prompt reserve, so the
   context of a ``"1k"`` sample targets 700 tokens (:func:`~graftkit.data.tasks.context_tokens`).
   ``"0k"`` is the facts alone.
2. Questions whose story (facts + question) has more than ``budget // 8`` lines are left out, as the
   official ``max_n_facts = message_length // 8``.
3. Background: sentences of at least ``min_sentence_tokens`` tokens (official: 10), taken in order from
   a random position of a random book until ``budget - tokens(facts)`` tokens are reached; the last
   sentence is cut (here at a word boundary) so the total does not exceed the budget.
4. Each fact goes to a random sentence boundary (positions drawn with replacement and sorted, so the
   facts keep their order); facts sharing a boundary stay in story order.

Differences, all deliberate: pieces are joined with one space (the official decodes concatenated
GPT-2 ids, which glues sentences together: "lit.Mary moved..."); sentences come from a rule-based
splitter instead of NLTK Punkt; randomness is per sample (seeded by seed, task, split, length and
index) instead of one stream, so a sample does not depend on how many others were built.

Training samples come only from bAbI *train* stories and training books, evaluation samples only from
bAbI *test* stories and test books: :func:`build_babilong` takes the split explicitly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from graftkit.data.babi import BabiQuestion, load_babi
from graftkit.data.books import Book, BooksArg, load_books
from graftkit.data.prompts import turn2_prompt
from graftkit.data.tasks import PROMPT_RESERVE, DataError, check_split, check_task, context_tokens, length_label
from graftkit.data.tokens import TokenCounter, token_counter
from graftkit.task import Prompt

#: Bumped whenever the construction changes, so that sample uids (and caches keyed on them) change too.
FORMAT_VERSION = "graftkit-babilong-1"


@dataclass(frozen=True)
class Sample:
    """One BABILong sample. ``context`` is what turn 1 memorizes; ``question`` and ``target`` are turn 2."""

    task: str
    split: str
    length: str  #: canonical length label, e.g. "1k"
    index: int  #: position in the (task, split, length, seed) sequence
    seed: int
    context: str
    question: str
    target: str
    facts: tuple[str, ...]
    supporting_facts: tuple[str, ...]
    source: str  #: the bAbI question it comes from: "qa1/test/story12/line6"
    budget: int  #: target context tokens (0 = facts only)
    n_tokens: int  #: context tokens as the sum of its counted pieces (joins may shift a real count slightly)
    uid: str  #: stable hash of task, split, length, index, seed and content: a cache key

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict of all fields."""
        return asdict(self)

    # What the two-turn protocol reads of an example (`graftkit.task.Example`), so a sample goes where one does.
    @property
    def sessions(self) -> tuple[str, ...]:
        return (self.context,)

    @property
    def context_uid(self) -> str:
        return self.uid

    @property
    def prompt(self) -> Prompt:
        return turn2_prompt(self.task)


def sample_uid(task: str, split: str, length: str, index: int, seed: int, context: str, question: str, target: str) -> str:
    """The uid of a sample: sha256 of its identity and content, 20 hex digits."""
    payload = json.dumps([FORMAT_VERSION, task, split, length, index, seed, context, question, target])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


def _crc(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


@functools.lru_cache(maxsize=64)
def _order(task: str, split: str, seed: int, n_questions: int, epoch: int) -> np.ndarray:
    """The order questions are drawn in: a permutation fixed by (seed, task, split, epoch), not by length."""
    rng = np.random.default_rng([seed, _crc(f"{task}/{split}/order"), epoch])
    return rng.permutation(n_questions)


def _eligible(questions: tuple[BabiQuestion, ...], budget: int) -> np.ndarray:
    """Mask of questions the official length filter keeps: facts + question <= budget // 8 lines."""
    if budget <= 0:
        return np.ones(len(questions), dtype=bool)
    limit = budget // 8
    return np.array([len(q.facts) + 1 <= limit for q in questions], dtype=bool)


def _fit_words(sentence: str, room: int, n_tokens: int, counter: TokenCounter) -> str:
    """The longest word prefix of ``sentence`` (``n_tokens`` long) with at most ``room`` tokens.

    Starts from the proportional guess and walks one word at a time, so a few counts usually suffice.
    """
    words = sentence.split(" ")
    k = min(len(words) - 1, max(0, room * len(words) // max(n_tokens, 1)))
    while k > 0 and counter.count(" ".join(words[:k])) > room:
        k -= 1
    while k + 1 < len(words) and counter.count(" ".join(words[: k + 1])) <= room:
        k += 1
    return " ".join(words[:k])


def sample_background(
    books: tuple[Book, ...], budget: int, rng: np.random.Generator, counter: TokenCounter, min_sentence_tokens: int = 10
) -> tuple[list[str], int]:
    """Background sentences totalling at most ``budget`` tokens (and their token count).

    Reads sentences in order from a random position of a random book, skipping those shorter than
    ``min_sentence_tokens``; at the end of a book it jumps to a new random position. The last
    sentence is cut at a word boundary to fit.
    """
    out: list[str] = []
    total = 0
    if budget <= 0:
        return out, total
    usable = [b for b in books if b.sentences]
    if not usable:
        raise DataError("the background books contain no sentences")
    jumps = 0
    while total < budget:
        jumps += 1
        if jumps == 100 and not any(counter.sentence_count(b, j) >= min_sentence_tokens for b in usable for j in range(len(b.sentences))):
            raise DataError(f"the background books hold no sentence of >= {min_sentence_tokens} tokens")
        book = usable[int(rng.integers(len(usable)))]
        for j in range(int(rng.integers(len(book.sentences))), len(book.sentences)):
            n = counter.sentence_count(book, j)
            if n < min_sentence_tokens:
                continue
            if total + n <= budget:
                out.append(book.sentences[j])
                total += n
                if total == budget:
                    return out, total
                continue
            piece = _fit_words(book.sentences[j], budget - total, n, counter)
            if piece:
                out.append(piece)
                total += counter.count(piece)
            return out, total
    return out, total


def iter_babilong(
    task: str,
    split: str,
    length: str | int,
    n: int,
    seed: int,
    tokenizer: Any,
    books: BooksArg | None = None,
    babi_dir: str | os.PathLike | None = None,
    *,
    start: int = 0,
    prompt_reserve: int = PROMPT_RESERVE,
    min_sentence_tokens: int = 10,
) -> Iterator[Sample]:
    """Samples ``start`` ... ``start + n - 1`` of (task, split, length, seed), one at a time.

    See :func:`build_babilong` for the arguments.
    """
    check_task(task)
    check_split(split)
    if n < 0 or start < 0:
        raise DataError(f"n and start must be >= 0, got n={n}, start={start}")
    label = length_label(length)
    budget = context_tokens(label, prompt_reserve)
    counter = token_counter(tokenizer)
    questions = load_babi(task, split, babi_dir)
    bg_books = load_books(split, books) if budget > 0 else ()
    keep = _eligible(questions, budget)
    n_keep = int(keep.sum())
    if n_keep == 0:
        raise DataError(f"no {task} {split} story fits in {label} ({budget} context tokens)")
    if split == "test" and start + n > n_keep:
        raise DataError(
            f"{task} test has {n_keep} questions that fit {label}; asked for samples {start}..{start + n - 1}. "
            "Test samples never repeat a question; ask for fewer."
        )
    crc = _crc(f"{task}/{split}/{label}")
    orders: dict[int, np.ndarray] = {}
    for index in range(start, start + n):
        epoch, pos = divmod(index, n_keep)
        if epoch not in orders:
            order = _order(task, split, seed, len(questions), epoch)
            orders[epoch] = order[keep[order]]
        q = questions[int(orders[epoch][pos])]
        rng = np.random.default_rng([seed, crc, index])
        fact_tokens = sum(counter.count(f) for f in q.facts)
        background, bg_tokens = sample_background(bg_books, budget - fact_tokens, rng, counter, min_sentence_tokens)
        positions = np.sort(rng.integers(0, len(background) + 1, size=len(q.facts)))
        pieces: list[str] = []
        f = 0
        for slot in range(len(background) + 1):
            while f < len(q.facts) and positions[f] == slot:
                pieces.append(q.facts[f])
                f += 1
            if slot < len(background):
                pieces.append(background[slot])
        context = " ".join(pieces)
        yield Sample(
            task=task,
            split=split,
            length=label,
            index=index,
            seed=seed,
            context=context,
            question=q.question,
            target=q.answer,
            facts=q.facts,
            supporting_facts=q.supporting_facts,
            source=f"{task}/{split}/story{q.story}/line{q.line}",
            budget=budget,
            n_tokens=fact_tokens + bg_tokens,
            uid=sample_uid(task, split, label, index, seed, context, q.question, q.answer),
        )


def build_babilong(
    task: str,
    split: str,
    length: str | int,
    n: int,
    seed: int,
    tokenizer: Any,
    books: BooksArg | None = None,
    babi_dir: str | os.PathLike | None = None,
    *,
    start: int = 0,
    prompt_reserve: int = PROMPT_RESERVE,
    min_sentence_tokens: int = 10,
) -> list[Sample]:
    """Build ``n`` BABILong samples of one task, split and length, deterministically from ``seed``.

    Args:
        task: a bAbI task, ``"qa1"`` ... (vendored: :data:`~graftkit.data.tasks.TASKS`).
        split: ``"train"`` (bAbI train stories, training books) or ``"test"`` (bAbI test stories,
            test books). Required: evaluation must never see training data and vice versa.
        length: a label (``"0k"``, ``"1k"``, ``"32k"``, ``"1M"``) or a token count.
        n: number of samples. ``"test"`` never repeats a question (at most the questions that fit);
            ``"train"`` cycles through its questions again, in a new order, with new background.
        seed: the samples are a pure function of (task, split, length, index, seed, data, tokenizer).
        tokenizer: counts tokens: a Hugging Face tokenizer, anything with ``encode``, or a
            ``count_tokens(str) -> int`` function (:class:`~graftkit.data.tokens.TokenCounter`).
        books: background books (see :func:`~graftkit.data.books.load_books`); default: vendored.
        babi_dir: a bAbI v1.2 folder (see :func:`~graftkit.data.babi.babi_file`); default: vendored.
        start: index of the first sample (to build a range, e.g. for sharding).
        prompt_reserve: tokens of the length label left for the prompt (official: 300). Use 0 to make
            the context itself as long as the label.
        min_sentence_tokens: shorter background sentences are skipped (official: 10).
    """
    return list(
        iter_babilong(
            task,
            split,
            length,
            n,
            seed,
            tokenizer,
            books,
            babi_dir,
            start=start,
            prompt_reserve=prompt_reserve,
            min_sentence_tokens=min_sentence_tokens,
        )
    )


def fact_token_mask(sample: Sample, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """Which context tokens (character `offsets` from the tokenizer, one pair per token) lie wholly inside
    one of the sample's facts. A token's leading space does not count, so a fact's first token (its
    name, which carries the space before the fact) belongs to the fact."""
    text = sample.context
    starts = np.array([a + len(text[a:b]) - len(text[a:b].lstrip()) for a, b in offsets], dtype=np.int64)
    ends = np.array([b for _, b in offsets], dtype=np.int64)
    inside = np.zeros(len(offsets), dtype=bool)
    position = 0
    for fact in sample.facts:  # facts appear in story order
        start = text.find(fact, position)
        if start >= 0:
            end = start + len(fact)
            inside |= (starts >= start) & (ends <= end)
            position = end
    return inside
