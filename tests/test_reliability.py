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
import torch

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
CASES = [
    pytest.param(path, damage, command, outcome, id=f"{Path(path).name}-{damage.__name__}")
    for path, damages, command, outcome in CORPUS
    for damage in damages
]


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
    argv = [a.format(run=folder / "run", export=folder / "export", state=folder / "alice.safetensors", out=out, folder=folder) for a in command]
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
    ignored = {
        "metrics.jsonl",
        "loss.png",
        "accuracy.png",
        ".graftkit-run",
        "README.md",
        "chart.png",
        "results.json",
        "results.md",
        "predictions.jsonl",
    }
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
    argv = [
        a.format(recipe=folder / "run" / "recipe.yaml", run=folder / "run", export=folder / "export", blocked=blocked, notes=pristine / "notes.txt")
        for a in command
    ]
    before = contents(folder)
    capsys.readouterr()
    assert main(argv) != 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "a-file" in captured.err, captured.err
    assert "training:" not in captured.err + captured.out  # refused before any step
    assert contents(folder) == before and (tmp_path / "a-file").read_text() == "mine"


# -- a kill at every phase of a checkpoint write ---------------------------------------------------------------------
def _dies_at(name_start: str, nth: int):
    """A stand-in that kills the process (KeyboardInterrupt, no cleanup of its own) the `nth` time its real
    function is called on a path whose name starts with `name_start`."""
    seen = {"n": 0}

    def wrap(real):
        def call(first, *args, **kwargs):
            if Path(first).name.startswith(name_start):
                seen["n"] += 1
                if seen["n"] == nth:
                    raise KeyboardInterrupt
            return real(first, *args, **kwargs)

        return call

    return wrap


def _names(root: Path, pointer: str) -> str:
    return json.loads((root / pointer).read_text())["path"]


PHASES = {  # phase -> (function graftkit.checkpoint calls, on which path, which call dies, what the kill left)
    "step folder written, not yet renamed": ("os.replace", ".step-", 2, lambda root: (root / ".step-000004.tmp").is_dir()),
    "step folder renamed, latest.json not yet updated": (
        "_point",
        "latest.json",
        2,
        lambda root: (root / "step-000004").is_dir() and _names(root, "latest.json") == "step-000002",
    ),
    "best copy written, not yet renamed": ("os.replace", ".best-", 2, lambda root: (root / ".best-000004.tmp").is_dir()),
    "best copy renamed, best.json not yet updated": (
        "_point",
        "best.json",
        2,
        lambda root: (root / "best-000004").is_dir() and _names(root, "best.json") == "best-000002",
    ),
    "best.json updated, the old copy not yet removed": (
        "shutil.rmtree",
        "best-",
        3,
        lambda root: (root / "best-000002").is_dir() and _names(root, "best.json") == "best-000004",
    ),
    "old steps being pruned": (
        "shutil.rmtree",
        "step-",
        1,
        lambda root: (root / "step-000002").is_dir() and _names(root, "latest.json") == "step-000006",
    ),
}


@pytest.mark.parametrize("phase", PHASES)
def test_a_kill_at_any_phase_of_a_checkpoint_write_loses_nothing(pristine, tmp_path, monkeypatch, phase):
    """Killed while a checkpoint is written (an earlier one complete, and its best copy): the best checkpoint
    stays loadable, and --resume ends bit-exact with the uninterrupted run."""
    from safetensors.torch import load_file

    import graftkit.checkpoint as checkpoint
    import graftkit.train

    monkeypatch.setenv("GRAFTKIT_CACHE", str(pristine / "cache"))
    rising = iter(range(1, 100))  # every evaluation is a new best, so each checkpoint replaces the best copy
    monkeypatch.setattr(graftkit.train, "evaluate_buckets", lambda graft, tasks, buckets, *rest: {b: next(rising) / 100 for b in buckets})
    recipe = dict(RECIPE, train={**RECIPE["train"], "steps": 6, "eval_every": 2})
    paths = {}
    for name in ("straight", "killed"):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(json.dumps({**recipe, "output_dir": str(tmp_path / name)}))
    assert main(["train", str(paths["straight"])]) == 0
    target, start, nth, left = PHASES[phase]
    owner, attribute = (
        (checkpoint.os, "replace")
        if target == "os.replace"
        else ((checkpoint.shutil, "rmtree") if target == "shutil.rmtree" else (checkpoint, target))
    )
    with monkeypatch.context() as patch:
        patch.setattr(owner, attribute, _dies_at(start, nth)(getattr(owner, attribute)))
        assert main(["train", str(paths["killed"])]) == 130  # interrupted
    run = tmp_path / "killed"
    assert left(run / "checkpoints")  # killed where the phase says
    best = checkpoint.resolve_checkpoint(run, "best")
    assert checkpoint.complete(best)
    assert main(["export", str(run), "--out", str(tmp_path / "export-after-kill")]) == 0
    assert main(["train", str(paths["killed"]), "--resume"]) == 0
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "step-000006" / "graft.safetensors"))
    b = load_file(str(run / "checkpoints" / "step-000006" / "graft.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert checkpoint.complete(checkpoint.resolve_checkpoint(run, "best"))
    assert [p.name for p in (run / "checkpoints").glob("best-*") if p.is_dir()] == [checkpoint.resolve_checkpoint(run, "best").name]


BAD_ARGUMENTS = [
    (["eval", "{run}", "--n", "0"], "--n: must be a positive number of examples"),
    (["eval", "{run}", "--checkpoint", "banana"], "--checkpoint: expected best, last or a step number"),
    (["ask", "{export}", "--state", "{state}", "Where is Mary?", "--max-new-tokens", "0"], "must be at least 1"),
    (["ask", "{export}", "--state", "{state}", "x" * 100_000 + "?"], "a question may have at most 8000"),
]


@pytest.mark.parametrize("command, message", BAD_ARGUMENTS, ids=lambda v: v[0] if isinstance(v, list) else None)
def test_a_bad_argument_is_one_message_and_changes_nothing(pristine, tmp_path, monkeypatch, capsys, command, message):
    monkeypatch.setenv("GRAFTKIT_CACHE", str(pristine / "cache"))
    folder = case_folder(pristine, tmp_path)
    before = contents(folder)
    argv = [a.format(run=folder / "run", export=folder / "export", state=folder / "alice.safetensors") for a in command]
    capsys.readouterr()
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert contents(folder) == before
