"""Write strengths and their costs (`train.write_cost`, `train.background_cost`): what the memories report
and what the loss adds."""

from __future__ import annotations

import json

import pytest
import torch
from graftkit.memories.linear import LinearMemory
from graftkit.memories.titans import TitansMemory
from graftkit.tasks.babilong import BabilongConfig, BabilongTask
from test_train import RECIPE, built_graft, recipe

from graftkit.errors import RecipeError
from graftkit.objectives.write import BackgroundCost, WriteCost, background_tokens, write_mass
from graftkit.protocol import HiddenCache, turn2_batch
from graftkit.recipe import validate_recipe
from graftkit.state import WRITTEN
from graftkit.train import TwoTurn, train

TASK = BabilongTask(BabilongConfig(task="babilong"))

DIM = 16


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAFTKIT_CACHE", str(tmp_path / "cache"))


def steered(memory, gate: torch.nn.Linear, heads: int):
    """Make the first `heads` outputs of `gate` (the write-strength logits) follow channel 0 of the input
    steeply, and its other outputs constant."""
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:heads, 0] = 100.0
        gate.bias[:heads] = 0.0
    return memory


@pytest.mark.parametrize("kind", ["linear", "titans"])
def test_a_token_written_at_strength_zero_leaves_the_memory_as_it_was(kind):
    torch.manual_seed(0)
    if kind == "linear":
        # keys from each token alone: a key window would carry the unwritten token into the state's key_tail
        memory = LinearMemory(LinearMemory.Config(dim=DIM, heads=2, dim_head=8, decay=False, chunk_size=4, key_span=1, gate_span=1))
        steered(memory, memory.to_beta, 2)
    else:
        memory = TitansMemory(TitansMemory.Config(dim=DIM, heads=2, dim_head=8, chunk_size=4))
        steered(memory, memory.to_gates, 2)
    x = torch.randn(1, 3, DIM)
    x[0, :2, 0], x[0, 2, 0] = 1.0, -1.0  # two tokens written in full, the last one not at all
    strengths = memory.write_strengths(x)
    assert strengths.shape == (1, 3, 2)
    torch.testing.assert_close(strengths[0, :2], torch.ones(2, 2))
    torch.testing.assert_close(strengths[0, 2], torch.zeros(2))
    with torch.no_grad():
        all_three = memory.write(x, memory.init_state(1))
        first_two = memory.write(x[:, :2], memory.init_state(1))
        x[0, 1, 0] = -1.0  # the second token now written at strength 0 too: the memory does change
        first_only = memory.write(x, memory.init_state(1))
    for name in first_two.tensors:
        if name != WRITTEN:
            torch.testing.assert_close(all_three[name], first_two[name], msg=name)
    assert any(not torch.allclose(first_only[n], first_two[n]) for n in first_two.tensors if n != WRITTEN)


def test_the_write_cost_adds_the_write_mass_to_the_loss_and_lowers_it(tmp_path):
    from graftkit.tasks.babilong import babilong_examples

    graft = built_graft(tmp_path, {"kind": "layer0_soft_prompt", "num_tokens": 4})
    samples = babilong_examples("qa1", "train", "0k", 3, seed=0, tokenizer=graft.backbone.tokenizer)
    hidden, mask = HiddenCache(graft, None).get(samples)
    assert not mask.all()  # contexts of several lengths: padding must not count
    batch = turn2_batch(graft.backbone, samples, with_answers=True)
    plain, costly = TwoTurn(graft), TwoTurn(graft, [WriteCost(0.5)])
    mass = write_mass(graft, hidden, mask)
    by_hand = torch.stack([graft.write_strengths(hidden[i : i + 1, : int(mask[i].sum())])[0].sum(0) for i in range(3)]).mean()
    torch.testing.assert_close(mass, by_hand)
    with torch.no_grad():
        torch.testing.assert_close(costly(hidden, mask, **batch).loss, plain(hidden, mask, **batch).loss + 0.5 * mass)
    optimizer = torch.optim.SGD(graft.trainable_parameters(), lr=1.0)
    write_mass(graft, hidden, mask).backward()
    optimizer.step()
    assert write_mass(graft, hidden, mask) < mass


@pytest.mark.parametrize("field", ["write_cost", "background_cost"])
def test_a_write_cost_needs_a_memory_with_write_strengths(field):
    raw = json.loads(json.dumps(RECIPE))
    raw["memory"] = {"kind": "attention_slots", "write_layer": 1}
    raw["train"][field] = 0.01
    with pytest.raises(RecipeError, match=rf"train.{field}.*'attention_slots' has no per-token write strengths"):
        validate_recipe(raw)
    raw["train"][field] = 0.0
    validate_recipe(raw)


@pytest.mark.parametrize("field", ["write_mass", "background_mass"])
def test_a_run_with_a_write_cost_logs_its_write_mass(tmp_path, field):
    cost = field.replace("mass", "cost")
    run = train(recipe(tmp_path, steps=2, eval_every=2, **{cost: 0.01}), progress=False).run_dir
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 2
    assert all(r[field] >= 0 for r in steps) and any(r[field] > 0 for r in steps)  # a 0k batch has no book text
    assert all(("write_mass" in r) == (field == "write_mass") for r in steps)


def test_background_tokens_are_the_context_outside_the_facts(tmp_path):
    from graftkit.tasks.babilong import babilong_examples

    graft = built_graft(tmp_path, {"kind": "layer0_soft_prompt", "num_tokens": 4})
    tokenizer = graft.backbone.tokenizer
    facts_only = babilong_examples("qa1", "train", "0k", 2, seed=0, tokenizer=tokenizer)
    hidden, mask = HiddenCache(graft, None).get(facts_only)
    assert not (background_tokens(tokenizer, TASK, facts_only, hidden.shape[1]) * mask).any()  # nothing but facts
    in_books = babilong_examples("qa1", "train", "1k", 2, seed=0, tokenizer=tokenizer)
    n_tokens = max(len(graft.backbone.text_ids(s.context)) for s in in_books)
    for row, sample in zip(background_tokens(tokenizer, TASK, in_books, n_tokens + 5), in_books):
        offsets = tokenizer(sample.context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        assert not row[len(offsets) :].any()  # padding is not background
        kept = "".join(sample.context[a:b] for (a, b), outside in zip(offsets, row) if not outside)
        assert kept.split() == " ".join(sample.info["facts"]).split()  # the facts' words, in order, and nothing else
        assert 0.5 < row[: len(offsets)].mean() < 1.0  # most of a 1k context is book text
    known = {}
    first = background_tokens(tokenizer, TASK, in_books, n_tokens, known)
    assert sorted(known) == sorted(s.uid for s in in_books)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a known sample was tokenized again")

    assert torch.equal(background_tokens(no_tokenizing, TASK, in_books, n_tokens, known), first)


def test_the_background_cost_weighs_only_book_text(tmp_path):
    from graftkit.tasks.babilong import babilong_examples

    graft = built_graft(tmp_path, {"kind": "layer0_soft_prompt", "num_tokens": 4})
    samples = babilong_examples("qa1", "train", "1k", 2, seed=0, tokenizer=graft.backbone.tokenizer)
    hidden, mask = HiddenCache(graft, None).get(samples)
    background = background_tokens(graft.backbone.tokenizer, TASK, samples, hidden.shape[1])
    batch = turn2_batch(graft.backbone, samples, with_answers=True)
    plain, costly = TwoTurn(graft), TwoTurn(graft, [BackgroundCost(0.5)])
    with torch.no_grad():
        out = costly(hidden, mask, **batch, background=background)
        by_hand = write_mass(graft, hidden, mask * background)
        torch.testing.assert_close(out.terms["background_mass"], by_hand)
        assert 0 < by_hand < write_mass(graft, hidden, mask)  # the facts' writes are left out
        torch.testing.assert_close(out.loss, plain(hidden, mask, **batch).loss + 0.5 * by_hand)


def test_the_preserve_loss_is_zero_while_the_graft_is_the_backbone_and_trains_it_back_there(tmp_path):
    from graftkit.tasks.babilong import babilong_examples

    from graftkit.objectives.preserve import PreserveLoss, coarse_kl
    from graftkit.preservation import general_prompts, held_out_passages, training_passages, training_prompts

    assert training_prompts() and not set(training_prompts()) & set(general_prompts())
    assert training_passages() and not set(training_passages()) & set(held_out_passages())
    graft = built_graft(tmp_path, {"kind": "mid_layer", "layer": 1, "direct_read": True})
    samples = babilong_examples("qa1", "train", "0k", 3, seed=0, tokenizer=graft.backbone.tokenizer)
    hidden, mask = HiddenCache(graft, None).get(samples)
    batch = turn2_batch(graft.backbone, samples, with_answers=True)
    objective = PreserveLoss(0.5)
    extra = objective.inputs(graft, TASK, samples, hidden)
    rows = extra["preserve"]
    assert rows["prompt"]["ids"].shape[0] == 3 and rows["passage"]["ids"].shape[0] == 1
    assert all(r["compared"].sum() == r["top"].shape[0] == r["logp"].shape[0] for r in rows.values())
    again = objective.inputs(graft, TASK, samples, hidden)["preserve"]
    assert all(torch.equal(again[k]["ids"], rows[k]["ids"]) for k in rows)  # fixed by the batch
    model = TwoTurn(graft, [objective])
    closed = model(hidden, mask, **batch, **extra)
    assert closed.terms["preserve_kl"].abs() < 1e-4  # a closed gate: the grafted model is the backbone
    with torch.no_grad():
        for name, p in graft.injector.named_parameters():
            if "gate" in name:
                p.fill_(2.0)
    opened = model(hidden, mask, **batch, **extra)
    kl = opened.terms["preserve_kl"]
    assert kl > 1e-3
    with torch.no_grad():  # by hand: full logits of the bare backbone and of the graft over each whole row
        state = graft.write_hidden(hidden, mask)
        head = graft.backbone.chat_parts("", "")[0]
        by_hand, full = [], []
        for kind, r in rows.items():
            prefix = head if kind == "prompt" else []
            ids = torch.cat([torch.tensor([prefix] * r["ids"].shape[0], dtype=torch.long).reshape(r["ids"].shape[0], -1), r["ids"]], 1)
            mask_ = torch.cat([torch.ones(ids.shape[0], len(prefix), dtype=torch.long), r["mask"]], 1)
            bare = graft.backbone.model(input_ids=ids, attention_mask=mask_, position_ids=(mask_.cumsum(-1) - 1).clamp(min=0)).logits[
                :, len(prefix) :
            ]
            grafted = graft(r["ids"], state.select(range(ids.shape[0])), attention_mask=r["mask"], prefix_ids=prefix or None).logits
            p, q = torch.log_softmax(bare[r["compared"]], -1), torch.log_softmax(grafted[r["compared"]], -1)
            top = p.topk(r["top"].shape[1], -1).indices
            assert torch.equal(top[:, :8], r["top"][:, :8])  # the kept tokens are the bare backbone's most likely
            by_hand.append(coarse_kl(grafted[r["compared"]], r["top"], r["logp"]))
            full.append((p.exp() * (p - q)).sum(-1).mean())
    torch.testing.assert_close(kl, torch.stack(by_hand).mean(), atol=1e-4, rtol=1e-3)
    assert kl <= torch.stack(full).mean() + 1e-4  # a coarsened KL never exceeds the full one
    torch.testing.assert_close(opened.loss, TwoTurn(graft)(hidden, mask, **batch).loss + 0.5 * kl)
    optimizer = torch.optim.SGD(graft.trainable_parameters(), lr=0.5)
    for _ in range(5):
        optimizer.zero_grad()
        model(hidden, mask, **batch, **extra).terms["preserve_kl"].backward()
        optimizer.step()
    assert model(hidden, mask, **batch, **extra).terms["preserve_kl"] < kl


def test_the_coarse_kl_is_the_full_kl_when_every_token_but_one_is_kept():
    from graftkit.objectives.preserve import coarse_kl

    g = torch.Generator().manual_seed(0)
    bare, grafted = torch.randn(5, 12, generator=g) * 3, torch.randn(5, 12, generator=g) * 3
    p, q = torch.log_softmax(bare, -1), torch.log_softmax(grafted, -1)
    full = (p.exp() * (p - q)).sum(-1).mean()
    for k in (11, 4, 1):
        kept, top = p.topk(k, -1)
        logp = torch.cat([kept, torch.log1p(-kept.exp().sum(-1, keepdim=True))], -1)
        coarse = coarse_kl(grafted, top, logp)
        if k == 11:
            torch.testing.assert_close(coarse, full)
        assert 0 <= coarse <= full + 1e-6
