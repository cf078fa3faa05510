"""The recall stage (`train.recall_steps`): reads over the question, what learns, and how it runs in `graftkit train`."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from test_train import RECIPE, built_graft, recipe

from graftkit.checkpoint import resolve_checkpoint
from graftkit.errors import RecipeError
from graftkit.protocol import HiddenCache, turn2_batch
from graftkit.recall import RecallHead, answer_logprobs, question_reads
from graftkit.recipe import validate_recipe
from graftkit.train import train


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAFTKIT_CACHE", str(tmp_path / "cache"))


def test_the_question_reads_come_from_the_memory_and_train_only_the_graft(tmp_path):
    from graftkit.tasks.babilong import babilong_examples

    graft = built_graft(tmp_path, {"kind": "mid_layer", "layer": 0, "direct_read": True})
    samples = babilong_examples("qa1", "train", "0k", 4, seed=0, tokenizer=graft.backbone.tokenizer)
    cache = HiddenCache(graft, None)
    reads, question = question_reads(graft, cache, samples)
    batch = turn2_batch(graft.backbone, samples, with_answers=False)
    assert reads.shape == (*batch["input_ids"].shape, graft.backbone.hidden_size)
    assert torch.equal(question, batch["attention_mask"].bool())
    # stopping after the read gives what the whole turn-2 pass reads
    with torch.no_grad():
        graft(batch["input_ids"], graft.write_hidden(*cache.get(samples)), attention_mask=batch["attention_mask"], prefix_ids=batch["prefix_ids"])
        torch.testing.assert_close(graft.injector.reads[question], reads[question].detach())
    # the same questions after other contexts: other reads
    swapped = [
        dataclasses.replace(s, uid=s.uid + "-other", context_uid=s.uid + "-other", sessions=samples[(i + 1) % 4].sessions)
        for i, s in enumerate(samples)
    ]
    assert not torch.allclose(question_reads(graft, cache, swapped)[0][question], reads[question])
    reads[question].sum().backward()
    grads = {name: p.grad for name, p in graft.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("memory."))
    assert grads["injector.to_query.weight"].abs().sum() > 0
    assert all(p.grad is None for p in graft.backbone.model.parameters())


def test_the_answer_is_a_mixture_over_question_positions():
    """Row 0: of two question positions one is sure of answer 1, the other unsure; the padding's answer 0 is ignored."""
    head = torch.nn.Identity()
    reads = torch.tensor([[[99.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 50.0, 0.0]], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    question = torch.tensor([[False, True, True], [True, True, True]])
    logp = answer_logprobs(head, reads, question)
    own = torch.log_softmax(reads, dim=-1)
    torch.testing.assert_close(logp[0], torch.logsumexp(own[0, 1:], dim=0) - torch.tensor(2.0).log())
    torch.testing.assert_close(logp[1], torch.logsumexp(own[1], dim=0) - torch.tensor(3.0).log())
    torch.testing.assert_close(logp[0].exp(), torch.tensor([1 / 6, 1 / 6 + 1 / 2, 1 / 6]))  # the sure position keeps its half
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2))


def test_the_last_word_is_the_name_asked_about_wherever_the_padding_puts_it(tmp_path):
    from graftkit.tasks.babilong import babilong_examples

    graft = built_graft(tmp_path, {"kind": "mid_layer", "layer": 0, "direct_read": True})
    tok = graft.backbone.tokenizer
    samples = babilong_examples("qa1", "train", "0k", 6, seed=0, tokenizer=tok)
    batch = turn2_batch(graft.backbone, samples, with_answers=False)
    width = batch["input_ids"].shape[1]
    assert len({int(n) for n in batch["attention_mask"].sum(1)}) > 1  # rows of several lengths: the padding differs
    reads = 100 * torch.eye(width).expand(len(samples), width, width)  # the read at position j says "j"
    head = RecallHead(width, [str(j) for j in range(width)], "last_word")
    with torch.no_grad():  # the head passes a read's "j" on as answer j
        head.linear.weight.copy_(torch.eye(width))
        head.linear.bias.zero_()
    ends = torch.full((len(samples),), width)
    picked = head(reads, batch["attention_mask"].bool(), ends, head.backs(graft.backbone, samples)).argmax(-1)
    for sample, row, at in zip(samples, batch["input_ids"], picked.tolist()):
        name = sample.question.rstrip("?").split()[-1]
        assert name in tok.decode(row[: at + 1]) and name not in tok.decode(row[:at]), (sample.question, at)


@pytest.mark.parametrize("query", ["mixture", "last_word"])
def test_the_recall_stage_trains_the_memory_before_the_end_to_end_steps(tmp_path, query):
    # both runs hold the memory fixed in their end-to-end steps: only the recall stage can move it
    plain = train(recipe(tmp_path, "plain", steps=2, eval_every=2, freeze=["memory"]), progress=False).run_dir
    staged = train(
        recipe(tmp_path, "staged", steps=2, eval_every=2, freeze=["memory"], recall_steps=3, lr=1e-2, recall_query=query), progress=False
    ).run_dir
    before = load_file(str(plain / "checkpoints" / "step-000002" / "graft.safetensors"))
    after = load_file(str(staged / "checkpoints" / "step-000002" / "graft.safetensors"))
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("memory."))
    lines = [json.loads(line) for line in (staged / "metrics.jsonl").read_text().splitlines()]
    assert [r["recall_step"] for r in lines if "recall_step" in r] == [1, 2, 3]
    assert all(r["recall_loss"] > 0 and 0 <= r["recall_acc"] <= 1 for r in lines if "recall_step" in r)
    [held_out] = [r["recall_eval"] for r in lines if "recall_eval" in r]
    assert list(held_out) == ["qa1/0k"] and 0 <= held_out["qa1/0k"] <= 1
    assert [r["step"] for r in lines if "loss" in r] == [1, 2]


def test_a_resumed_run_does_not_repeat_the_recall_stage(tmp_path, monkeypatch):
    import graftkit.train as train_module

    first = recipe(tmp_path, steps=2, eval_every=1, recall_steps=2)
    train(first.model_copy(update={"train": first.train.model_copy(update={"steps": 1})}), progress=False)

    def again(*args, **kwargs):
        raise AssertionError("the recall stage ran again on --resume")

    monkeypatch.setattr(train_module, "recall_stage", again)
    result = train(first, resume=True, progress=False)
    assert result.last_step == 2
    lines = (result.run_dir / "metrics.jsonl").read_text()
    assert lines.count('"recall_eval"') == 1


def test_a_recall_stage_needs_reads_at_every_position(tmp_path):
    raw = json.loads(json.dumps(RECIPE))
    raw["injector"] = {"kind": "mid_layer", "layer": 0, "direct_read": False, "num_tokens": 16}
    raw["train"]["recall_steps"] = 10
    with pytest.raises(RecipeError, match=r"train.recall_steps.*reads the memory at every position.*direct_read: true"):
        validate_recipe(raw)


def test_the_recall_stage_draws_only_from_its_lengths(tmp_path, monkeypatch):
    import graftkit.train as train_module

    drawn = []

    def stage(graft, cache, head, train_buckets, *args, **kwargs):
        drawn.append(sorted(train_buckets))
        return {}

    monkeypatch.setattr(train_module, "recall_stage", stage)
    train(recipe(tmp_path, "some", steps=1, eval_every=1, recall_steps=5, recall_lengths=["0k"]), progress=False)
    train(recipe(tmp_path, "all", steps=1, eval_every=1, recall_steps=5), progress=False)
    assert drawn == [[(0, "qa1/0k")], [(0, "qa1/0k"), (0, "qa1/1k")]]


def test_recall_lengths_must_be_training_lengths():
    raw = json.loads(json.dumps(RECIPE))
    raw["train"].update(recall_steps=10, recall_lengths=["0k", "4k"])
    with pytest.raises(RecipeError, match=r"train.recall_lengths.*\['4k'\] are not training lengths"):
        validate_recipe(raw)


@pytest.mark.parametrize("query", ["mixture", "last_word"])
def test_the_recall_loss_of_a_training_pass_reads_what_the_recall_stage_reads(tmp_path, query):
    """The same questions with their answers appended (a training row) and without (a recall-stage row): the
    answer tokens come after the question, so the head sees the same reads and gives the same distribution."""
    from graftkit.tasks.babilong import babilong_examples

    from graftkit.objectives.recall import recall_logprobs

    graft = built_graft(tmp_path, {"kind": "mid_layer", "layer": 0, "direct_read": True})
    samples = babilong_examples("qa1", "train", "0k", 6, seed=0, tokenizer=graft.backbone.tokenizer)
    head = RecallHead(graft.backbone.hidden_size, sorted({s.target for s in samples}), query)
    cache = HiddenCache(graft, None)
    with torch.no_grad():
        reads, question = question_reads(graft, cache, samples)
        ends = torch.full((len(samples),), question.shape[1])
        alone = head(reads, question, ends, head.backs(graft.backbone, samples))
        batch = turn2_batch(graft.backbone, samples, with_answers=True)
        assert len({int(n) for n in (batch["labels"] != -100).sum(1)}) > 1  # answers of several lengths
        graft(
            batch["input_ids"],
            graft.write_hidden(*cache.get(samples)),
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            prefix_ids=batch["prefix_ids"],
        )
        trained = recall_logprobs(graft, head, batch["attention_mask"], batch["labels"], head.backs(graft.backbone, samples))
    torch.testing.assert_close(trained, alone)


def test_recall_weight_keeps_the_recall_head_training_and_resumes_it(tmp_path, monkeypatch):
    import graftkit.train as train_module

    settings = dict(steps=3, eval_every=1, recall_steps=2, recall_weight=0.5, recall_query="last_word")
    straight = train(recipe(tmp_path, "straight", **settings), progress=False).run_dir
    lines = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["aux_recall_loss"] > 0 and 0 <= r["aux_recall_acc"] <= 1 for r in steps)
    heads = [load_file(str(straight / "checkpoints" / f"step-00000{n}" / "recall_head.safetensors")) for n in (2, 3)]
    assert any(not torch.equal(heads[0][k], heads[1][k]) for k in heads[0])  # the head goes on learning
    # stopped after step 2 and resumed: the same head and graft at step 3 as the straight run
    real, calls = train_module.answer_accuracy, []

    def crash_on_third_step(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train_module, "answer_accuracy", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        train(recipe(tmp_path, "resumed", **settings), progress=False)
    monkeypatch.setattr(train_module, "answer_accuracy", real)
    resumed = train(recipe(tmp_path, "resumed", **settings), resume=True, progress=False).run_dir
    for name in ("recall_head.safetensors", "graft.safetensors"):
        want = load_file(str(straight / "checkpoints" / "step-000003" / name))
        got = load_file(str(resumed / "checkpoints" / "step-000003" / name))
        assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want), name


def test_a_recall_weight_needs_reads_at_every_position():
    raw = json.loads(json.dumps(RECIPE))
    raw["injector"] = {"kind": "mid_layer", "layer": 0, "direct_read": False, "num_tokens": 16}
    raw["train"]["recall_weight"] = 0.5
    with pytest.raises(RecipeError, match=r"train.recall_weight.*reads the memory at every position"):
        validate_recipe(raw)


def test_resuming_with_a_recall_head_that_does_not_fit_names_the_file(tmp_path):
    from safetensors.torch import save_file

    from graftkit.errors import GraftkitError

    full = recipe(tmp_path, "run", steps=2, eval_every=1, recall_weight=0.5)
    run = train(full.model_copy(update={"train": full.train.model_copy(update={"steps": 1})}), progress=False).run_dir
    head_file = run / "checkpoints" / "step-000001" / "recall_head.safetensors"
    save_file({"linear.weight": torch.zeros(2, 3), "linear.bias": torch.zeros(2)}, str(head_file))
    with pytest.raises(GraftkitError, match=r"--resume: .*recall_head.safetensors does not fit this run"):
        train(full, resume=True, progress=False)
    head_file.unlink()
    with pytest.raises(GraftkitError, match=r"--resume: .* has no recall_head.safetensors"):
        train(full, resume=True, progress=False)


def test_init_from_carries_the_recall_head_it_was_trained_with(tmp_path, capsys):
    settings = dict(steps=2, eval_every=1, recall_steps=1, recall_weight=0.5, recall_query="last_word")
    first = train(recipe(tmp_path, "first", **settings), progress=False).run_dir
    best = resolve_checkpoint(first, "best")
    assert sorted(p.name for p in best.iterdir()) == ["graft.safetensors", "recall_head.safetensors", "trainer.json"]
    step = json.loads((first / "checkpoints" / "best.json").read_text())["step"]
    saved = load_file(str(first / "checkpoints" / f"step-{step:06d}" / "recall_head.safetensors"))
    assert all(torch.equal(load_file(str(best / "recall_head.safetensors"))[k], saved[k]) for k in saved)
    capsys.readouterr()
    # a rate too small to move anything: the second run's head is the first run's best
    still = dict(steps=1, eval_every=1, lr=1e-12, recall_weight=0.5, init_from=str(first))
    second = train(recipe(tmp_path, "second", recall_query="last_word", **still), progress=False).run_dir
    assert f"recall: the recall head in {best / 'recall_head.safetensors'}" in capsys.readouterr().out
    after = load_file(str(second / "checkpoints" / "step-000001" / "recall_head.safetensors"))
    assert all(torch.allclose(after[k], saved[k], atol=1e-8) for k in saved)
    # a head trained with another query is not taken: the run starts a new one
    other = train(recipe(tmp_path, "other", recall_query="mixture", **still), progress=False).run_dir
    assert "recall: a new recall head (train.init_from: " in capsys.readouterr().out
    fresh = load_file(str(other / "checkpoints" / "step-000001" / "recall_head.safetensors"))
    assert not torch.allclose(fresh["linear.weight"], saved["linear.weight"])


def test_a_recall_head_with_unreadable_metadata_is_not_taken(tmp_path):
    from safetensors.torch import save_file

    from graftkit.recall import load_initial_head

    head = RecallHead(8, ["garden", "kitchen"], "last_word")
    save_file({"graft": torch.zeros(1)}, str(tmp_path / "graft.safetensors"))
    saved = {k: torch.ones_like(v) for k, v in head.state_dict().items()}
    save_file(saved, str(tmp_path / "recall_head.safetensors"), metadata={"answers": "not json", "query": "last_word"})
    assert load_initial_head(head, tmp_path).startswith("a new recall head (train.init_from: ")
    assert not torch.equal(head.linear.weight, saved["linear.weight"])
    save_file(saved, str(tmp_path / "recall_head.safetensors"), metadata=head.file_metadata())
    assert load_initial_head(head, tmp_path) == f"the recall head in {tmp_path / 'recall_head.safetensors'}"
    assert torch.equal(head.linear.weight, saved["linear.weight"])
