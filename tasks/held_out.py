"""BABILong stories retold in words bAbI never uses: the held-out-vocabulary evaluation, and varied training.

Each story's people, places, objects and movement verbs are replaced, story by story, with words drawn
from pools disjoint from bAbI's. Test stories (`vocabulary: held_out`) draw first names from the test split
of `graftkit.tasks.profile` (faker, ten locales) and the HELD_OUT places, objects and verbs below; training
stories (`train_vocabulary: varied`) draw from the training split's names and the TRAIN pools, disjoint from
both. Only the facts change; the book text around them stays as it was. The answer check is the official
one, over the story's own renamed label set.

A graft passes the held-out evaluation only by storing and recalling words it never saw.
"""

from __future__ import annotations

import functools
import re
from dataclasses import replace

import numpy as np
from graftkit.tasks.profile import vocabulary

from graftkit.data.babilong import sample_uid

PEOPLE = ("Mary", "John", "Daniel", "Sandra", "Fred", "Bill", "Jeff")
PLACES = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS = ("football", "apple", "milk")
MOVE = re.compile(r"\b(went back|journeyed|travelled|moved|went) to\b")

HELD_OUT_PLACES = (
    "garage",
    "attic",
    "cellar",
    "library",
    "studio",
    "balcony",
    "greenhouse",
    "pantry",
    "workshop",
    "porch",
    "laundry room",
    "nursery",
    "chapel",
    "gym",
    "boathouse",
    "stable",
    "courtyard",
    "terrace",
    "lobby",
    "sauna",
    "harbour",
    "bakery",
    "museum",
    "station",
    "market",
    "orchard",
    "barn",
    "lighthouse",
    "pharmacy",
    "theatre",
)
HELD_OUT_OBJECTS = (
    "umbrella",
    "lantern",
    "notebook",
    "violin",
    "scarf",
    "teapot",
    "compass",
    "kite",
    "hammer",
    "basket",
    "candle",
    "helmet",
    "wallet",
    "blanket",
    "camera",
    "ladder",
    "bucket",
    "telescope",
    "pillow",
    "drum",
)
HELD_OUT_MOVES = (
    "walked to",
    "ran to",
    "headed to",
    "hurried to",
    "strolled to",
    "wandered to",
    "rushed to",
    "drove to",
    "cycled to",
    "returned to",
    "dashed to",
    "crept to",
)
TRAIN_PLACES = (
    "basement",
    "loft",
    "den",
    "study",
    "veranda",
    "shed",
    "lounge",
    "pool",
    "cafe",
    "school",
    "hospital",
    "airport",
    "church",
    "cinema",
    "farm",
    "beach",
    "park",
    "zoo",
    "bank",
    "hotel",
    "dining room",
    "living room",
    "playroom",
    "warehouse",
    "factory",
    "clinic",
    "post office",
    "bridge",
    "castle",
    "forest",
)
TRAIN_OBJECTS = (
    "book",
    "key",
    "ball",
    "cup",
    "phone",
    "hat",
    "bottle",
    "box",
    "pen",
    "watch",
    "bag",
    "spoon",
    "plate",
    "towel",
    "brush",
    "rope",
    "torch",
    "mirror",
    "coin",
    "glove",
)
TRAIN_MOVES = (
    "marched to",
    "jogged to",
    "sprinted to",
    "raced to",
    "hiked to",
    "sped to",
    "trudged to",
    "paddled to",
    "skipped to",
    "limped to",
    "flew to",
    "sailed to",
)


@functools.lru_cache(maxsize=2)
def _names(split: str) -> tuple[str, ...]:
    banned = {p.lower() for p in PEOPLE}
    return tuple(n for n in vocabulary(split, 0)["person"] if n.lower() not in banned and " " not in n and "-" not in n)


def retell(sample, labels: frozenset[str], seed: int, split: str = "test"):
    """(the sample with its facts, question and answer in other words, the renamed label set): the held-out
    pools for `split` "test", the training pools for "train"."""
    rng = np.random.default_rng([seed, int(sample.uid[:8], 16)])
    names = _names(split)
    places, objects, verbs = (HELD_OUT_PLACES, HELD_OUT_OBJECTS, HELD_OUT_MOVES) if split == "test" else (TRAIN_PLACES, TRAIN_OBJECTS, TRAIN_MOVES)
    mapping = {}
    for pool, held in ((PEOPLE, names), (PLACES, places), (OBJECTS, objects)):
        chosen = rng.choice(len(held), size=len(pool), replace=False)
        mapping.update({word: held[int(i)] for word, i in zip(pool, chosen)})
    words = re.compile(r"\b(" + "|".join(mapping) + r")\b")

    def swap(text: str, moves: bool = False) -> str:
        text = words.sub(lambda m: mapping[m[1]], text)
        return MOVE.sub(lambda m: verbs[int(rng.integers(len(verbs)))], text) if moves else text

    facts = tuple(swap(f, moves=True) for f in sample.facts)
    told = dict(zip(sample.facts, facts))
    context, position, pieces = sample.context, 0, []
    for old, new in zip(sample.facts, facts):  # facts appear in story order, only they change
        at = context.find(old, position)
        if at < 0:
            continue
        pieces += [context[position:at], new]
        position = at + len(old)
    context = "".join(pieces) + context[position:]
    question, target = swap(sample.question), swap(sample.target)
    uid = sample_uid(
        sample.task,
        sample.split,
        sample.length,
        sample.index,
        sample.seed,
        context,
        question,
        target + ("/held-out" if split == "test" else "/varied"),
    )
    retold = replace(
        sample,
        context=context,
        question=question,
        target=target,
        facts=facts,
        uid=uid,
        supporting_facts=tuple(told.get(f, swap(f, moves=True)) for f in sample.supporting_facts),
    )
    return retold, frozenset(swap(label) for label in labels)
