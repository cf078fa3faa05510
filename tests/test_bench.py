"""The diagnostics in bench/ whose numbers docs/experiment-log.md reads: what they count."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from binding_probe import states_at  # noqa: E402
from einops import rearrange  # noqa: E402
from graftkit.memories.linear import LinearMemory  # noqa: E402
from key_overlap import fact_keys, fact_spans  # noqa: E402
from qa1_errors import answer_index, bin_label, tokens_after_answer  # noqa: E402


class WordTokenizer:
    """One token per run of non-space characters, with character offsets like a fast tokenizer's."""

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        return {"offset_mapping": [m.span() for m in re.finditer(r"\S+", text)]}


def story(context: str, facts: tuple[str, ...], supporting: str):
    return SimpleNamespace(context=context, facts=facts, supporting_facts=(supporting,), source="qa1/test/story1/line3")


def test_tokens_after_answer_counts_everything_written_after_the_supporting_fact():
    facts = ("Mary went to the kitchen.", "John moved to the hall.")
    sample = story("Mary went to the kitchen. Book words here. John moved to the hall. More book text.", facts, facts[0])
    assert tokens_after_answer(sample, WordTokenizer()) == 3 + 5 + 3
    sample = story(sample.context, facts, facts[1])
    assert tokens_after_answer(sample, WordTokenizer()) == 3


def test_tokens_after_answer_takes_the_last_telling_of_a_repeated_fact():
    facts = ("Mary went to the kitchen.", "John moved to the hall.", "Mary went to the kitchen.")
    context = "Mary went to the kitchen. Book. John moved to the hall. Mary went to the kitchen. End of book."
    assert tokens_after_answer(story(context, facts, facts[0]), WordTokenizer()) == 3


def test_after_bins_are_half_open():
    assert [bin_label(t) for t in (0, 999, 1000, 7999, 8000, 20000)] == [
        "0-1000", "0-1000", "1000-2000", "4000-8000", "8000+", "8000+"
    ]


def test_answer_index_is_the_last_telling_of_the_supporting_fact():
    facts = ("Mary went to the kitchen.", "John moved to the hall.", "Mary went to the kitchen.", "Sandra went to the garden.")
    assert answer_index(story("", facts, facts[0])) == 2
    assert answer_index(story("", facts, facts[1])) == 1


def test_fact_spans_mark_each_fact_and_its_subject():
    facts = ("Mary went to the kitchen.", "John moved to the hall.", "Mary went to the kitchen.")
    sample = story("Mary went to the kitchen. Book. John moved to the hall. Mary went to the kitchen. End.", facts, facts[0])
    spans = fact_spans(sample, WordTokenizer()(sample.context)["offset_mapping"])
    assert [who for _, who in spans] == ["Mary", "John", "Mary"]
    assert [list(inside.nonzero()[0]) for inside, _ in spans] == [[0, 1, 2, 3, 4], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]


def test_fact_keys_are_the_keys_a_write_stores_under_with_key_span():
    torch.manual_seed(0)
    memory = LinearMemory(LinearMemory.Config(dim=16, heads=2, dim_head=8, decay=False, key_span=3))
    with torch.no_grad():
        memory.key_mix.weight.normal_()  # a trained window: the key at token 2 carries tokens 0 and 1
        x = torch.randn(1, 5, 16)
        inside = torch.zeros(5, dtype=torch.bool)
        inside[2] = True
        keys, mass = fact_keys(SimpleNamespace(memory=memory, write_norm=None), x, [(inside.numpy(), "Mary")])
        w = memory.write(x[:, :3], memory.init_state(1))["w"][0] - memory.write(x[:, :2], memory.init_state(1))["w"][0]
        plain = F.normalize(rearrange(memory.to_keys(x[0, 2]), "(h e) -> h e", h=2), dim=-1)
    # a delta-rule write of one token adds beta (v - W k) k^T: every row of the change lies along its key k
    stored = F.normalize(w[:, 0], dim=-1)  # h e, the first row of each head's change
    sign = (stored * keys[0]).sum(-1).sign()[:, None]
    torch.testing.assert_close(stored * sign, keys[0], rtol=1e-4, atol=1e-5)
    assert (keys[0] * plain).sum(-1).abs().max() < 0.99  # not the token's own key
    torch.testing.assert_close(mass[0], memory.write_strengths(x)[0, 2])


def test_states_at_runs_segments_independently(tiny_backbone):
    backbone = tiny_backbone("llama")
    ids = torch.randint(3, 200, (10,)).tolist()
    whole = states_at(backbone, ids, [2, 7], [2], segment=0)[2]
    split = states_at(backbone, ids, [2, 7], [2], segment=5)[2]
    alone = backbone.hidden_states(torch.tensor([ids[5:]]), 2)[0, 2]
    assert torch.allclose(whole[0], split[0], atol=1e-5)  # position 2 sees the same tokens either way
    assert torch.allclose(split[1], alone, atol=1e-5)  # position 7 sees only its own segment
    assert not torch.allclose(whole[1], split[1], atol=1e-3)
