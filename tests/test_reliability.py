"""Reliability suite: every file graftkit writes or reads, damaged in every way we know, is met with one message
naming it (or, where an intact copy exists, a warning and that copy), never a traceback, and nothing the user
has is overwritten. The corpus is data: a new file type or a new kind of damage is one line.

Each case runs the command a user would run on a copy of one small trained run (tiny random backbone), its
export and a memory state.
"""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import pytest

from graftkit.cli import main

ROOT = Path(__file__).resolve().parents[1]

RECIPE = {
    "schema_version": 1,
    "backbone": {"kind": "llama", "source": "tiny-random"},
    "memory": {"kind": "linear", "heads": 2, "dim_head": 16, "write_layer": 1},
    "injector": {"kind": "mid_layer", "layer": 1, "num_tokens": 2},
    "data": {"task": "babilong", "tasks": ["qa1"], "train_lengths": ["0k"], "eval_lengths": ["0k"], "train_samples": 8, "eval_samples": 2},
    "train": {"steps": 2, "batch_size": 2, "eval_every": 2, "log_every": 1, "warmup_steps": 1},
}


# -- damages ---------------------------------------------------------------------------------------------------
def truncated(data: bytes) -> bytes:
    at = len(data) // 2
    while at > 1 and b"\n" in data[at - 1 : at + 1]:  # mid-line: a text cut at a line end is just a shorter file
        at -= 1
    return data[:at]


def empty(data: bytes) -> bytes:
    return b""


def flipped_header(data: bytes) -> bytes:
    return bytes([data[0] ^ 0xFF]) + data[1:]


def flipped_data(data: bytes) -> bytes:
    at = len(data) - 5
    return data[:at] + bytes([data[at] ^ 0x55]) + data[at + 1 :]


def wrong_json_type(data: bytes) -> bytes:
    return b"[1, 2, 3]"


def pickle_renamed(data: bytes) -> bytes:
    return pickle.dumps({"hidden": [1.0, 2.0]})


def not_utf8(data: bytes) -> bytes:
    return b"\xff\xfe" + data


BINARY = (truncated, empty, flipped_header, flipped_data, pickle_renamed)
TEXT = (truncated, empty, wrong_json_type, pickle_renamed, not_utf8)

# -- the corpus: (file, damages, command, outcome) ---------------------------------------------------------------
# file: a path relative to the case folder, which holds run/, export/ and alice.safetensors.
# command: argv for `graftkit`, with {run}, {export}, {state}, {out} filled in.
# outcome: "refused" (exit != 0, the file named, nothing written) or "recovered" (exit 0, a warning naming the file).
EVAL = ["eval", "{run}", "--n", "1", "--rows", "graft", "--out", "{out}"]
EXPORT_STEP = ["export", "{run}", "--checkpoint", "2", "--out", "{out}"]
RESUME = ["train", "{run}/recipe.yaml", "train.steps=3", "--resume"]
ASK = ["ask", "{export}", "--state", "{state}", "Where is Mary?", "--max-new-tokens", "2"]
TRAIN_ON_OWN_DATA = ["train", "{folder}/own.yaml"]
CORPUS = [
    ("run/recipe.yaml", TEXT, EVAL, "refused"),
    ("run/checkpoints/step-000002/graft.safetensors", BINARY, EXPORT_STEP, "refused"),
    ("run/checkpoints/step-000002/trainer.json", TEXT, EXPORT_STEP, "refused"),
    ("run/checkpoints/step-000002/optimizer.safetensors", BINARY, RESUME, "refused"),
    ("run/checkpoints/step-000002/rng.safetensors", BINARY, RESUME, "refused"),
    ("run/checkpoints/latest.json", TEXT, EXPORT_STEP[:2] + ["--checkpoint", "last", "--out", "{out}"], "recovered"),
    ("run/checkpoints/best.json", TEXT, EVAL, "recovered"),
    ("export/graft_model.safetensors", BINARY, ASK, "refused"),
    ("export/graft_config.json", TEXT, ASK, "refused"),
    ("alice.safetensors", BINARY, ASK, "refused"),
    ("data/my_episodes.jsonl", TEXT, TRAIN_ON_OWN_DATA, "refused"),
]
CASES = [pytest.param(path, damage, command, outcome, id=f"{Path(path).name}-{damage.__name__}")
         for path, damages, command, outcome in CORPUS for damage in damages]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A trained tiny run, its export and a memory state, made once; each case damages a copy."""
    import yaml

    root = tmp_path_factory.mktemp("pristine")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRAFTKIT_CACHE", str(root / "cache"))
        recipe = root / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({**RECIPE, "output_dir": str(root / "run")}))
        assert main(["train", str(recipe)]) == 0
        assert main(["export", str(root / "run"), "--out", str(root / "export")]) == 0
        (root / "notes.txt").write_text("Mary went to the kitchen.")
        assert main(["memorize", str(root / "export"), "--state", str(root / "alice.safetensors"), str(root / "notes.txt")]) == 0
        yield root


def case_folder(pristine: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "case"
    for name in ("run", "export"):
        shutil.copytree(pristine / name, folder / name)
    shutil.copy2(pristine / "alice.safetensors", folder / "alice.safetensors")
    recipe = folder / "run" / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace(str(pristine / "run"), str(folder / "run")))  # the copy is its own run
    (folder / "data").mkdir()
    shutil.copy2(ROOT / "examples" / "data" / "my_episodes.jsonl", folder / "data" / "my_episodes.jsonl")
    own = {**RECIPE, "data": {"task": "jsonl", "train": str(folder / "data" / "my_episodes.jsonl")}, "output_dir": str(folder / "own-run")}
    (folder / "own.yaml").write_text(json.dumps(own))  # JSON is YAML
    return folder


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("path, damage, command, outcome", CASES)
def test_a_damaged_file_is_named_and_nothing_is_lost(pristine, tmp_path, monkeypatch, capsys, path, damage, command, outcome):
    monkeypatch.setenv("GRAFTKIT_CACHE", str(pristine / "cache"))
    folder = case_folder(pristine, tmp_path)
    target = folder / path
    target.write_bytes(damage(target.read_bytes()))
    before = contents(folder)
    out = tmp_path / "out"
    argv = [a.format(run=folder / "run", export=folder / "export", state=folder / "alice.safetensors", out=out, folder=folder)
            for a in command]
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(argv)
    err = capsys.readouterr().err + "\n".join(str(w.message) for w in caught)
    assert "Traceback" not in err
    if outcome == "refused":
        assert code != 0, err
        assert target.name in err, err
        assert contents(folder) == before  # nothing overwritten, nothing added
        assert not out.exists() or not any(out.iterdir())
    else:
        assert code == 0, err
        assert target.name in err, err
        assert target.read_bytes() == before[path]  # the damaged pointer is left for the user to see


def test_the_corpus_covers_every_file_a_run_an_export_and_a_state_hold(pristine):
    """A new file type in a run, an export or a state folder must get a line in the corpus."""
    covered = {Path(path).name for path, *_ in CORPUS}
    written = {p.name for name in ("run", "export") for p in (pristine / name).rglob("*") if p.is_file()}
    ignored = {"metrics.jsonl", "loss.png", "accuracy.png", ".graftkit-run", "README.md", "chart.png", "results.json",
               "results.md", "predictions.jsonl"}
    assert written - covered - ignored == set()
    assert (pristine / "alice.safetensors").name in covered
    json.loads((pristine / "run" / "checkpoints" / "best.json").read_text())  # the pristine run is whole


# -- paths that cannot be written: (argv with {blocked} a path under a plain file) ------------------------------------
IMPOSSIBLE = [
    ["train", "{recipe}", "output_dir={blocked}"],
    ["eval", "{run}", "--n", "1", "--rows", "graft", "--out", "{blocked}"],
    ["export", "{run}", "--out", "{blocked}"],
    ["memorize", "{export}", "--state", "{blocked}/alice.safetensors", "{notes}"],
]


@pytest.mark.parametrize("command", IMPOSSIBLE, ids=lambda argv: argv[0])
def test_a_path_that_cannot_be_written_is_a_message_before_any_work(pristine, tmp_path, monkeypatch, capsys, command):
    monkeypatch.setenv("GRAFTKIT_CACHE", str(pristine / "cache"))
    folder = case_folder(pristine, tmp_path)
    (tmp_path / "a-file").write_text("mine")
    blocked = tmp_path / "a-file" / "sub"
    argv = [a.format(recipe=folder / "run" / "recipe.yaml", run=folder / "run", export=folder / "export", blocked=blocked,
                     notes=pristine / "notes.txt") for a in command]
    before = contents(folder)
    capsys.readouterr()
    assert main(argv) != 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "a-file" in captured.err, captured.err
    assert "training:" not in captured.err + captured.out  # refused before any step
    assert contents(folder) == before and (tmp_path / "a-file").read_text() == "mine"
