"""graftkit-test-task: the `passphrase` task, a third-party task in one file.

Each episode tells a made-up passphrase, sometimes with a distracting line, and asks for it back::

    data: {task: passphrase, syllables: 3, train_samples: 200}
"""

from __future__ import annotations

import hashlib

import numpy as np
from pydantic import Field

from graftkit import hookimpl
from graftkit.task import Example, Prompt, Task, TaskConfig

SYLLABLES = ("ka", "lo", "mi", "ru", "te", "zo", "pa", "ne", "vi", "su", "do", "ga")


class PassphraseConfig(TaskConfig):
    syllables: int = Field(3, ge=1, le=8, description="Syllables per passphrase.")
    train_samples: int = Field(200, gt=0, description="Training episodes.")
    eval_samples: int = Field(20, gt=0, description="Test episodes used during training.")


class PassphraseTask(Task):
    """Remember a made-up passphrase and say it back."""

    name = "passphrase"
    Config = PassphraseConfig
    demo = ("The passphrase is kalomi.", "What is the passphrase?")

    def buckets(self, split):
        return ["passphrase"]

    def train_count(self, bucket):
        return self.config.train_samples

    def eval_count(self):
        return self.config.eval_samples

    def examples(self, split, bucket, n, tokenizer=None, seed_offset=0):
        n = self.config.train_samples if n is None else n
        rng = np.random.default_rng([self.config.seed + seed_offset, split == "test"])
        out = []
        for i in range(n):
            word = "".join(SYLLABLES[int(k)] for k in rng.integers(len(SYLLABLES), size=self.config.syllables))
            text = f"The passphrase is {word}."
            uid = hashlib.sha256(f"{split}/{i}/{text}".encode()).hexdigest()[:20]
            out.append(
                Example(uid=uid, sessions=(text, "Nothing else happened today."), question="What is the passphrase?", target=word, bucket=bucket)
            )
        return out

    def prompt(self, example):
        return Prompt("Answer with the passphrase only.")

    def prompts(self):
        return {"passphrase": Prompt("Answer with the passphrase only.")}


@hookimpl
def register_tasks(register):
    register(PassphraseTask)
