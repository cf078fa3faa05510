"""The preservation row: does a graft leave the backbone alone when its memory is not asked for?

An unrelated text (a passage of a training book) is written into memory. Then:

- each general prompt (`general_prompts`: arithmetic, world facts, word tasks, instructions and
  continuations of book sentences) is answered greedily by the grafted model and by the bare backbone;
  the figure is the share of identical answers;
- held-out text (passages of the test book) is scored by both: the grafted model's mean next-token
  loss against the bare backbone's.

With an empty memory a graft is the bare backbone (identity at init), so both figures are exact there.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from graftkit.data.books import load_books
from graftkit.graft import pad
from graftkit.progress import bar
from graftkit.state import MemoryState

_COUNTRIES = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Australia": "Canberra",
    "Russia": "Moscow",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Turkey": "Ankara",
    "Sweden": "Stockholm",
    "Norway": "Oslo",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Cuba": "Havana",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Nigeria": "Abuja",
    "Morocco": "Rabat",
    "Belgium": "Brussels",
    "Netherlands": "Amsterdam",
    "Switzerland": "Bern",
    "Ukraine": "Kyiv",
    "South Korea": "Seoul",
}
_FACTS = [
    "How many days are there in a week?",
    "How many legs does a spider have?",
    "What colour is the sky on a clear day?",
    "What do bees make?",
    "What is the largest planet in the solar system?",
    "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?",
    "What gas do plants take in from the air?",
    "How many continents are there?",
    "What is the chemical symbol for gold?",
    "What is the opposite of cold?",
    "How many hours are in a day?",
    "What is the freezing point of water in Fahrenheit?",
    "What animal is known as the king of the jungle?",
    "Which ocean is the largest?",
    "What is the tallest mountain on Earth?",
    "How many sides does a triangle have?",
    "What language is spoken in Brazil?",
    "What is the currency of Japan?",
    "Which planet is called the red planet?",
    "What do caterpillars turn into?",
    "How many minutes are in an hour?",
    "What is H2O?",
    "Who painted the Mona Lisa?",
    "What is the square root of 81?",
    "What is the first month of the year?",
    "How many strings does a violin have?",
    "What is the main ingredient of guacamole?",
    "Which organ pumps blood through the body?",
    "What is the longest river in Africa?",
]
_WORDS = [
    "happy",
    "big",
    "fast",
    "bright",
    "quiet",
    "strong",
    "ancient",
    "careful",
    "empty",
    "gentle",
    "honest",
    "narrow",
    "rich",
    "simple",
    "warm",
    "young",
    "brave",
    "clean",
    "dark",
    "early",
]
_TOPICS = [
    "the sea",
    "autumn",
    "a train journey",
    "coffee",
    "mountains",
    "a library",
    "the moon",
    "friendship",
    "a rainy day",
    "bicycles",
    "music",
    "a garden",
    "winter",
    "the city at night",
    "cats",
    "bread",
]


def general_prompts() -> list[str]:
    """The general prompts, in a fixed order that interleaves their kinds (250 in all)."""
    rng = np.random.default_rng(20261207)
    arithmetic = []
    for i in range(60):
        a, b = (int(x) for x in rng.integers(2, 99, size=2))
        arithmetic.append([f"What is {a} + {b}?", f"What is {a} times {b}?", f"What is {max(a, b)} minus {min(a, b)}?"][i % 3])
    capitals = [f"What is the capital of {country}?" for country in _COUNTRIES]
    words = [t.format(w) for w in _WORDS for t in ("Give a word that means the opposite of '{}'.", "Use the word '{}' in a sentence.")]
    topics = [t.format(x) for x in _TOPICS for t in ("Write one sentence about {}.", "Name three things you associate with {}.")]
    continuations = [f"Continue this text: {line}" for line in _openings(48)]
    kinds = [arithmetic, capitals, _FACTS, words, topics, continuations]
    return [p for group in itertools.zip_longest(*kinds) for p in group if p is not None]


def _openings(n: int, shift: int = 0) -> list[str]:
    """The first eight words of `n` sentences of the vendored training books, evenly spaced (`shift` sentences on)."""
    sentences = [s for book in load_books("train") for s in book.sentences if len(s.split()) >= 12]
    step = max(1, len(sentences) // n)
    return [" ".join(s.split()[:8]) for s in sentences[shift::step][:n]]


_TRAIN_QUESTIONS = [
    "What is the opposite of day?",
    "How many wheels does a bicycle have?",
    "What do cows drink?",
    "Name a primary colour.",
    "What season comes after spring?",
    "What is frozen water called?",
    "How many months are in a year?",
    "What is the capital of Scotland?",
    "Which animal barks?",
    "What shape has four equal sides?",
    "What do we breathe?",
    "Name a fruit that is yellow.",
    "How many seconds are in a minute?",
    "What instrument has black and white keys?",
    "What is the plural of mouse?",
    "Which planet do we live on?",
    "What do you call a baby cat?",
    "What is the largest ocean on Earth?",
    "How many players are in a football team?",
    "What tool do you use to cut paper?",
]
_TRAIN_TOPICS = [
    "rivers",
    "a quiet village",
    "snow",
    "breakfast",
    "old maps",
    "lighthouses",
    "tea",
    "the desert",
    "a market",
    "summer evenings",
    "forests",
    "a letter from a friend",
]


def training_prompts() -> list[str]:
    """General prompts for training a graft to leave the backbone alone (`train.preserve_weight`); none of them
    is one of `general_prompts()`, which the preservation row scores."""
    rng = np.random.default_rng(7)
    arithmetic = []
    for i in range(60):
        a, b = (int(x) for x in rng.integers(2, 99, size=2))
        arithmetic.append([f"Add {a} and {b}.", f"Multiply {a} by {b}.", f"Subtract {min(a, b)} from {max(a, b)}."][i % 3])
    topics = [t.format(x) for x in _TRAIN_TOPICS for t in ("Describe {} in one sentence.", "Write a short poem about {}.")]
    continuations = [f"Continue this text: {line}" for line in _openings(48, shift=7)]
    held = set(general_prompts())
    kinds = [arithmetic, _TRAIN_QUESTIONS, topics, continuations]
    return [p for group in itertools.zip_longest(*kinds) for p in group if p is not None and p not in held]


def training_passages(n: int = 48, words: int = 45) -> list[str]:
    """Passages of the vendored training books, spread over them, for `train.preserve_weight` (the preservation
    row scores the test book's)."""
    books = load_books("train")
    return [_passage(book.sentences, (k + 1) * len(book.sentences) // (n // len(books) + 1), words) for book in books for k in range(n // len(books))]


def _passage(sentences, start: int, words: int) -> str:
    """Sentences from `start` on until they hold at least `words` words."""
    out, count = [], 0
    for sentence in sentences[start:]:
        out.append(sentence)
        count += len(sentence.split())
        if count >= words:
            break
    return " ".join(out)


def unrelated_text(words: int = 450) -> str:
    """The text written into memory: a passage of a vendored training book."""
    book = load_books("train")[-1]
    return _passage(book.sentences, len(book.sentences) // 3, words)


def held_out_passages(n: int = 8, words: int = 90) -> list[str]:
    """Passages of the vendored test book, spread over it, for the next-token loss."""
    book = load_books("test")[0]
    return [_passage(book.sentences, (k + 1) * len(book.sentences) // (n + 2), words) for k in range(n)]


@torch.no_grad()
def preservation(
    graft, n: int = 250, max_new_tokens: int = 16, batch_size: int = 8, state: MemoryState | None = None, progress: bool = False
) -> dict:
    """Agreement of greedy answers and the next-token loss ratio, grafted (memory holding `state`, by default
    `unrelated_text()` written) against the bare backbone. Returns {"agreement", "loss_graft", "loss_backbone",
    "loss_change", "n", "answers": [per-prompt dicts]}."""
    backbone, tok = graft.backbone, graft.backbone.tokenizer
    if state is None:
        state = graft.memorize(unrelated_text())
    prompts = general_prompts()[:n]
    answers = []
    for start in bar(range(0, len(prompts), batch_size), desc="preservation", disable=not progress, leave=False):
        chunk = prompts[start : start + batch_size]
        rows = MemoryState.stack([state] * len(chunk))
        grafted = graft.answer(chunk, rows, max_new_tokens=max_new_tokens)
        ids, mask = pad([backbone.chat_ids(p) for p in chunk], tok.pad_token_id, side="left", device=backbone.device)
        out = backbone.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
        bare = [t.strip() for t in tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)]
        answers += [{"question": p, "target": b, "output": g, "correct": g == b} for p, g, b in zip(chunk, grafted, bare)]
    losses: dict[str, list[float]] = {"graft": [], "backbone": []}
    for text in held_out_passages():
        ids = torch.tensor([backbone.text_ids(text)], device=backbone.device)
        losses["graft"].append(graft(ids, state, labels=ids).loss.item())
        losses["backbone"].append(backbone.model(input_ids=ids, labels=ids).loss.item())
    graft_loss, bare_loss = float(np.mean(losses["graft"])), float(np.mean(losses["backbone"]))
    return {
        "n": len(answers),
        "agreement": float(np.mean([a["correct"] for a in answers])),
        "loss_graft": graft_loss,
        "loss_backbone": bare_loss,
        "loss_change": graft_loss / bare_loss - 1,
        "answers": answers,
    }


def preservation_table(kept: dict) -> str:
    """The preservation figures as a markdown table."""
    return "\n".join(
        [
            f"| preservation (unrelated text in memory), n = {kept['n']} | |",
            "|---|---|",
            f"| greedy answers equal to the bare backbone's | {kept['agreement']:.1%} |",
            f"| next-token loss on held-out text, graft / backbone | {kept['loss_graft']:.3f} / {kept['loss_backbone']:.3f} "
            f"({kept['loss_change']:+.1%}) |",
        ]
    )
