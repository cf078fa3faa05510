"""The two-turn protocol: no context reaches turn 2 except through the memory state; the shared
prefix and the hidden-state cache are exact."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from graftkit.tasks.babilong import babilong_examples
from matrix import make_memory

import graftkit
from graftkit.graft import Graft
from graftkit.protocol import HiddenCache, question_parts, turn2_batch
from graftkit.train import TwoTurn


@pytest.fixture
def graft(tiny_backbone, tmp_path, monkeypatch):
    monkeypatch.setenv("GRAFTKIT_CACHE", str(tmp_path))
    backbone = tiny_backbone("llama")
    torch.manual_seed(0)
    memory = make_memory("titans", backbone.hidden_size, write_layer=1)
    injector = graftkit.create(
        "injector", "layer0_soft_prompt", hidden_size=backbone.hidden_size, num_layers=backbone.num_layers, num_tokens=4, gate_init=0.5
    )
    g = Graft(backbone, memory, injector)
    yield g
    g.injector.detach()


def samples(backbone, n=4, length="1k", seed=0):
    return babilong_examples("qa1", "test", length, n, seed=seed, tokenizer=backbone.tokenizer)


def test_turn2_ids_do_not_depend_on_the_context(graft):
    a = samples(graft.backbone, seed=0)
    others = samples(graft.backbone, seed=7)
    b = [dataclasses.replace(s, sessions=o.sessions, context_uid=o.context_uid) for s, o in zip(a, others)]  # same question, other story
    assert all(x.context != y.context for x, y in zip(a, b))
    batch_a, batch_b = turn2_batch(graft.backbone, a, False), turn2_batch(graft.backbone, b, False)
    assert torch.equal(batch_a["input_ids"], batch_b["input_ids"])
    assert batch_a["prefix_ids"] == batch_b["prefix_ids"]
    prefix, question = question_parts(graft.backbone, a[0])
    text = graft.backbone.tokenizer.decode(prefix + question)
    assert a[0].question in text
    for fact in a[0].info["facts"]:  # not one fact of the story is in turn 2
        assert fact not in text


def test_only_the_state_changes_the_answer(graft):
    a = samples(graft.backbone, n=2, seed=0)
    b = [dataclasses.replace(s, sessions=o.sessions, context_uid=o.context_uid) for s, o in zip(a, samples(graft.backbone, n=2, seed=7))]
    batch = turn2_batch(graft.backbone, a, False)
    assert torch.equal(batch["input_ids"], turn2_batch(graft.backbone, b, False)["input_ids"])
    state_a = graft.memorize([s.context for s in a])
    state_b = graft.memorize([s.context for s in b])
    with torch.no_grad():
        logits_a = graft(batch["input_ids"], state_a, batch["attention_mask"], prefix_ids=batch["prefix_ids"]).logits
        again = graft(batch["input_ids"], state_a, batch["attention_mask"], prefix_ids=batch["prefix_ids"]).logits
        logits_b = graft(batch["input_ids"], state_b, batch["attention_mask"], prefix_ids=batch["prefix_ids"]).logits
    assert torch.equal(logits_a, again)  # nothing carried over from the previous call
    assert not torch.allclose(logits_a, logits_b, atol=1e-4)


def test_shared_prefix_equals_the_full_sequence(graft):
    """With an empty memory the graft is the bare backbone; the cached prefix must change nothing."""
    items = samples(graft.backbone, n=3)
    batch = turn2_batch(graft.backbone, items, with_answers=False)
    prefix = batch["prefix_ids"]
    state = graft.init_state(len(items))
    with torch.no_grad():
        got = graft(batch["input_ids"], state, batch["attention_mask"], prefix_ids=prefix).logits
        for row, sample in enumerate(items):
            head, question = question_parts(graft.backbone, sample)
            bare = graft.backbone.model(torch.tensor([head + question])).logits[0, len(head) :]
            width = len(question)
            torch.testing.assert_close(got[row, -width:], bare, atol=1e-5, rtol=1e-5)


def test_generation_with_a_prefix_is_the_same_with_and_without_kv_cache(graft):
    items = samples(graft.backbone, n=3)
    batch = turn2_batch(graft.backbone, items, with_answers=False)
    state = graft.memorize([s.context for s in items])
    args = (batch["input_ids"], state, batch["attention_mask"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cached = graft.generate(*args, max_new_tokens=6, prefix_ids=batch["prefix_ids"], use_cache=True)
        uncached = graft.generate(*args, max_new_tokens=6, prefix_ids=batch["prefix_ids"], use_cache=False)
    assert torch.equal(cached, uncached)
    # the cache goes by the name the installed transformers uses (5.24 renamed past_key_values)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_cached_and_uncached_training_steps_give_the_same_loss(graft, tmp_path):
    items = babilong_examples("qa1", "train", "1k", 4, seed=0, tokenizer=graft.backbone.tokenizer)
    cached = HiddenCache(graft, tmp_path / "hidden")
    cached.fill(items, batch_size=3, progress=False)  # other batching than the uncached path
    assert len(list((tmp_path / "hidden").glob("*.safetensors"))) == len(items)
    uncached = HiddenCache(graft, None)
    batch = turn2_batch(graft.backbone, items, with_answers=True)
    model = TwoTurn(graft)
    losses = []
    for cache in (cached, uncached):
        hidden, mask = cache.get(items)
        losses.append(model(hidden, mask, **batch).loss)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    assert losses[0].requires_grad


def test_a_truncated_cache_entry_is_computed_again_with_a_warning(graft, tmp_path):
    items = babilong_examples("qa1", "train", "0k", 2, seed=0, tokenizer=graft.backbone.tokenizer)
    cache = HiddenCache(graft, tmp_path / "hidden")
    cache.fill(items, progress=False)
    good, _ = cache.get(items)
    entry = cache.path(items[0])
    entry.write_bytes(entry.read_bytes()[:50])
    with pytest.warns(UserWarning, match=f"{entry.name}: damaged hidden-state cache entry"):
        again, _ = cache.get(items)
    torch.testing.assert_close(again, good)
    cache.get(items)  # replaced: read without a warning


def test_training_loss_scores_only_the_answer(graft):
    items = samples(graft.backbone, n=2)
    batch = turn2_batch(graft.backbone, items, with_answers=True)
    answer = graft.backbone.text_ids(items[0].target) + [graft.backbone.tokenizer.eos_token_id]
    scored = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert scored == answer
    spaced = turn2_batch(graft.backbone, items, with_answers=True, leading_space=True)["labels"][0]
    assert spaced[spaced != -100].tolist() == graft.backbone.text_ids(" " + items[0].target) + answer[-1:]
    state = graft.init_state(2)
    out = graft(state=state, **batch)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
