"""Background ("haystack") text: public-domain books cut into sentences.

BABILong hides bAbI facts between sentences of PG19 books, training samples in PG19's train books
and test samples in its test books. graftkit vendors three Project Gutenberg books in the same
roles (:data:`VENDORED_BOOKS`); users may pass their own.

Sentences are cut once per book by a small rule-based splitter (the official code uses NLTK's Punkt,
which graftkit does not depend on): paragraphs split at blank lines, whitespace inside a paragraph
collapsed to single spaces (the books' hard line wraps are not sentence content), and a sentence ends
at ``.``, ``!`` or ``?`` (plus closing quotes or brackets) followed by whitespace and an upper-case
letter, a digit or an opening quote, unless the period ends a common abbreviation or an initial.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from graftkit.data.babi import read_text
from graftkit.data.tasks import DataError, check_split, vendor_dir

#: Vendored books per split (files ``vendor/books/{name}.txt.xz``); train and test books are disjoint,
#: as PG19's train and test splits are in BABILong.
VENDORED_BOOKS: dict[str, tuple[str, ...]] = {
    "train": ("pg2701_moby_dick", "pg98_a_tale_of_two_cities"),
    "test": ("pg120_treasure_island",),
}

_START = re.compile(r"^[ \t]*\*\*\*[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.M | re.I)
_END = re.compile(r"^[ \t]*\*\*\*[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.M | re.I)
_END_NOTE = re.compile(r"^[ \t]*End of (?:the )?Project Gutenberg.*$", re.M | re.I)
_PRODUCED = re.compile(r"^\s*Produced by\b.*?(?:\n[ \t]*\n|\Z)", re.S | re.I)
_PG_NOTE = re.compile(r"project gutenberg|^\W*(?:original )?transcriber\W?s notes?\W*$", re.I)

_ABBREVIATIONS = frozenset("mr mrs ms messrs dr st mt capt col gen lt sgt rev prof sr jr hon esq gov vs etc viz no vol ch chap fig".split())
_BOUNDARY = re.compile(r"[.!?]+[\"'\u201d\u2019)\]_]*(?=\s+[\"'\u201c\u2018(\[_]*[A-Z0-9])")
_PARAGRAPH = re.compile(r"\n[ \t]*\n")


def normalize_text(text: str) -> str:
    """Drop byte-order marks and turn CRLF / CR line endings into LF."""
    return text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n")


def strip_gutenberg(text: str) -> str:
    """The book text between Project Gutenberg's ``*** START OF ...`` and ``*** END OF ...`` lines.

    Also drops the "End of (the) Project Gutenberg ..." note before the END line, a leading
    "Produced by ..." credit paragraph, and any paragraph that mentions Project Gutenberg or is a
    "Transcriber's Notes" heading. Text without the markers is returned unchanged, apart from
    :func:`normalize_text`.
    """
    text = normalize_text(text)
    start = _START.search(text)
    if start:
        text = text[start.end() :]
    end = _END.search(text)
    if end:
        text = text[: end.start()]
    if start or end:
        notes = list(_END_NOTE.finditer(text))
        if notes and len(text) - notes[-1].start() < 2000:
            text = text[: notes[-1].start()]
        text = _PRODUCED.sub("", text.lstrip("\n"), count=1)
        parts = re.split(r"(\n[ \t]*\n)", text)  # paragraphs and the blank lines between them
        text = "".join(p for i, p in enumerate(parts) if i % 2 or not _PG_NOTE.search(p))
    return text.strip() + "\n"


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of one paragraph whose whitespace is already collapsed."""
    sentences, start = [], 0
    for match in _BOUNDARY.finditer(paragraph):
        if match.group(0).startswith("."):
            words = paragraph[start : match.start()].rsplit(None, 1)
            word = words[-1].strip("\"'\u201c\u2018(_[") if words else ""
            if word.lower() in _ABBREVIATIONS or (len(word) == 1 and word.isupper()):
                continue
        sentence = paragraph[start : match.end()].strip()
        if sentence:
            sentences.append(sentence)
        start = match.end()
    tail = paragraph[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


@dataclass(frozen=True, eq=False)
class Book:
    """One background book: a name and its plain text (Gutenberg header/footer already removed)."""

    name: str
    text: str

    @functools.cached_property
    def sentences(self) -> tuple[str, ...]:
        """The book's sentences, in order; never spanning a paragraph break."""
        out: list[str] = []
        for paragraph in _PARAGRAPH.split(self.text):
            paragraph = " ".join(paragraph.split())
            if paragraph:
                out.extend(split_sentences(paragraph))
        return tuple(out)

    @functools.cached_property
    def key(self) -> str:
        """A content hash, stable across processes."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:16]

    @classmethod
    def from_text(cls, name: str, text: str) -> Book:
        """A book from raw text; a Project Gutenberg header/footer is stripped if present."""
        return cls(name, strip_gutenberg(text))

    @classmethod
    def from_file(cls, path: str | os.PathLike, name: str | None = None) -> Book:
        """A book from a ``.txt`` (or ``.txt.xz`` / ``.txt.gz``) file; see :meth:`from_text`."""
        path = Path(path)
        return _book_from_file(path.resolve(), path.stat().st_mtime, name or _stem(path))


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".xz", ".gz", ".txt"):
        name = name.removesuffix(suffix)
    return name


@functools.lru_cache(maxsize=32)
def _book_from_file(path: Path, mtime: float, name: str) -> Book:
    return Book.from_text(name, read_text(path))


BooksArg = str | os.PathLike | Book | Sequence["str | os.PathLike | Book"] | Mapping[str, "BooksArg"]


def load_books(split: str, books: BooksArg | None = None) -> tuple[Book, ...]:
    """The background books for a split.

    ``books=None`` gives the vendored books of ``split`` (:data:`VENDORED_BOOKS`). Otherwise
    ``books`` may be a mapping ``{"train": ..., "test": ...}`` (its ``split`` entry is used), a
    folder (every ``*.txt``, ``*.txt.xz`` and ``*.txt.gz`` file in it), a file, a :class:`Book`, or a
    sequence of files and books. Keeping training and test books apart is then the caller's choice.
    """
    check_split(split)
    if books is None:
        folder = vendor_dir() / "books"
        return tuple(Book.from_file(folder / f"{name}.txt.xz", name) for name in VENDORED_BOOKS[split])
    if isinstance(books, Mapping):
        if split not in books:
            raise DataError(f"the books mapping has no {split!r} entry (it has {', '.join(map(str, books))})")
        return load_books(split, books[split])
    items = [books] if isinstance(books, (str, os.PathLike, Book)) else list(books)
    out: list[Book] = []
    for item in items:
        if isinstance(item, Book):
            out.append(item)
            continue
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and re.search(r"\.txt(\.xz|\.gz)?$", p.name))
            if not files:
                raise DataError(f"no .txt books in folder {path}")
            out.extend(Book.from_file(p) for p in files)
        elif path.is_file():
            out.append(Book.from_file(path))
        else:
            raise DataError(f"book {path} does not exist")
    if not out:
        raise DataError("no background books given")
    return tuple(out)
