"""Per-user memories: save / load across processes, refusal of another graft's state, fork, reset, and
the `memorize`, `ask` and `chat` commands driven in-process.

The graft is a fresh tiny one (tiny-random llama, titans, soft prompt with open gates, so answers depend
on the memory), exported with `export_graft`: no training run needed here (tests/test_export.py has one).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from graftkit.tasks.babilong import BabilongConfig, BabilongTask

from graftkit.api import graft_from_configs
from graftkit.cli import main
from graftkit.errors import GraftkitError, StateError
from graftkit.export import export_graft
from graftkit.sessions import ask, chat_turn, fork, load_state, memorize, reset, save_state

STORY = "Mary went to the kitchen. John moved to the garden."
QUESTION = "Where is Mary?"
PROMPT = BabilongTask(BabilongConfig(task="babilong", tasks=["qa1"])).prompts()["qa1"]
MEMORY = {"heads": 2, "dim_head": 16, "expansion": 2, "chunk_size": 16, "write_layer": 1}
INJECTOR = {"num_tokens": 4, "heads": 2, "gate_init": 1.0}


def make_graft(backbone, seed: int):
    torch.manual_seed(seed)
    graft = graft_from_configs(backbone, "titans", MEMORY, "layer0_soft_prompt", INJECTOR)
    return graft.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(graft, export dir, cache dir): the graft lives on its own tiny backbone for the whole module."""
    import graftkit

    root = tmp_path_factory.mktemp("sessions")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRAFTKIT_CACHE", str(root / "cache"))
        backbone = graftkit.load_backbone({"kind": "llama", "source": "tiny-random"})
        graft = make_graft(backbone, seed=0)
        directory = export_graft(graft, root / "export", tasks=[BabilongConfig(task="babilong", tasks=["qa1"])])
        yield graft, directory, root / "cache"
        graft.injector.detach()


@pytest.fixture
def graft(setup):
    return setup[0]


@pytest.fixture
def export_dir(setup, monkeypatch):
    monkeypatch.setenv("GRAFTKIT_CACHE", str(setup[2]))
    return setup[1]


def expected_answer(graft, *lines: str, task=None) -> str:
    state = None
    for line in lines:
        state = memorize(graft, line, state)
    return ask(graft, QUESTION, state if state is not None else reset(graft), task=task, max_new_tokens=8)


# -- library ------------------------------------------------------------------------------------------------------
SUBPROCESS = textwrap.dedent(
    """
    import json, torch
    import graftkit
    from graftkit.sessions import load_state
    graft = graftkit.load_graft({directory!r})
    state = load_state(graft, {path!r})
    ids = torch.tensor([graft.backbone.chat_ids({question!r})])
    with torch.no_grad():
        logits = graft(ids, state).logits[0, -1].tolist()
    print(json.dumps({{"answer": graft.answer({question!r}, state)[0], "logits": logits,
                      "tokens": int(state.tokens_written[0])}}))
    """
)


def test_save_then_load_in_a_fresh_process(graft, export_dir, setup, tmp_path):
    state = memorize(graft, STORY)
    path = save_state(graft, state, tmp_path / "alice.safetensors")
    script = SUBPROCESS.format(directory=str(export_dir), path=str(path), question=QUESTION)
    got = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "GRAFTKIT_CACHE": str(setup[2]), "OMP_NUM_THREADS": "1"},
    )
    assert got.returncode == 0, got.stderr
    got = json.loads(got.stdout.strip().splitlines()[-1])
    ids = torch.tensor([graft.backbone.chat_ids(QUESTION)])
    with torch.no_grad():
        want = graft(ids, state).logits[0, -1]
        empty = graft(ids, reset(graft)).logits[0, -1]
    assert got["answer"] == graft.answer(QUESTION, state)[0]
    assert got["tokens"] == int(state.tokens_written[0]) > 0
    torch.testing.assert_close(torch.tensor(got["logits"]), want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(want, empty, atol=1e-4)  # the answer really comes from the memory


def test_state_of_another_graft_is_refused(graft, tmp_path):
    path = save_state(graft, memorize(graft, STORY), tmp_path / "alice.safetensors")
    other = make_graft(graft.backbone, seed=1)
    try:
        with pytest.raises(StateError, match="saved by another graft"):
            load_state(other, path)
        with pytest.raises(StateError, match="refusing to save a state of another graft"):
            save_state(other, load_state(graft, path), tmp_path / "bob.safetensors")
    finally:
        other.injector.detach()
    assert load_state(graft, path).metadata["graft"] == graft.identity()["graft"]


def test_a_memory_another_graft_wrote_is_refused_before_it_is_saved_or_used(graft, tmp_path):
    """A state in memory (never saved) carries the graft that wrote it: another graft of the same shapes
    neither saves it as its own nor writes into it nor answers from it."""
    other = make_graft(graft.backbone, seed=1)
    try:
        theirs = memorize(other, STORY)
        with pytest.raises(StateError, match="refusing to save a state of another graft"):
            save_state(graft, theirs, tmp_path / "alice.safetensors")
        with pytest.raises(StateError, match="written by another graft"):
            memorize(graft, STORY, theirs)
        with pytest.raises(StateError, match="written by another graft"):
            ask(graft, QUESTION, theirs)
    finally:
        other.injector.detach()
    assert not (tmp_path / "alice.safetensors").exists()


def test_a_damaged_or_reshaped_state_file_is_refused_by_name(graft, tmp_path):
    from safetensors.torch import load_file, safe_open, save_file

    path = save_state(graft, memorize(graft, STORY), tmp_path / "alice.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    name = next(k for k in tensors if k != "tokens_written" and tensors[k].is_floating_point())
    flipped = dict(tensors, **{name: tensors[name].clone().index_put_((torch.tensor(0),) * tensors[name].dim(), torch.tensor(7.0))})
    save_file(flipped, str(tmp_path / "flipped.safetensors"), metadata=metadata)
    with pytest.raises(StateError, match="flipped.safetensors: damaged"):
        load_state(graft, tmp_path / "flipped.safetensors")
    reshaped = dict(tensors, **{name: tensors[name][..., :1].contiguous()})
    save_file(reshaped, str(tmp_path / "reshaped.safetensors"), metadata={k: v for k, v in metadata.items() if k != "sha256"})
    with pytest.raises(StateError, match=f"reshaped.safetensors: {name} is"):
        load_state(graft, tmp_path / "reshaped.safetensors")


@pytest.mark.parametrize("text", [123, None, ["Mary went to the kitchen.", None]])
def test_memorize_refuses_what_is_not_text(graft, text):
    with pytest.raises(GraftkitError, match="must be a string"):
        memorize(graft, text) if not isinstance(text, list) else graft.memorize(text)


def test_ask_builds_turn_two_as_evaluation_does(graft):
    """`ask(..., task)` (what `graftkit ask` and `chat` call) sees the question as training and `graftkit eval` do."""
    from types import SimpleNamespace

    from graftkit.protocol import turn2_batch

    state = memorize(graft, STORY)
    batch = turn2_batch(graft.backbone, [SimpleNamespace(prompt=PROMPT, question=QUESTION)], with_answers=False)
    new = graft.generate(batch["input_ids"], state, batch["attention_mask"], max_new_tokens=8, prefix_ids=batch["prefix_ids"])
    want = graft.backbone.tokenizer.batch_decode(new, skip_special_tokens=True)[0].strip()
    assert ask(graft, QUESTION, state, task=PROMPT, max_new_tokens=8) == want
    plain = graft.backbone.chat_ids(QUESTION)  # without a task the question goes in as it is
    head, tail = graft.backbone.chat_parts("", QUESTION)
    assert head + tail == plain


def test_chat_turn(graft):
    state, reply = chat_turn(graft, reset(graft), "  Mary went to the kitchen.  ")
    assert reply is None and int(state.tokens_written[0]) == len(graft.backbone.text_ids("Mary went to the kitchen."))
    same, reply = chat_turn(graft, state, QUESTION, task=PROMPT, max_new_tokens=8)
    assert same is state and reply == ask(graft, QUESTION, state, task=PROMPT, max_new_tokens=8)
    assert chat_turn(graft, state, "   ") == (state, None)


def test_fork_is_independent(graft):
    state = memorize(graft, STORY)
    before = {k: v.clone() for k, v in state.tensors.items()}
    forked = fork(state)
    grown = memorize(graft, "Mary travelled to the office.", forked)
    next(t for t in forked.tensors.values() if t.is_floating_point()).add_(1.0)  # in place, on the fork only
    for name, tensor in state.tensors.items():
        assert torch.equal(tensor, before[name]), name
    assert int(grown.tokens_written[0]) > int(state.tokens_written[0])


def test_reset_empties(graft):
    state = reset(graft)
    assert state.batch_size == 1 and bool(state.is_empty.all()) and int(state.tokens_written[0]) == 0
    assert graft.answer(QUESTION, state) == graft.answer(QUESTION, graft.init_state(1))


def test_memorize_appends_like_running_text(graft):
    one = memorize(graft, "Mary went to the kitchen.")
    two = memorize(graft, "John moved to the garden.", one)
    joined = len(graft.backbone.text_ids("Mary went to the kitchen.")) + len(graft.backbone.text_ids(" John moved to the garden."))
    assert int(two.tokens_written[0]) == joined
    assert not any(t.requires_grad for t in two.tensors.values())
    with pytest.raises(Exception, match="nothing to memorize"):
        memorize(graft, "   ", one)


# -- command line ------------------------------------------------------------------------------------------------
def test_cli_memorize_and_ask(graft, export_dir, tmp_path, monkeypatch, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text(STORY)
    state = tmp_path / "alice.safetensors"
    assert main(["memorize", str(export_dir), "--state", str(state), str(notes)]) == 0
    assert f"{state}: holds {len(graft.backbone.text_ids(STORY))} tokens" in capsys.readouterr().out
    assert main(["ask", str(export_dir), "--state", str(state), QUESTION, "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == expected_answer(graft, STORY)

    monkeypatch.setattr(sys, "stdin", io.StringIO("Mary travelled to the office."))  # no files: stdin, appended
    assert main(["memorize", str(export_dir), "--state", str(state)]) == 0
    capsys.readouterr()
    assert main(["ask", str(export_dir), "--state", str(state), "Where", "is", "Mary?", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == expected_answer(graft, STORY, "Mary travelled to the office.")
    # --task puts the question into a prompt the export recorded
    assert main(["ask", str(export_dir), "--state", str(state), QUESTION, "--task", "qa1", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == expected_answer(graft, STORY, "Mary travelled to the office.", task=PROMPT)
    assert main(["ask", str(export_dir), "--state", str(state), QUESTION, "--task", "qa9"]) == 1
    assert "--task qa9: not a prompt this graft was trained with (it has: qa1)" in capsys.readouterr().err


def test_cli_user_mistakes_are_messages(export_dir, tmp_path, capsys):
    garbage, notes = tmp_path / "garbage.safetensors", tmp_path / "notes.txt"
    garbage.write_text("not a state")
    notes.write_text(STORY)
    cases = [
        (["ask", str(export_dir), "--state", str(tmp_path / "none.safetensors"), QUESTION], "no such memory state file"),
        (["ask", str(tmp_path / "nowhere"), "--state", str(garbage), QUESTION], "nowhere: no such export directory"),
        (["memorize", str(tmp_path / "nowhere"), "--state", str(tmp_path / "s"), str(notes)], "no such export directory"),
        (["memorize", str(export_dir), "--state", str(tmp_path / "s"), str(tmp_path / "missing.txt")], "missing.txt: cannot read"),
        (["ask", str(export_dir), "--state", str(garbage), QUESTION], "not a readable memory state file"),
        (
            ["memorize", str(export_dir), "--state", str(tmp_path / "s"), str(notes), str(garbage.with_name("empty.txt"))],
            "empty.txt: nothing to memorize",
        ),
    ]
    garbage.with_name("empty.txt").write_text("  \n")
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "s").exists()


def test_cli_paths_that_cannot_be_written_and_text_that_is_not_utf8_are_messages(export_dir, tmp_path, capsys):
    notes, blocker = tmp_path / "notes.txt", tmp_path / "a-file"
    notes.write_text(STORY)
    blocker.write_text("")
    assert main(["memorize", str(export_dir), "--state", str(blocker / "alice.safetensors"), str(notes)]) == 1
    err = capsys.readouterr().err
    assert str(blocker) in err and "Traceback" not in err, err
    state = tmp_path / "alice.safetensors"
    assert main(["memorize", str(export_dir), "--state", str(state), str(notes)]) == 0
    capsys.readouterr()
    assert main(["ask", str(export_dir), "--state", str(state), "Where is \udcff?"]) == 1  # argv bytes that are not UTF-8
    assert "not valid UTF-8" in capsys.readouterr().err


def test_cli_chat(graft, export_dir, tmp_path, monkeypatch, capsys):
    state = tmp_path / "chat.safetensors"
    fact = "Mary went to the kitchen."
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{fact}\n{QUESTION}\n/save\n/quit\nignored line\n"))
    assert main(["chat", str(export_dir), "--state", str(state), "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == expected_answer(graft, fact) and out[1] == f"saved {state}"
    assert int(load_state(graft, state).tokens_written[0]) == len(graft.backbone.text_ids(fact))

    # the next session picks the memory up; EOF ends it and saves
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n/reset\n{QUESTION}\n"))
    assert main(["chat", str(export_dir), "--state", str(state), "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [expected_answer(graft, fact), "memory cleared", expected_answer(graft)]
    assert bool(load_state(graft, state).is_empty.all())


def test_cli_chat_reports_a_bad_line_and_keeps_the_session(graft, export_dir, tmp_path, monkeypatch, capsys):
    state = tmp_path / "chat.safetensors"
    fact = "Mary went to the kitchen."
    lines = f"{fact}\n".encode() + b"caf\xe9 au lait\n" + ("Where? " * 2000 + "?\n").encode() + f"{QUESTION}\n".encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(lines), encoding="utf-8"))
    assert main(["chat", str(export_dir), "--state", str(state), "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert "line 2: not valid UTF-8 text; skipped" in captured.err
    assert "line 3: the question is 14001 characters long; a question may have at most 8000" in captured.err
    assert "Traceback" not in captured.err
    assert captured.out.splitlines() == [expected_answer(graft, fact)]
    assert int(load_state(graft, state).tokens_written[0]) == len(graft.backbone.text_ids(fact))
    assert main(["chat", str(export_dir), "--state", str(state), "--max-new-tokens", "0"]) == 1
    assert "--max-new-tokens: must be at least 1" in capsys.readouterr().err
