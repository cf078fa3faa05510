"""Personal memory: what people told the model about themselves and others, recalled sessions later.

An episode is a conversation of `sessions` turns. People (first names) get attributes: the city they
live in, their employer, a pet's name, a partner, a favourite colour, a birthday, a locker code, an age
and a car's licence plate, each told once in one of several phrasings, between unrelated chat lines and
book sentences that pad the episode to `length` tokens. A later statement may *update* an attribute
(the latest one is the answer). Some questions ask what was never told, about someone known or about
someone never mentioned: the answer is "unknown".

Names and values come from `faker` over ten locales, and every value is assigned to the training or the
test split by a hash of its text, so **the splits share no name and no attribute value**: a graft
passes the test split only by storing and recalling words it never saw in training. Answers are open
and scored by exact match after normalisation.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np
from pydantic import Field, field_validator

from graftkit.data.books import load_books
from graftkit.data.tasks import context_tokens, each_valid, length_label, parse_length
from graftkit.task import Example, Task, TaskConfig, normalize

UNKNOWN = "unknown"
#: Answers taken as saying "that was never told" (after `normalize`).
REFUSALS = {"unknown", "i dont know", "i do not know", "you did not tell me", "you never told me", "not mentioned", "no idea"}
LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL", "pt_PT", "sv_SE", "pl_PL")


@dataclass(frozen=True)
class Attribute:
    name: str
    tell: tuple[str, ...]  #: statements, with {person} and {value}
    update: tuple[str, ...]  #: statements of a new value
    ask: tuple[str, ...]  #: questions, with {person}


ATTRIBUTES = (
    Attribute(
        "city",
        ("{person} lives in {value}.", "{person} moved to {value} a few years ago.", "Home for {person} is {value}."),
        ("{person} has just moved to {value}.", "{person} lives in {value} now."),
        ("Where does {person} live?", "Which city does {person} live in?"),
    ),
    Attribute(
        "employer",
        ("{person} works at {value}.", "{person} has a job at {value}.", "{person} is employed by {value}."),
        ("{person} now works at {value}.", "{person} changed jobs and joined {value}."),
        ("Where does {person} work?", "Which company does {person} work for?"),
    ),
    Attribute(
        "pet",
        ("{person} has a dog called {value}.", "{person}'s dog is named {value}.", "{person} walks a dog named {value} every morning."),
        ("{person} adopted a new dog, {value}.",),
        ("What is the name of {person}'s dog?", "What is {person}'s dog called?"),
    ),
    Attribute(
        "partner",
        ("{person} is married to {value}.", "{person}'s partner is {value}.", "{person} lives with a partner called {value}."),
        ("{person} is now with {value}.",),
        ("Who is {person}'s partner?", "Who is {person} married to?"),
    ),
    Attribute(
        "colour",
        ("{person}'s favourite colour is {value}.", "{person} loves the colour {value}."),
        ("These days {person}'s favourite colour is {value}.",),
        ("What is {person}'s favourite colour?",),
    ),
    Attribute(
        "birthday",
        ("{person} was born on {value}.", "{person}'s birthday is on {value}."),
        (),
        ("When is {person}'s birthday?", "On which day was {person} born?"),
    ),
    Attribute(
        "code",
        ("The code of {person}'s locker is {value}.", "{person}'s locker opens with {value}."),
        ("{person} changed the locker code to {value}.",),
        ("What is the code of {person}'s locker?", "Which code opens {person}'s locker?"),
    ),
    Attribute("age", ("{person} is {value} years old.", "{person} turned {value} this year."), (), ("How old is {person}?",)),
    Attribute(
        "plate",
        ("{person}'s car has the licence plate {value}.", "The plate on {person}'s car reads {value}."),
        ("{person} bought a new car with the plate {value}.",),
        ("What is the licence plate of {person}'s car?",),
    ),
)
CHAT = (
    "The weather was lovely this afternoon.",
    "I watched a long film last night and fell asleep halfway.",
    "Could you remind me to buy milk later?",
    "Traffic was terrible on the way home.",
    "I tried a new recipe for soup today.",
    "My phone battery keeps running out.",
    "We might go hiking if it does not rain.",
    "I finally finished that puzzle.",
    "The train was late again this morning.",
    "I should really start going to bed earlier.",
    "The neighbours are painting their fence.",
    "I read an interesting article about whales.",
    "Lunch today was a bit too salty.",
    "I have a meeting at three tomorrow.",
    "The garden needs watering.",
    "I found an old photo album in the attic.",
    "Coffee tastes better on a Sunday.",
    "I am thinking about learning to play the piano.",
    "The shop on the corner has closed down.",
    "It has been a busy week.",
)
_SUFFIX = re.compile(r"^(gmbh|&|ltd|llc|inc|ag|sa|se|ab|plc|kg|ohg|spa|srl|bv|nv|oy|as|asa|sas|sarl|and|e|y|i|und|et|en|och)$", re.I)


def _split_of(value: str) -> str:
    """Which split a value belongs to: fixed by a hash of its text, so the two never share one."""
    return "train" if hashlib.sha256(value.lower().encode()).digest()[0] % 2 == 0 else "test"


def _company(text: str) -> str:
    words = []
    for word in text.replace(",", " ").split():
        if "." in word or _SUFFIX.match(word):
            break
        words.append(word)
    return " ".join(words[:3])


@functools.lru_cache(maxsize=8)
def vocabulary(split: str, seed: int, size: int = 600) -> dict[str, tuple[str, ...]]:
    """Per attribute (and "person"), `size` values that belong to `split` only."""
    from faker import Faker  # here, not at the top: only building a vocabulary needs it

    fake = Faker(list(LOCALES))
    fake.seed_instance(seed)
    rng = np.random.default_rng([seed, 7])
    makers = {
        "person": fake.first_name,
        "city": fake.city,
        "employer": lambda: _company(fake.company()),
        "pet": fake.first_name,
        "partner": fake.first_name,
        "colour": lambda: re.sub(r"(?<!^)(?=[A-Z])", " ", fake.color_name()).lower(),
        "birthday": lambda: fake.date_of_birth().strftime("%B %-d"),
        "code": lambda: str(int(rng.integers(1000, 100000))),
        "age": lambda: str(int(rng.integers(18, 96))),
        "plate": fake.license_plate,
    }
    out = {}
    for key, make in makers.items():
        values: dict[str, None] = {}
        for _ in range(size * 40):
            value = " ".join(str(make()).split())
            if value and _split_of(value) == split and "{" not in value:
                values[value] = None
            if len(values) >= size:
                break
        out[key] = tuple(values)
    return out


class ProfileConfig(TaskConfig):
    sessions: list[int] = Field([1, 4, 16], min_length=1, description="Session counts: one bucket each (and per length).")
    train_lengths: list[str] = Field(
        ["0k", "1k"],
        min_length=1,
        description="Episode lengths for training (0k: the statements alone; 1k: padded to ~1,000 tokens with chat lines and book text).",
    )
    eval_lengths: list[str] = Field(["1k"], min_length=1, description="Episode lengths evaluated.")
    people: int = Field(3, ge=1, le=8, description="People per episode.")
    facts: int = Field(6, ge=1, le=40, description="Statements per episode (before updates).")
    questions: int = Field(4, ge=1, le=20, description="Questions per episode.")
    update_rate: float = Field(0.2, ge=0, le=1, description="Chance that a told attribute is updated later in the episode.")
    unanswerable_rate: float = Field(0.15, ge=0, le=1, description="Share of questions about what was never told.")
    train_samples: int = Field(2000, gt=0, description="Training questions per bucket.")
    eval_samples: int = Field(100, gt=0, description="Test questions per bucket used during training.")

    @field_validator("train_lengths", "eval_lengths")
    @classmethod
    def _lengths(cls, value: list[str]) -> list[str]:
        return each_valid(value, parse_length)

    @field_validator("sessions")
    @classmethod
    def _sessions(cls, value: list[int]) -> list[int]:
        if any(n < 1 for n in value):
            raise ValueError("session counts must be >= 1")
        return value


class ProfileTask(Task):
    """Personal facts told across sessions (faker names and values, disjoint between splits), asked later."""

    name = "profile"
    Config = ProfileConfig
    demo = ("Priya lives in Lisbon. Priya's dog is named Biscuit.", "What is Priya's dog called?")

    def buckets(self, split: str) -> list[str]:
        lengths = self.config.train_lengths if split == "train" else self.config.eval_lengths
        return [f"profile/{s}s/{length_label(length)}" for s in self.config.sessions for length in lengths]

    def train_count(self, bucket: str) -> int:
        return self.config.train_samples

    def eval_count(self) -> int:
        return self.config.eval_samples

    def examples(self, split, bucket, n, tokenizer=None, seed_offset=0):
        _, sessions, length = bucket.split("/")
        n = self.config.train_samples if n is None else n
        budget = context_tokens(length)
        out, index = [], 0
        while len(out) < n:
            out += self.episode(split, int(sessions[:-1]), length, budget, index, seed_offset, tokenizer, bucket)
            index += 1
        return out[:n]

    def episode(self, split: str, n_sessions: int, length: str, budget: int, index: int, seed_offset: int, tokenizer, bucket: str) -> list[Example]:
        """The questions of one episode (all sharing its sessions)."""
        cfg = self.config
        seed = cfg.seed + seed_offset
        rng = np.random.default_rng([seed, int(hashlib.sha256(f"{split}/{bucket}".encode()).hexdigest()[:8], 16), index])
        vocab = vocabulary(split, cfg.seed)
        used: set[str] = set()

        def draw(kind: str) -> str:
            pool = vocab[kind]
            while True:
                value = pool[int(rng.integers(len(pool)))]
                if value not in used:
                    used.add(value)
                    return value

        people = [draw("person") for _ in range(cfg.people)]
        pairs = [(p, a) for p in people for a in range(len(ATTRIBUTES))]
        told = [pairs[i] for i in rng.permutation(len(pairs))[: cfg.facts]]
        statements, answers, earlier = [], {}, {}
        for person, a in told:
            attr = ATTRIBUTES[a]
            value = draw(attr.name)
            statements.append((person, _pick(rng, attr.tell).format(person=person, value=value)))
            answers[(person, a)] = value
        for person, a in list(answers):
            attr = ATTRIBUTES[a]
            if attr.update and rng.random() < cfg.update_rate:
                value = draw(attr.name)
                statements.append((person, _pick(rng, attr.update).format(person=person, value=value)))
                earlier[(person, a)] = answers[(person, a)]
                answers[(person, a)] = value
        sessions = self._sessions(statements, n_sessions, budget, split, rng, tokenizer)
        context = hashlib.sha256(json.dumps(["profile-1", sessions]).encode()).hexdigest()[:20]
        examples = []
        for q in range(cfg.questions):
            if rng.random() < cfg.unanswerable_rate:
                untold = [(p, a) for p in people for a in range(len(ATTRIBUTES)) if (p, a) not in answers]
                stranger = rng.random() < 0.5 or not untold
                person, a = (draw("person"), int(rng.integers(len(ATTRIBUTES)))) if stranger else _pick(rng, untold)
                target, kind = UNKNOWN, "stranger" if stranger else "untold"
            else:
                person, a = _pick(rng, list(answers))
                target, kind = answers[(person, a)], "updated" if (person, a) in earlier else "told"
            question = _pick(rng, ATTRIBUTES[a].ask).format(person=person)
            uid = hashlib.sha256(json.dumps([context, q, question, target]).encode()).hexdigest()[:20]
            examples.append(
                Example(
                    uid=uid,
                    sessions=tuple(sessions),
                    question=question,
                    target=target,
                    bucket=bucket,
                    context_uid=context,
                    length=length,
                    info={
                        "kind": kind,
                        "attribute": ATTRIBUTES[a].name,
                        "person": person,
                        **({"earlier": earlier[(person, a)]} if kind == "updated" else {}),
                    },
                )
            )
        return examples

    def _sessions(self, statements, n_sessions: int, budget: int, split: str, rng, tokenizer) -> list[str]:
        """Statements in order over `n_sessions` sessions (an update never before what it updates), each padded
        with chat lines and book sentences to its share of `budget` tokens."""
        cuts = np.sort(rng.integers(0, n_sessions, size=len(statements)))
        per = [[s for (_, s), c in zip(statements, cuts) if c == k] for k in range(n_sessions)]
        filler = _filler(split)
        count = (
            (lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"]))
            if tokenizer is not None
            else (lambda t: int(len(t.split()) * 1.3) + 1)
        )
        sessions = []
        for facts in per:
            room = budget // n_sessions - sum(count(f) for f in facts)
            pad = []
            while room > 0:
                line = filler[int(rng.integers(len(filler)))]
                pad.append(line)
                room -= count(line) + 1
            pieces = list(facts)
            for line in pad:  # pads go between the statements, which keep their order
                pieces.insert(int(rng.integers(len(pieces) + 1)), line)
            sessions.append(" ".join(pieces) if pieces else _pick(rng, CHAT))
        return sessions

    def score(self, example: Example, output: str) -> bool:
        lines = output.strip().splitlines()
        said = normalize(lines[0] if lines else "")
        if example.target == UNKNOWN:
            return said in REFUSALS
        return said == normalize(example.target)


@functools.lru_cache(maxsize=2)
def _filler(split: str) -> tuple[str, ...]:
    """Chat lines and book sentences (training books for train, the test book for test) of 6-30 words."""
    book = [s for b in load_books(split) for s in b.sentences if 6 <= len(s.split()) <= 30 and "{" not in s]
    return CHAT * max(1, len(book) // (4 * len(CHAT))) + tuple(book)


def _pick(rng, items):
    return items[int(rng.integers(len(items)))]
