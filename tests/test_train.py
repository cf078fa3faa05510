"""End to end on a tiny random backbone: train -> files and metrics -> resume -> eval."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

import graftkit
from graftkit.checkpoint import resolve_checkpoint
from graftkit.cli import main
from graftkit.errors import GraftkitError
from graftkit.protocol import HiddenCache, turn2_batch
from graftkit.recipe import validate_recipe
from graftkit.train import train

RECIPE = {
    "schema_version": 1,
    "backbone": {"kind": "llama", "source": "tiny-random"},
    "memory": {"kind": "titans", "heads": 2, "dim_head": 16, "chunk_size": 16, "write_layer": 1},
    "injector": {"kind": "layer0_soft_prompt", "num_tokens": 4},
    "data": {"task": "babilong", "tasks": ["qa1"], "train_lengths": ["0k", "1k"], "eval_lengths": ["0k"], "train_samples": 8, "eval_samples": 4},
    "train": {"steps": 4, "batch_size": 2, "eval_every": 2, "log_every": 1, "warmup_steps": 1},
}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAFTKIT_CACHE", str(tmp_path / "cache"))


def recipe(tmp_path, name="run", **train):
    raw = json.loads(json.dumps(RECIPE))
    raw["train"].update(train)
    raw["output_dir"] = str(tmp_path / name)
    return validate_recipe(raw)


def test_train_writes_a_complete_run(tmp_path):
    result = train(recipe(tmp_path), progress=False)
    run = result.run_dir
    for name in ("recipe.yaml", "metrics.jsonl", "loss.png", "accuracy.png", "checkpoints/latest.json", "checkpoints/best.json"):
        assert (run / name).is_file(), name
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    for block in ("backbone", "memory", "injector"):  # every option, defaults included: a later default changes nothing
        config = graftkit.components(block)[RECIPE[block]["kind"]].Config
        assert set(saved[block]) == {"kind", *config.model_fields}, block
        assert {k: saved[block][k] for k in RECIPE[block]} == RECIPE[block]
    step = run / "checkpoints" / "step-000004"
    assert sorted(p.name for p in step.iterdir()) == ["graft.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer.json"]
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.bin")) and not list(run.rglob("*.pkl"))
    tensors = load_file(str(step / "graft.safetensors"))
    assert tensors and all(k.startswith(("memory.", "injector.", "write_norm.")) for k in tensors)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if "loss" in r]
    eval_lines = [r for r in lines if "eval" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and 0 <= r["answer_acc"] <= 1 for r in train_lines)
    assert [r["step"] for r in eval_lines] == [2, 4] and all("qa1/0k" in r["eval"] for r in eval_lines)
    assert result.best_step in (2, 4)
    # the turn-1 hidden states were cached on disk, one file per sample
    assert len(list((tmp_path / "cache" / "hidden").rglob("*.safetensors"))) == 8 * 2 + 4


def test_training_changes_the_graft(tmp_path):
    run = train(recipe(tmp_path, steps=2, eval_every=2), progress=False).run_dir
    from graftkit.api import build_graft

    fresh = build_graft(validate_recipe({**RECIPE, "output_dir": str(tmp_path / "x")}))
    fresh.injector.detach()
    trained = load_file(str(run / "checkpoints" / "step-000002" / "graft.safetensors"))
    initial = fresh.graft_state_dict()
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)


def test_resume_after_a_crash_gives_the_same_run(tmp_path, monkeypatch):
    straight = train(recipe(tmp_path, "straight"), progress=False).run_dir

    import graftkit.train as module

    calls = {"n": 0}
    real = module.answer_accuracy

    def crash_on_third_step(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the machine goes away after the step-2 checkpoint
        return real(*args)

    monkeypatch.setattr(module, "answer_accuracy", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        train(recipe(tmp_path, "crashed"), progress=False)
    monkeypatch.setattr(module, "answer_accuracy", real)
    crashed = tmp_path / "crashed"
    assert json.loads((crashed / "checkpoints" / "latest.json").read_text())["path"] == "step-000002"
    with pytest.raises(GraftkitError, match="--resume"):
        train(recipe(tmp_path, "crashed"), progress=False)  # refuses to overwrite a run
    train(recipe(tmp_path, "crashed"), resume=True, progress=False)
    a = load_file(str(straight / "checkpoints" / "step-000004" / "graft.safetensors"))
    b = load_file(str(crashed / "checkpoints" / "step-000004" / "graft.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    steps = [json.loads(line)["step"] for line in (crashed / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert steps == [1, 2, 3, 4]  # no step logged twice


def test_resume_passes_over_damaged_run_files_to_the_intact_checkpoint_before(tmp_path):
    """latest.json garbage, the newest checkpoint's optimizer file truncated, metrics.jsonl's last line torn: --resume
    warns, goes on from the checkpoint before, and ends where an undisturbed run ends."""
    from graftkit.checkpoint import CheckpointWarning

    straight = train(recipe(tmp_path, "straight"), progress=False).run_dir
    damaged = train(recipe(tmp_path, "damaged"), progress=False).run_dir
    root = damaged / "checkpoints"
    (root / "latest.json").write_text("{not json")
    optimizer = root / "step-000004" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    with (damaged / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')
    with pytest.warns(CheckpointWarning) as record:
        assert resolve_checkpoint(damaged, "last").name == "step-000004"
        train(recipe(tmp_path, "damaged"), resume=True, progress=False)
    messages = "\n".join(str(w.message) for w in record)
    assert "latest.json is damaged" in messages and "optimizer.safetensors: damaged or missing" in messages
    assert "resuming from step-000002" in messages
    a = load_file(str(straight / "checkpoints" / "step-000004" / "graft.safetensors"))
    b = load_file(str(root / "step-000004" / "graft.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    steps = [json.loads(line)["step"] for line in (damaged / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert steps == [1, 2, 3, 4]


def test_a_damaged_pointer_or_best_copy_falls_back_and_a_damaged_asked_for_checkpoint_is_named(tmp_path, capsys):
    from graftkit.checkpoint import CheckpointWarning

    run = train(recipe(tmp_path, steps=2, eval_every=2), progress=False).run_dir
    root = run / "checkpoints"
    best = resolve_checkpoint(run, "best")
    (root / "best.json").write_text("[1, 2")
    with pytest.warns(CheckpointWarning, match="best.json is damaged"):
        assert resolve_checkpoint(run, "best") == best  # the newest complete best copy
    (best / "trainer.json").write_text("[1, 2")
    with pytest.warns(CheckpointWarning):
        assert resolve_checkpoint(run, "best").name == "step-000002"  # no complete best copy: the newest checkpoint
    with pytest.warns(CheckpointWarning):
        assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    (root / "step-000002" / "trainer.json").write_text("")
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "export2"), "--checkpoint", "2"]) == 1
    err = capsys.readouterr().err
    assert "step-000002/trainer.json: damaged" in err and "Traceback" not in err, err


def test_a_crash_while_the_best_checkpoint_is_copied_loses_nothing(tmp_path, monkeypatch):
    """Killed after a step's checkpoint records a new best but before its copy is in place: `best.json` still
    names a complete folder, and `--resume` copies the recorded best in before going on."""
    import graftkit.train as module

    def killed(*args):
        raise KeyboardInterrupt

    run = recipe(tmp_path, "killed", steps=2, eval_every=1)
    monkeypatch.setattr(module, "mark_best", killed)
    with pytest.raises(KeyboardInterrupt):
        train(run, progress=False)  # dies in step 1's best copy
    monkeypatch.undo()
    root = tmp_path / "killed" / "checkpoints"
    assert not (root / "best.json").exists() and json.loads((root / "latest.json").read_text())["path"] == "step-000001"
    train(run, resume=True, progress=False)
    best = resolve_checkpoint(tmp_path / "killed", "best")
    assert best.name.startswith("best-") and (best / "graft.safetensors").is_file()
    assert [p.name for p in root.glob("best*") if p.is_dir()] == [best.name]  # the previous copies are gone
    recorded = json.loads((root / "step-000002" / "trainer.json").read_text())["best"]["step"]
    assert json.loads((best / "trainer.json").read_text())["step"] == recorded


def test_resume_with_another_recipe_is_refused_and_the_run_keeps_its_own(tmp_path):
    run = recipe(tmp_path, "run", steps=2, eval_every=2)
    train(run, progress=False)
    saved = (tmp_path / "run" / "recipe.yaml").read_text()
    changed = recipe(tmp_path, "run", steps=2, eval_every=2, batch_size=3)
    with pytest.raises(GraftkitError, match=r"--resume: the recipe differs from the run's own \(train.batch_size: 2 in the run, 3 now\)"):
        train(changed, resume=True, progress=False)
    assert (tmp_path / "run" / "recipe.yaml").read_text() == saved
    longer = recipe(tmp_path, "run", steps=3, eval_every=3)
    train(longer, resume=True, progress=False)  # going on for longer is what resuming is for
    assert "steps: 3" in (tmp_path / "run" / "recipe.yaml").read_text()


def test_resume_with_a_lower_learning_rate_goes_on_at_that_rate(tmp_path, capsys):
    """After a divergence a run is resumed more gently: the restored schedule is rescaled to the new peak rate."""
    for name in ("run", "same"):
        train(recipe(tmp_path, name, steps=2, eval_every=2), progress=False)
    train(recipe(tmp_path, "same", steps=4, eval_every=2), resume=True, progress=False)
    capsys.readouterr()
    train(recipe(tmp_path, "run", steps=4, eval_every=2, lr=1e-4), resume=True, progress=False)
    assert "with learning rate 0.0001 (was 0.001)" in capsys.readouterr().out

    def rates(run):
        return {row["step"]: row["lr"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in row}

    resumed, full = rates(tmp_path / "run"), rates(tmp_path / "same")
    assert resumed[2] == full[2]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(full[step] / 10, rel=1e-6)
    assert json.loads((tmp_path / "run" / "checkpoints" / "step-000004" / "trainer.json").read_text())["scheduler"]["base_lrs"] == [1e-4]


def test_an_update_that_breaks_the_weights_stops_the_run_before_it_is_saved(tmp_path, monkeypatch):
    real = torch.optim.AdamW.step

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    with pytest.raises(GraftkitError, match=r"training diverged: the update of step 1 made graft weights non-finite .*no checkpoint was written"):
        train(recipe(tmp_path, "nan", steps=2, eval_every=1), progress=False)
    assert not (tmp_path / "nan" / "checkpoints" / "latest.json").exists()


@pytest.mark.parametrize("value", [".inf", ".nan"])
def test_an_infinite_learning_rate_is_refused(tmp_path, value, capsys):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, "output_dir": str(tmp_path / "x")}))
    assert main(["validate", str(path), f"train.lr={value}"]) == 2
    assert "train.lr" in capsys.readouterr().err


@pytest.mark.parametrize("override", ["train.steps=true", "memory.chunk_size=false", "injector.gate_init=yes", "memory.max_lr=.inf"])
def test_a_yes_no_or_infinity_where_a_number_belongs_is_refused_by_name(tmp_path, override, capsys):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, "output_dir": str(tmp_path / "x")}))
    assert main(["validate", str(path), override]) == 2
    assert override.split("=")[0] in capsys.readouterr().err
    assert main(["validate", str(path), "train.steps=3"]) == 0


def test_a_folder_another_run_writes_to_is_refused_and_a_stale_lock_is_not(tmp_path):
    from graftkit.run_dir import run_lock

    folder = tmp_path / "run"
    folder.mkdir()
    with run_lock(folder):  # a run in progress (this process holds the lock)
        with pytest.raises(GraftkitError, match=r"another graftkit run \(process \d+\) is writing to"):
            train(recipe(tmp_path, "run", steps=1, eval_every=1), progress=False)
    assert not (folder / "checkpoints").exists() and not (folder / "recipe.yaml").exists()
    (folder / ".lock").write_text("999999999")  # left by a run that died
    train(recipe(tmp_path, "run", steps=1, eval_every=1), progress=False)
    assert not (folder / ".lock").exists()


def test_a_folder_of_other_files_is_refused_untouched(tmp_path):
    own = tmp_path / "project"
    own.mkdir()
    (own / "recipe.yaml").write_text("my own recipe\n")
    with pytest.raises(GraftkitError, match=r"output_dir: .*project holds files that are not a graftkit run \(recipe.yaml\)"):
        train(recipe(tmp_path, "project", steps=1, eval_every=1), progress=False)
    assert (own / "recipe.yaml").read_text() == "my own recipe\n"


def test_cli_train_and_eval(tmp_path, capsys):
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, "output_dir": str(tmp_path / "cli")}))
    assert main(["train", str(path), "train.steps=2", "train.eval_every=2"]) == 0
    assert main(["eval", str(tmp_path / "cli"), "--n", "3", "--lengths", "0k"]) == 0
    out = capsys.readouterr().out
    assert "graft (two-turn, answers from memory)" in out and "chance" in out
    eval_dir = tmp_path / "cli" / "eval"
    assert sorted(p.name for p in eval_dir.iterdir()) == ["chart.png", "predictions.jsonl", "results.json", "results.md"]
    results = json.loads((eval_dir / "results.json").read_text())
    assert set(results["table"]) == {"graft", "empty", "full_context", "question_only", "chance"}
    assert results["table"]["chance"]["qa1/0k"] == pytest.approx(1 / 6)
    kept = results["preservation"]
    assert kept["n"] == 3 and 0 <= kept["agreement"] <= 1 and kept["loss_backbone"] > 0
    assert "greedy answers equal to the bare backbone's" in out
    predictions = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 * 3 + 3  # four scored rows (chance is computed) x three samples, three general prompts
    assert {p["row"] for p in predictions} == {"graft", "empty", "full_context", "question_only", "preservation"}
    assert main(["eval", str(tmp_path / "nowhere")]) == 1
    assert "not a graftkit run directory" in capsys.readouterr().err


def test_eval_overrides_change_that_evaluation_only(tmp_path, capsys, monkeypatch):
    import yaml

    import graftkit.evaluate as evaluation

    raw = {**RECIPE, "memory": {"kind": "linear", "heads": 2, "dim_head": 16, "decay": False, "write_layer": 1}, "output_dir": str(tmp_path / "run")}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(tmp_path / "tiny.yaml"), "train.steps=1", "train.eval_every=1"]) == 0
    recipe_text = (tmp_path / "run" / "recipe.yaml").read_text()
    seen, real = [], evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda graft, *a: seen.append(graft.memory) or real(graft, *a))
    args = ["--n", "2", "--lengths", "0k", "--rows", "graft"]
    assert main(["eval", str(tmp_path / "run"), "memory.write_floor=0.99", *args]) == 0
    assert seen[-1].config.write_floor == 0.99 and not seen[-1].training  # eval mode: the floor applies
    overrides = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())["overrides"]
    assert overrides == ["memory.write_floor=0.99", "data.0.eval_lengths=[0k]"]
    assert (tmp_path / "run" / "recipe.yaml").read_text() == recipe_text
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "memory.heads=4", *args]) == 1
    assert "does not fit this graft" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "run"), "memory.write_flor=0.5", *args]) != 0
    assert "write_flor" in capsys.readouterr().err


def test_training_samples_per_length(tmp_path):
    from graftkit.backbones.sources import byte_tokenizer

    from graftkit.task import build_task
    from graftkit.train import build_buckets

    raw = json.loads(json.dumps(RECIPE))
    raw["data"]["train_samples"] = {"0k": 5, "1k": 3}
    parsed = validate_recipe(raw)
    buckets = build_buckets([build_task(c) for c in parsed.task_configs()], byte_tokenizer(), "train")
    assert {name: len(samples) for (_, name), samples in buckets.items()} == {"qa1/0k": 5, "qa1/1k": 3}


def poison_losses(monkeypatch, bad_calls):
    """Make the training forward's loss NaN on the given calls (1-based), as an overflowing batch would."""
    import graftkit.train as module

    real, calls = module.TwoTurn.forward, {"n": 0}

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] in bad_calls:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(module.TwoTurn, "forward", forward)


def test_a_non_finite_step_is_skipped_not_applied(tmp_path, monkeypatch):
    one_step = train(recipe(tmp_path, "one_step", steps=1, eval_every=1), progress=False).run_dir
    poison_losses(monkeypatch, bad_calls={2})  # training forwards only: evaluation does not call TwoTurn
    run = train(recipe(tmp_path, "poisoned", steps=2, eval_every=2), progress=False).run_dir
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert [r["skipped_steps"] for r in lines] == [0, 1]
    # step 2 was dropped: the run holds exactly the weights a clean one-step run ends with
    poisoned = load_file(str(run / "checkpoints" / "step-000002" / "graft.safetensors"))
    after_one = load_file(str(one_step / "checkpoints" / "step-000001" / "graft.safetensors"))
    assert poisoned.keys() == after_one.keys()
    for key in poisoned:
        torch.testing.assert_close(poisoned[key], after_one[key], atol=0, rtol=0)


def test_a_diverged_run_stops_with_a_clear_error(tmp_path, monkeypatch):
    import graftkit.train as module

    monkeypatch.setattr(module, "MAX_NONFINITE_STEPS", 3)
    poison_losses(monkeypatch, bad_calls=set(range(1, 100)))
    with pytest.raises(GraftkitError, match=r"diverged: 3 steps in a row up to step 3.*train\.lr"):
        train(recipe(tmp_path, steps=6, eval_every=100), progress=False)


# -- the read loss -------------------------------------------------------------------------------------


def built_graft(tmp_path, injector: dict):
    from graftkit.api import build_graft

    torch.manual_seed(0)
    return build_graft(validate_recipe({**RECIPE, "injector": injector, "output_dir": str(tmp_path / "g")}))


def test_read_loss_scores_the_answer_at_question_positions_only(tmp_path):
    """Hand-made batch: row 0 is left-padded; -log of the answer's probability averaged over question positions."""
    from graftkit.objectives.read import read_loss

    graft = built_graft(tmp_path, {"kind": "mid_layer", "layer": 0, "direct_read": True})
    torch.manual_seed(1)
    reads = torch.randn(2, 6, graft.backbone.hidden_size, requires_grad=True)
    graft.injector.reads = reads
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, -100, -100, 7, 2], [-100, -100, -100, 9, 4, 2]])
    loss = read_loss(graft, mask, labels)
    expected = []
    for row, positions, answer in ((0, [2, 3], 7), (1, [0, 1, 2], 9)):
        logp = torch.log_softmax(graft.backbone.logits(reads[row, positions]), dim=-1)[:, answer]
        expected.append(-(torch.logsumexp(logp, 0) - math.log(len(positions))))
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    loss.backward()
    reached = reads.grad.abs().sum(-1) > 0
    assert reached.tolist() == [[False, False, True, True, False, False], [True, True, True, False, False, False]]


@pytest.mark.parametrize(
    "injector",
    [
        {"kind": "layer0_soft_prompt", "num_tokens": 4},
        {"kind": "mid_layer", "layer": 1, "direct_read": True},
    ],
    ids=lambda i: i["kind"],
)
def test_read_loss_is_added_to_the_answer_loss(tmp_path, injector):
    from graftkit.tasks.babilong import babilong_examples

    from graftkit.objectives.read import ReadLoss
    from graftkit.train import TwoTurn

    graft = built_graft(tmp_path, injector)
    samples = babilong_examples("qa1", "train", "0k", 3, seed=0, tokenizer=graft.backbone.tokenizer)
    hidden, mask = HiddenCache(graft, None).get(samples)
    batch = turn2_batch(graft.backbone, samples, with_answers=True)
    plain = TwoTurn(graft)(hidden, mask, **batch)
    with_reads = TwoTurn(graft, [ReadLoss(0.5)])(hidden, mask, **batch)
    assert graft.injector.reads.shape[:2] == batch["input_ids"].shape  # one read per question position
    read = with_reads.terms["read_loss"]
    assert read > 0
    torch.testing.assert_close(with_reads.loss, plain.loss + 0.5 * read)
    read.backward()
    grads = {name: p.grad for name, p in graft.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for name, g in grads.items() if name.startswith("memory."))
    assert any(g is not None and g.abs().sum() > 0 for name, g in grads.items() if name.startswith("injector.to_query"))


def test_training_with_the_read_loss_logs_it(tmp_path):
    run = train(recipe(tmp_path, steps=2, eval_every=2, read_loss=1.0), progress=False).run_dir
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in lines] == [1, 2]
    assert all(math.isfinite(r["read_loss"]) and 0 < r["read_loss"] < r["loss"] for r in lines)


def test_a_checkpoint_is_named_by_step_or_by_its_folder(tmp_path):
    from graftkit.checkpoint import load_run, resolve_checkpoint

    run = train(recipe(tmp_path, steps=2, eval_every=1), progress=False).run_dir
    folder = run / "checkpoints" / "step-000002"
    assert resolve_checkpoint(run, "2") == resolve_checkpoint(run, "step-000002") == resolve_checkpoint(run, "last") == folder
    with pytest.raises(GraftkitError, match="expected best, last or a step number, got 'step-two'"):
        resolve_checkpoint(run, "step-two")
    _, graft, info = load_run(run, "step-000001")
    assert info["step"] == 1
    saved = load_file(str(run / "checkpoints" / "step-000001" / "graft.safetensors"))
    for key, tensor in graft.graft_state_dict().items():
        torch.testing.assert_close(tensor, saved[key], atol=0, rtol=0)
    with pytest.raises(GraftkitError, match="not a graftkit run directory"):
        load_run(tmp_path / "nowhere")


def test_training_starts_from_the_tensors_init_from_names(tmp_path):
    first = train(recipe(tmp_path, "first", steps=2, eval_every=2), progress=False).run_dir
    saved = load_file(str(first / "checkpoints" / "step-000002" / "graft.safetensors"))
    # a rate too small to move anything: the second run ends where the first one did
    second = train(recipe(tmp_path, "second", steps=1, eval_every=1, lr=1e-12, init_from=str(first)), progress=False).run_dir
    after = load_file(str(second / "checkpoints" / "step-000001" / "graft.safetensors"))
    assert after.keys() == saved.keys()
    for key in saved:
        torch.testing.assert_close(after[key], saved[key], atol=1e-8, rtol=0)


def test_init_from_may_hold_part_of_the_graft(tmp_path):
    from safetensors.torch import save_file

    from graftkit.api import build_graft
    from graftkit.checkpoint import load_initial_tensors

    torch.manual_seed(0)
    graft = build_graft(recipe(tmp_path))
    fresh = {k: v.clone() for k, v in graft.graft_state_dict().items()}
    memory = {k: torch.randn_like(v) for k, v in fresh.items() if k.startswith("memory.")}
    save_file(memory, str(tmp_path / "memory.safetensors"))
    file, kept = load_initial_tensors(graft, tmp_path / "memory.safetensors")
    assert file == tmp_path / "memory.safetensors"
    assert kept == sorted(set(fresh) - set(memory)) and kept
    now = graft.graft_state_dict()
    assert all(torch.equal(now[k], memory[k]) for k in memory)
    assert all(torch.equal(now[k], fresh[k]) for k in kept)


def test_a_wrong_init_from_is_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    from graftkit.api import build_graft
    from graftkit.checkpoint import load_initial_tensors

    with pytest.raises(GraftkitError, match=r"train.init_from: .*nowhere does not exist"):
        train(recipe(tmp_path, init_from=str(tmp_path / "nowhere")), progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    with pytest.raises(GraftkitError, match="train.init_from: .*unfinished: no best checkpoint"):
        train(recipe(tmp_path, init_from=str(tmp_path / "unfinished")), progress=False)
    with pytest.raises(GraftkitError, match="train.init_from: .*empty holds no graft tensors"):
        train(recipe(tmp_path, init_from=str(tmp_path / "empty")), progress=False)
    graft = build_graft(recipe(tmp_path))
    before = {k: v.clone() for k, v in graft.graft_state_dict().items()}
    save_file({"memory.nothing_like_this": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(GraftkitError, match="holds tensors this graft does not have \\(memory.nothing_like_this\\)"):
        load_initial_tensors(graft, tmp_path / "other.safetensors")
    name = next(k for k in before if k.startswith("memory."))
    save_file({name: torch.zeros(3, 3, 3)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(GraftkitError, match=f"shapes differ from this graft's \\({name} \\(3, 3, 3\\)"):
        load_initial_tensors(graft, tmp_path / "shape.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(GraftkitError, match="junk.safetensors is not a readable safetensors file"):
        load_initial_tensors(graft, tmp_path / "junk.safetensors")
    assert all(torch.equal(graft.graft_state_dict()[k], v) for k, v in before.items())  # nothing half-loaded
    assert not (tmp_path / "run").exists()  # the refused runs wrote nothing


def test_frozen_tensors_stay_as_loaded_while_the_rest_trains(tmp_path):
    first = train(recipe(tmp_path, "first", steps=2, eval_every=2), progress=False).run_dir
    saved = load_file(str(first / "checkpoints" / "step-000002" / "graft.safetensors"))
    second = train(recipe(tmp_path, "second", steps=2, eval_every=2, lr=1e-2, init_from=str(first), freeze=["memory"]), progress=False).run_dir
    after = load_file(str(second / "checkpoints" / "step-000002" / "graft.safetensors"))
    memory = [k for k in saved if k.startswith("memory.")]
    assert memory and all(torch.equal(after[k], saved[k]) for k in memory)
    assert any(not torch.equal(after[k], saved[k]) for k in saved if k.startswith("injector."))


def test_a_wrong_freeze_is_refused_by_name(tmp_path):
    with pytest.raises(GraftkitError, match=r"train.freeze: 'memroy' names no graft parameter \(they start with injector, memory\)"):
        train(recipe(tmp_path, freeze=["memroy"]), progress=False)
    with pytest.raises(GraftkitError, match="train.freeze: .* holds every graft parameter fixed"):
        train(recipe(tmp_path, freeze=["memory", "injector"]), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
