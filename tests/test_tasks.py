"""Tasks are plugins: the contract, the built-in jsonl and profile tasks, multi-task recipes, a third-party
task, multi-session episodes and the preservation row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from graftkit.tasks.jsonl import JsonlError, read_episodes
from graftkit.tasks.profile import UNKNOWN, ProfileConfig, ProfileTask, vocabulary
from test_plugins import _installed

import graftkit
from graftkit.api import configure
from graftkit.cli import main
from graftkit.errors import GraftkitError, RecipeError
from graftkit.recipe import load_recipe, validate_recipe
from graftkit.task import Example, Prompt, build_task, contains, exact_match, load_examples, normalize, token_f1

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "schema_version": 1,
    "backbone": {"kind": "llama", "source": "tiny-random"},
    "memory": {"kind": "linear", "heads": 2, "dim_head": 16, "decay": False, "write_layer": 1},
    "injector": {"kind": "mid_layer", "layer": 1, "direct_read": True, "num_tokens": 0},
    "train": {"steps": 2, "batch_size": 2, "eval_every": 2, "log_every": 1, "warmup_steps": 1},
}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAFTKIT_CACHE", str(tmp_path / "cache"))


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# -- scorers ---------------------------------------------------------------------------------------------------------
def test_scorers_normalise_case_punctuation_and_articles():
    assert normalize("  The Harbour, of Porto! ") == "harbour of porto"
    assert exact_match("Porto", "porto.\nAnything after the first line") and not exact_match("Porto", "I think Porto")
    assert contains("Porto", "I think it is Porto.") and not contains("Port", "Porto")
    assert token_f1("the red car", "red car") == 1.0 and token_f1("red car", "blue bike") == 0.0


# -- jsonl -------------------------------------------------------------------------------------------------------------
def test_jsonl_reads_both_forms_and_groups_questions_by_episode(tmp_path):
    path = write_lines(
        tmp_path / "e.jsonl",
        [
            {"sessions": "The code is 4471.", "question": "What is the code?", "answer": "4471"},
            {
                "sessions": ["Ana lives in Porto.", "Ana has a cat, Miso."],
                "questions": [{"question": "Where does Ana live?", "answer": "Porto"}, {"question": "Cat?", "answer": "Miso"}],
            },
        ],
    )
    task = build_task(configure("task", "jsonl", {"task": "jsonl", "train": str(path), "test": str(path)})[1])
    examples = load_examples(task, "test", "jsonl", None)
    assert [e.target for e in examples] == ["4471", "Porto", "Miso"]
    assert examples[1].sessions == ("Ana lives in Porto.", "Ana has a cat, Miso.")
    assert examples[1].context_uid == examples[2].context_uid != examples[0].context_uid
    assert examples[1].uid != examples[2].uid and all(e.prompt == Prompt() for e in examples)
    assert task.score(examples[0], "4471.") and not task.score(examples[0], "4472")


def test_jsonl_names_every_bad_line_and_loads_nothing(tmp_path):
    path = write_lines(
        tmp_path / "train.jsonl",
        [
            {"sessions": "ok", "question": "q?", "answer": "a"},
            '{"sessions": "x", "question": "q?"',
            {"sessions": "x", "question": "q?"},
            {"sessions": [], "question": "q?", "answer": "a"},
            {"sessions": "x", "question": "q?", "answer": "a", "choices": ["b", "c"]},
            {"sessions": "x", "question": "q?", "answer": "a", "colour": "red"},
        ],
    )
    with pytest.raises(JsonlError) as err:
        read_episodes(path)
    message = str(err.value)
    assert "5 problem(s); nothing was loaded" in message
    for expected in (
        "train.jsonl:2: not valid JSON",
        "train.jsonl:3: line: needs question and answer",
        "train.jsonl:4: sessions:",
        "train.jsonl:5: line: answer 'a' is not one of choices",
        "train.jsonl:6: colour: Extra inputs are not permitted",
    ):
        assert expected in message, message
    assert "train.jsonl:1" not in message


def test_jsonl_user_mistakes_are_messages(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\xff\xfe not text")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({**TINY, "data": {"task": "jsonl", "train": str(tmp_path / "none.jsonl")}}))
    assert main(["validate", str(recipe)]) == 2
    assert "data.train: no such file" in capsys.readouterr().err
    with pytest.raises(JsonlError, match="not UTF-8"):
        read_episodes(bad)
    with pytest.raises(JsonlError, match="holds no episode"):
        read_episodes(write_lines(tmp_path / "empty.jsonl", ["", "  "]))


def test_jsonl_without_a_test_file_holds_out_a_seeded_share(tmp_path):
    path = write_lines(tmp_path / "e.jsonl", [{"sessions": f"n{i}", "question": "q?", "answer": str(i)} for i in range(50)])
    config = configure("task", "jsonl", {"task": "jsonl", "train": str(path), "test_fraction": 0.2})[1]
    task = build_task(config)
    train, test = (load_examples(task, split, "jsonl", None) for split in ("train", "test"))
    assert len(train) + len(test) == 50 and 3 <= len(test) <= 20
    assert not {e.target for e in train} & {e.target for e in test}
    assert [e.uid for e in load_examples(build_task(config), "test", "jsonl", None)] == [e.uid for e in test]


def test_the_readme_jsonl_example_trains_and_evaluates(tmp_path, monkeypatch, capsys):
    """The README's own recipe and files, on the tiny backbone (layers moved to fit its two)."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "my_graft"
    fit = ["backbone.source=tiny-random", "memory.write_layer=1", "injector.layer=1", "memory.heads=2", "memory.dim_head=16"]
    assert main(["train", "recipes/smollm2_jsonl.yaml", *fit, "train.steps=2", "train.eval_every=2", f"output_dir={out}"]) == 0
    assert main(["eval", str(out), "--n", "4", "--rows", "graft,full_context,chance,preservation"]) == 0
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["cells"] == ["jsonl"] and results["table"]["chance"]["jsonl"] is None  # open answers: no chance row
    assert 0 <= results["table"]["graft"]["jsonl"] <= 1 and results["preservation"]["n"] == 4


# -- profile -----------------------------------------------------------------------------------------------------------
def profile(**options) -> ProfileTask:
    return ProfileTask(ProfileConfig(task="profile", **options))


def test_profile_splits_share_no_name_and_no_value():
    train, test = vocabulary("train", 0), vocabulary("test", 0)
    for key in train:
        assert min(len(train[key]), len(test[key])) > {"age": 30, "colour": 60, "birthday": 150}.get(key, 200), key
        assert not {v.lower() for v in train[key]} & {v.lower() for v in test[key]}, key
    task = profile()
    words = {}
    for split in ("train", "test"):
        examples = [e for b in task.buckets(split) for e in load_examples(task, split, b, 60)]
        words[split] = {e.target for e in examples if e.target != UNKNOWN}
        words[split] |= {e.info["person"] for e in examples}
    assert not words["train"] & words["test"]


def test_profile_episodes_tell_update_and_ask_what_was_never_told():
    task = profile(update_rate=0.5, unanswerable_rate=0.3, sessions=[4], eval_lengths=["0k"])
    examples = load_examples(task, "test", "profile/4s/0k", 400)
    kinds = {e.info["kind"] for e in examples}
    assert kinds == {"told", "updated", "untold", "stranger"}
    for e in examples:
        assert len(e.sessions) == 4 and e.bucket == "profile/4s/0k"
        text = " ".join(e.sessions)
        if e.info["kind"] in ("told", "updated"):
            assert e.target in text
        if e.info["kind"] == "updated":  # the latest statement holds the answer
            assert e.info["earlier"] != e.target and text.index(e.info["earlier"]) < text.rindex(e.target)
        assert e.info["person"] in e.question
        if e.info["kind"] == "stranger":
            assert e.info["person"] not in text
    answerable = next(e for e in examples if e.target != UNKNOWN)
    unknown = next(e for e in examples if e.target == UNKNOWN)
    assert task.score(answerable, answerable.target.upper() + ".") and not task.score(answerable, "unknown")
    assert task.score(unknown, "I don't know.") and task.score(unknown, "Unknown") and not task.score(unknown, answerable.target)
    assert [e.uid for e in load_examples(task, "test", "profile/4s/0k", 40)] == [e.uid for e in examples[:40]]


def test_profile_pads_episodes_to_their_length():
    from graftkit.backbones.sources import byte_tokenizer

    tok = byte_tokenizer()
    task = profile(sessions=[1, 4], eval_lengths=["0k", "2k"])  # 2k: a 1,700-token context, as BABILong's lengths
    for bucket, low, high in (("profile/1s/2k", 1550, 1950), ("profile/4s/2k", 1550, 1950), ("profile/1s/0k", 1, 400)):
        e = load_examples(task, "test", bucket, 1, tok)[0]
        n = sum(len(tok(s, add_special_tokens=False)["input_ids"]) for s in e.sessions)
        assert low <= n <= high, (bucket, n)


# -- recipes with tasks ------------------------------------------------------------------------------------------------
def test_a_recipe_mixes_tasks_by_weight_and_reports_every_block_error():
    recipe = load_recipe(ROOT / "recipes" / "smollm2_profile.yaml")
    assert [(c.task, c.weight) for c in recipe.task_configs()] == [("profile", 2.0), ("babilong", 1.0)]
    with pytest.raises(RecipeError) as err:
        validate_recipe({**TINY, "data": [{"task": "profile", "sessions": [0]}, {"task": "babilon"}, {"weight": 1}]})
    lines = str(err.value)
    assert "data.0.sessions" in lines and "did you mean 'babilong'?" in lines and "data.2.task: required key is missing" in lines


def test_objectives_that_need_a_closed_answer_set_or_fact_marks_are_refused_on_tasks_without(tmp_path):
    path = write_lines(tmp_path / "e.jsonl", [{"sessions": "x", "question": "q?", "answer": "a"}])
    data = {"task": "jsonl", "train": str(path)}
    for field, message in (
        ("recall_steps", "needs tasks with answers from a closed set to classify reads into"),
        ("recall_weight", "needs tasks with answers from a closed set to classify reads into"),
        ("background_cost", "needs tasks with a way to tell fact tokens from background"),
    ):
        with pytest.raises(RecipeError, match=f"train.{field}: {message}; task 'jsonl' has none"):
            validate_recipe({**TINY, "data": data, "train": {**TINY["train"], field: 1}})


def test_tasks_are_drawn_by_weight():
    from graftkit.train import draw_bucket

    keys = [(0, "a/1"), (0, "a/2"), (1, "b")]
    rng = np.random.default_rng(0)
    drawn = [draw_bucket(rng, keys, [3.0, 1.0]) for _ in range(4000)]
    share = sum(k[0] == 0 for k in drawn) / len(drawn)
    assert 0.72 < share < 0.78
    assert {k for k in drawn if k[0] == 0} == {(0, "a/1"), (0, "a/2")}


def test_a_mixed_recipe_trains_and_evaluates_each_task(tmp_path):
    from graftkit.train import train

    path = write_lines(tmp_path / "e.jsonl", [{"sessions": f"The code is {i}.", "question": "Code?", "answer": str(i)} for i in range(12)])
    raw = {
        **TINY,
        "output_dir": str(tmp_path / "run"),
        "data": [
            {"task": "jsonl", "train": str(path), "test_fraction": 0.25},
            {"task": "profile", "sessions": [2], "train_lengths": ["0k"], "eval_lengths": ["0k"], "train_samples": 8, "eval_samples": 4},
        ],
    }
    result = train(validate_recipe(raw), progress=False)
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert set(next(r for r in lines if "eval" in r)["eval"]) == {"jsonl", "profile/2s/0k"}


def test_a_run_trained_with_the_recall_stage_evaluates_on_an_open_answer_task(tmp_path, capsys):
    from graftkit.train import train

    raw = {
        **TINY,
        "output_dir": str(tmp_path / "run"),
        "data": {"task": "babilong", "tasks": ["qa1"], "train_lengths": ["0k"], "eval_lengths": ["0k"], "train_samples": 6, "eval_samples": 2},
    }
    train(validate_recipe({**raw, "train": {**TINY["train"], "recall_steps": 2}}), progress=False)
    profile_block = "data=[{task: profile, sessions: [1], eval_lengths: [1k]}]"
    assert main(["eval", str(tmp_path / "run"), profile_block, "--n", "3", "--lengths", "0k", "--rows", "graft,chance"]) == 0
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert results["cells"] == ["profile/1s/0k"] and results["table"]["chance"]["profile/1s/0k"] is None
    predictions = [json.loads(line) for line in (tmp_path / "run" / "eval" / "predictions.jsonl").read_text().splitlines()]
    kinds = results["kinds"]["graft"]  # the profile questions' kinds, each with its accuracy
    assert set(kinds) <= {"told", "updated", "untold", "stranger"} and sum(k["n"] for k in kinds.values()) == len(predictions)
    for kind, got in kinds.items():
        mine = [p["correct"] for p in predictions if p["kind"] == kind]
        assert got == {"accuracy": float(np.mean(mine)), "n": len(mine)}
    assert "by kind of question" in (tmp_path / "run" / "eval" / "results.md").read_text()
    capsys.readouterr()
    assert main(["train", str(tmp_path / "run" / "recipe.yaml"), profile_block, f"output_dir={tmp_path / 'again'}"]) == 2
    assert "train.recall_steps: needs tasks with answers from a closed set" in capsys.readouterr().err


# -- a third-party task ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(
    not _installed("graftkit-test-task"), reason="CI runs: pip install --no-deps --no-build-isolation ./tests/plugins/graftkit-test-task"
)
def test_a_third_party_task_trains_evaluates_and_exports(tmp_path):
    from graftkit.evaluate import evaluate_run
    from graftkit.export import export_run, load_graft
    from graftkit.sessions import ask, memorize
    from graftkit.train import train

    assert graftkit.components("task")["passphrase"].__module__ == "graftkit_test_task"
    raw = {**TINY, "output_dir": str(tmp_path / "run"), "data": {"task": "passphrase", "train_samples": 16, "eval_samples": 4}}
    train(validate_recipe(raw), progress=False)
    result = evaluate_run(tmp_path / "run", n=4, rows=["graft", "question_only"], progress=False)
    assert result["cells"] == ["passphrase"] and result["tasks"][0].startswith("passphrase (")
    out = export_run(tmp_path / "run", tmp_path / "export")
    card = (out / "README.md").read_text()
    assert "`passphrase` (syllables=3" in card and "The passphrase is kalomi." in card
    graft = load_graft(out)
    try:
        state = memorize(graft, "The passphrase is kalomi.")
        assert isinstance(ask(graft, "What is the passphrase?", state, task="passphrase", max_new_tokens=4), str)
    finally:
        graft.injector.detach()


# -- sessions and the preservation row --------------------------------------------------------------------------------
@pytest.fixture
def graft(tmp_path):
    from graftkit.api import build_graft

    torch.manual_seed(0)
    g = build_graft(validate_recipe({**TINY, "data": {"task": "babilong"}, "output_dir": str(tmp_path / "g")}))
    yield g.eval()
    g.injector.detach()


def test_sessions_written_from_the_cache_equal_successive_memorize_calls(graft):
    from graftkit.protocol import HiddenCache
    from graftkit.sessions import memorize

    sessions = ("Ana lives in Porto. It rained.", "Ana's cat is called Miso.", "The code is 4471.")
    example = Example(uid="u", sessions=sessions, question="q?", target="a", bucket="b")
    hidden, mask = HiddenCache(graft, None).get([example])
    cached = graft.write_hidden(hidden, mask)
    state = None
    for text in sessions:
        state = memorize(graft, text, state)
    assert int(cached.tokens_written[0]) == int(state.tokens_written[0])
    for name in state.tensors:
        torch.testing.assert_close(cached[name], state[name], atol=1e-5, rtol=1e-4)


def test_preservation_is_exact_with_an_empty_memory_and_measures_a_full_one(graft):
    from graftkit.preservation import general_prompts, preservation

    prompts = general_prompts()
    assert len(prompts) >= 200 and len(set(prompts)) == len(prompts)
    assert any("capital of France" in p for p in prompts) and any(p.startswith("Continue this text:") for p in prompts)
    empty = preservation(graft, n=6, max_new_tokens=4, state=graft.init_state(1))
    assert empty["agreement"] == 1.0 and abs(empty["loss_change"]) < 1e-5
    closed = preservation(graft, n=6, max_new_tokens=4)  # a closed gate: the memory reaches nothing yet
    assert closed["n"] == 6 and len(closed["answers"]) == 6 and abs(closed["loss_change"]) < 1e-5
    with torch.no_grad():  # open the injector's gate: what the memory holds now changes the model's predictions
        for name, p in graft.injector.named_parameters():
            if "gate" in name:
                p.fill_(3.0)
    opened = preservation(graft, n=6, max_new_tokens=4)
    assert abs(opened["loss_change"]) > 1e-4


def test_ask_refuses_an_empty_question_and_no_new_tokens(graft):
    from graftkit.sessions import ask, reset

    with pytest.raises(GraftkitError, match="the question is empty"):
        ask(graft, "  ", reset(graft))
    with pytest.raises(GraftkitError, match="max_new_tokens: must be at least 1"):
        ask(graft, "Where?", reset(graft), max_new_tokens=0)


# -- BABILong in held-out words ---------------------------------------------------------------------------------------
def test_held_out_babilong_retells_test_stories_in_words_bAbI_never_uses():
    import re

    from graftkit.backbones.sources import byte_tokenizer
    from graftkit.tasks.babilong import BabilongConfig, BabilongTask
    from graftkit.tasks.held_out import MOVE, OBJECTS, PEOPLE, PLACES

    tok = byte_tokenizer()
    standard = BabilongTask(BabilongConfig(tasks=["qa1", "qa2"], eval_lengths=["1k"]))
    held = BabilongTask(BabilongConfig(tasks=["qa1", "qa2"], eval_lengths=["1k"], vocabulary="held_out"))
    babi = re.compile(r"\b(" + "|".join(PEOPLE + PLACES + OBJECTS) + r")\b")
    for bucket in ("qa1/1k", "qa2/1k"):
        before, after = (load_examples(t, "test", bucket, 20, tok) for t in (standard, held))
        for old, new in zip(before, after):
            assert new.uid != old.uid and new.context != old.context
            for text in (*new.info["facts"], new.question, new.target):
                assert not babi.search(text) and not MOVE.search(text), text
            assert len(new.info["labels"]) == 6 and new.target in new.info["labels"]
            assert not babi.search(" ".join(new.info["labels"]))
            for fact in new.info["facts"]:
                assert fact in new.context  # the retold facts, in the book text that was there
            assert held.score(new, new.target) and not held.score(new, old.target)
            assert held.labels(new) == new.info["labels"]
    # training stories keep bAbI's words
    assert [e.uid for e in load_examples(held, "train", "qa1/0k", 5, tok)] == [e.uid for e in load_examples(standard, "train", "qa1/0k", 5, tok)]


def test_varied_training_retells_a_share_of_training_stories_in_words_disjoint_from_the_held_out_ones():
    import re

    from graftkit.backbones.sources import byte_tokenizer
    from graftkit.tasks import held_out
    from graftkit.tasks.babilong import BabilongConfig, BabilongTask

    for ours, theirs in (
        (held_out.TRAIN_PLACES, held_out.HELD_OUT_PLACES + held_out.PLACES),
        (held_out.TRAIN_OBJECTS, held_out.HELD_OUT_OBJECTS + held_out.OBJECTS),
        (held_out.TRAIN_MOVES, held_out.HELD_OUT_MOVES),
        (held_out._names("train"), held_out._names("test")),
    ):
        assert not set(ours) & set(theirs)
    tok = byte_tokenizer()
    standard = BabilongTask(BabilongConfig(tasks=["qa1"], train_lengths=["0k"]))
    varied = BabilongTask(BabilongConfig(tasks=["qa1"], train_lengths=["0k"], train_vocabulary="varied", varied_share=0.5))
    before, after = (load_examples(t, "train", "qa1/0k", 60, tok) for t in (standard, varied))
    test_words = re.compile(r"\b(" + "|".join(held_out.HELD_OUT_PLACES + held_out.HELD_OUT_OBJECTS) + r")\b")
    retold = [(old, new) for old, new in zip(before, after) if new.uid != old.uid]
    assert 15 <= len(retold) <= 45  # about half
    for _, new in retold:
        assert new.target in held_out.TRAIN_PLACES and new.target in new.info["labels"]
        assert not test_words.search(new.context) and not held_out.MOVE.search(" ".join(new.info["facts"]))
    assert all(new.uid == old.uid for old, new in zip(before, after) if new.context == old.context)
    assert [e.uid for e in load_examples(varied, "test", "qa1/1k", 3, tok)] == [e.uid for e in load_examples(standard, "test", "qa1/1k", 3, tok)]
