"""Token counting with whatever tokenizer the caller has, remembering what it has counted.

BABILong measures lengths in tokens of a tokenizer (GPT-2 in the official generator). The builder
only needs counts, so :class:`TokenCounter` accepts:

- a Hugging Face tokenizer (``tokenizer(texts)["input_ids"]`` in batches, special tokens off),
- anything with ``encode(text)`` returning a sequence of ids or an object with ``.ids``
  (``tokenizers.Tokenizer``, ``tiktoken.Encoding``, ...),
- a callable ``count_tokens(text) -> int``, or a callable returning a sequence or ``{"input_ids": ...}``.

Book sentences are counted once, in blocks, and kept per book (:meth:`TokenCounter.sentence_count`):
building many samples never re-tokenizes a context, only looks counts up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graftkit.data.books import Book
from graftkit.data.tasks import DataError

_PROBE = "Mary moved to the bathroom."
_BLOCK = 256
_MEMO_MAX_CHARS = 2000
_MEMO_MAX_ENTRIES = 500_000


def _length(result: Any) -> int:
    if isinstance(result, Mapping) or hasattr(result, "keys") and "input_ids" in result.keys():
        result = result["input_ids"]
    ids = getattr(result, "ids", result)
    return len(ids)


class TokenCounter:
    """Counts tokens of strings with a tokenizer or a counting function (see the module docstring)."""

    def __init__(self, tokenizer: Any):
        if tokenizer is None:
            raise DataError("a tokenizer (or a count_tokens(str) -> int function) is needed to measure lengths")
        self.tokenizer = tokenizer
        self._one, self._many = self._adapt(tokenizer)
        self._memo: dict[str, int] = {}
        self._books: dict[str, np.ndarray] = {}

    @staticmethod
    def _adapt(tok: Any) -> tuple[Callable[[str], int], Callable[[list[str]], list[int]] | None]:
        encode = getattr(tok, "encode", None)
        if callable(encode):
            try:
                _length(encode(_PROBE, add_special_tokens=False))
                kwargs = {"add_special_tokens": False}
            except TypeError:  # tiktoken-like: encode(text) only
                kwargs = {}

            def one(text: str) -> int:
                return _length(encode(text, **kwargs))

            def many(texts: list[str]) -> list[int]:
                return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]

            try:  # a Hugging Face tokenizer also counts batches, consistently with encode
                batched = callable(tok) and many([_PROBE, _PROBE + " " + _PROBE])[0] == one(_PROBE)
            except Exception:  # not a batch tokenizer: count one text at a time
                batched = False
            return one, many if batched else None
        if callable(tok):
            probe = tok(_PROBE)
            if isinstance(probe, (int, np.integer)) and not isinstance(probe, bool):
                return (lambda text: int(tok(text))), None
            try:
                _length(probe)
            except (TypeError, KeyError):
                raise DataError(
                    f"cannot count tokens with {type(tok).__name__}: it returned {type(probe).__name__}; "
                    "pass a tokenizer with encode() or a count_tokens(str) -> int function"
                ) from None
            return (lambda text: _length(tok(text))), None
        raise DataError(f"cannot count tokens with {type(tok).__name__}: pass a tokenizer with encode() or a count_tokens(str) -> int function")

    def count(self, text: str) -> int:
        """Tokens in ``text`` (short strings are remembered)."""
        if len(text) > _MEMO_MAX_CHARS:
            return self._one(text)
        found = self._memo.get(text)
        if found is None:
            if len(self._memo) >= _MEMO_MAX_ENTRIES:
                self._memo.clear()
            found = self._memo[text] = self._one(text)
        return found

    def count_many(self, texts: Sequence[str]) -> list[int]:
        """Tokens in each text, in one batch call when the tokenizer supports it."""
        texts = list(texts)
        if self._many is not None and len(texts) > 1:
            return self._many(texts)
        return [self._one(t) for t in texts]

    def sentence_count(self, book: Book, index: int) -> int:
        """Tokens in ``book.sentences[index]``; counted once per block of sentences, then looked up."""
        counts = self._books.get(book.key)
        if counts is None:
            counts = self._books[book.key] = np.full(len(book.sentences), -1, dtype=np.int64)
        if counts[index] < 0:
            lo = index - index % _BLOCK
            hi = min(lo + _BLOCK, len(book.sentences))
            counts[lo:hi] = self.count_many(book.sentences[lo:hi])
        return int(counts[index])


def token_counter(tokenizer: Any) -> TokenCounter:
    """A :class:`TokenCounter` for ``tokenizer``; one is reused per tokenizer object (and returned as is)."""
    if isinstance(tokenizer, TokenCounter):
        return tokenizer
    key = id(tokenizer)
    found = _COUNTERS.get(key)
    if found is not None and found.tokenizer is tokenizer:
        return found
    counter = TokenCounter(tokenizer)
    if len(_COUNTERS) >= 8:
        _COUNTERS.pop(next(iter(_COUNTERS)))
    _COUNTERS[key] = counter
    return counter


_COUNTERS: dict[int, TokenCounter] = {}
