"""Write strengths and their cost (`train.write_cost`): what the memories report and what the loss adds."""

from __future__ import annotations

import json

import pytest
import torch

from graftkit.errors import RecipeError
from graftkit.memories.linear import LinearMemory
from graftkit.memories.titans import TitansMemory
from graftkit.protocol import HiddenCache, turn2_batch
from graftkit.recipe import validate_recipe
from graftkit.state import WRITTEN
from graftkit.train import TwoTurn, train, write_mass
from test_train import RECIPE, built_graft, recipe

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
        memory = LinearMemory(LinearMemory.Config(dim=DIM, heads=2, dim_head=8, decay=False, chunk_size=4))
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
    from graftkit.data.babilong import build_babilong

    graft = built_graft(tmp_path, {"kind": "layer0_soft_prompt", "num_tokens": 4})
    samples = build_babilong("qa1", "train", "0k", 3, seed=0, tokenizer=graft.backbone.tokenizer)
    hidden, mask = HiddenCache(graft, None).get(samples)
    assert not mask.all()  # contexts of several lengths: padding must not count
    batch = turn2_batch(graft.backbone, samples, with_answers=True)
    plain, costly = TwoTurn(graft), TwoTurn(graft, write_cost=0.5)
    mass = write_mass(graft, hidden, mask)
    by_hand = torch.stack([graft.write_strengths(hidden[i : i + 1, : int(mask[i].sum())])[0].sum(0) for i in range(3)]).mean()
    torch.testing.assert_close(mass, by_hand)
    with torch.no_grad():
        torch.testing.assert_close(costly(hidden, mask, **batch).loss, plain(hidden, mask, **batch).loss + 0.5 * mass)
    optimizer = torch.optim.SGD(graft.trainable_parameters(), lr=1.0)
    write_mass(graft, hidden, mask).backward()
    optimizer.step()
    assert write_mass(graft, hidden, mask) < mass


def test_a_write_cost_needs_a_memory_with_write_strengths():
    raw = json.loads(json.dumps(RECIPE))
    raw["memory"] = {"kind": "attention_slots", "write_layer": 1}
    raw["train"]["write_cost"] = 0.01
    with pytest.raises(RecipeError, match=r"train.write_cost.*'attention_slots' has no per-token write strengths"):
        validate_recipe(raw)
    raw["train"]["write_cost"] = 0.0
    validate_recipe(raw)


def test_a_run_with_a_write_cost_logs_its_write_mass(tmp_path):
    run = train(recipe(tmp_path, steps=2, eval_every=2, write_cost=0.01), progress=False).run_dir
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    masses = [r["write_mass"] for r in steps if "loss" in r]
    assert len(masses) == 2 and all(m > 0 for m in masses)
