"""Exported grafts: exactly three files, graft tensors only, the same answers in a fresh process, and a
clear refusal (never a silently different model) for each way an export can fail to fit.

One tiny real training run (tiny-random llama, titans, 3 steps) feeds every test of this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import graftkit
from graftkit.api import build_graft
from graftkit.checkpoint import load_graft_tensors, resolve_checkpoint
from graftkit.cli import main
from graftkit.errors import ExportError
from graftkit.export import CONFIG_FILE, EXPORT_FILES, README_FILE, TENSORS_FILE, ExportWarning, export_run, load_graft
from graftkit.recipe import load_recipe, validate_recipe

CONTEXT = "Mary went to the kitchen. John moved to the garden. Mary travelled to the office."
QUESTIONS = ["Where is Mary?", "Where is John?"]


def tiny_recipe(output_dir: Path) -> dict:
    return {
        "schema_version": 1,
        "backbone": {"kind": "llama", "source": "tiny-random"},
        "memory": {"kind": "titans", "heads": 2, "dim_head": 16, "expansion": 2, "chunk_size": 16, "write_layer": 1},
        "injector": {"kind": "layer0_soft_prompt", "num_tokens": 4, "heads": 2},
        "data": {"task": "babilong", "tasks": ["qa1"], "train_lengths": ["0k"], "eval_lengths": ["0k"], "train_samples": 8, "eval_samples": 4},
        # a large learning rate so that three steps open the gates: answers then depend on the graft tensors
        "train": {"steps": 3, "eval_every": 3, "batch_size": 2, "lr": 0.05, "warmup_steps": 0},
        "output_dir": str(output_dir),
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run directory, the GRAFTKIT_CACHE it used) of a real 3-step training run."""
    from graftkit.train import train

    root = tmp_path_factory.mktemp("export_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRAFTKIT_CACHE", str(root / "cache"))
        train(validate_recipe(tiny_recipe(root / "run")), progress=False)
        yield root / "run"


@pytest.fixture(scope="module")
def exported(run, tiny_backbone, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "graft"
    return export_run(run, out, backbone=tiny_backbone("llama"))


@contextlib.contextmanager
def loaded(directory, backbone=None):
    """load_graft, detaching the injector afterwards (tests share backbones)."""
    graft = load_graft(directory, backbone=backbone)
    try:
        yield graft
    finally:
        graft.injector.detach()


def no_hooks(backbone) -> bool:
    """No injector hook is left on the backbone (transformers may keep hooks of its own)."""
    from graftkit.injector import Injector

    hooks = [h for m in backbone.model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    return not any(isinstance(getattr(h, "__self__", None), Injector) for h in hooks)


@torch.no_grad()
def outputs(graft) -> dict:
    """Answers and question logits of `graft` after memorizing CONTEXT (what the subprocess prints too)."""
    state = graft.memorize(CONTEXT)
    ids = torch.tensor([graft.backbone.chat_ids(QUESTIONS[0])])
    return {
        "answers": graft.answer(QUESTIONS, graft.memorize([CONTEXT] * len(QUESTIONS))),
        "logits": graft(ids, state).logits[0, -1].tolist(),
        "empty_logits": graft(ids, graft.init_state(1)).logits[0, -1].tolist(),
    }


def edit_config(directory: Path, change) -> None:
    config = json.loads((directory / CONFIG_FILE).read_text())
    change(config)
    (directory / CONFIG_FILE).write_text(json.dumps(config))


@pytest.fixture
def copy(exported, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(exported, target)
    return target


# -- the files ------------------------------------------------------------------------------------------
def test_exact_file_set(exported):
    assert sorted(p.name for p in exported.iterdir()) == sorted(EXPORT_FILES)
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left
    config = json.loads((exported / CONFIG_FILE).read_text())
    assert config["format_version"] == 1 and config["graftkit_version"]
    assert config["plugins"]["memory"] == {
        "name": "titans",
        "plugin": "graftkit.memories",
        "distribution": "graftkit",
        "version": config["graftkit_version"],
    }
    assert config["backbone"]["config"]["source"] == "tiny-random"
    assert {"source", "dtype", "quantize", "revision"} <= set(config["backbone"]["config"])
    assert config["backbone_manifest"]["hidden_size"] == 64 and config["backbone_manifest"]["tokenizer"]
    assert config["memory"]["config"]["heads"] == 2 and config["injector"]["config"]["num_tokens"] == 4
    assert [t["tasks"] for t in config["tasks"]] == [["qa1"]] and config["checkpoint"]["step"] == 3
    assert list(config["prompts"]) == ["qa1"] and config["prompts"]["qa1"]["template"] == "Question: {question}"
    with safe_open(str(exported / TENSORS_FILE), framework="pt") as f:
        assert f.metadata()["memory"] == "titans"


def test_model_card(exported, run):
    card = (exported / README_FILE).read_text()
    assert "graftkit.load_graft" in card
    assert (run / "recipe.yaml").read_text().strip() in card
    assert "Not evaluated" in card


def test_model_card_with_evaluation(run, tiny_backbone, tmp_path):
    evaluated = tmp_path / "run"
    shutil.copytree(run, evaluated)
    (evaluated / "eval").mkdir(exist_ok=True)
    (evaluated / "eval" / "results.md").write_text("| n = 4 per cell | qa1/0k |\n|---|---|\n| graft | 25.0% |\n")
    out = export_run(evaluated, tmp_path / "out", checkpoint="last", backbone=tiny_backbone("llama"))
    card = (out / README_FILE).read_text()
    assert "| graft | 25.0% |" in card and "Not evaluated" not in card
    assert no_hooks(tiny_backbone("llama"))


def test_no_backbone_tensor_in_export(exported, tiny_backbone):
    tensors = load_file(str(exported / TENSORS_FILE))
    backbone_state = tiny_backbone("llama").model.state_dict()
    assert tensors and not set(tensors) & set(backbone_state)
    assert all(name.startswith(("memory.", "injector.", "write_norm.")) for name in tensors)
    for name, tensor in tensors.items():
        for other, value in backbone_state.items():
            assert not (tensor.shape == value.shape and torch.equal(tensor, value.cpu())), f"{name} equals backbone {other}"


def test_no_pickle(exported):
    for path in exported.iterdir():
        head = path.read_bytes()[:2]
        assert head != b"PK" and head[:1] != b"\x80", f"{path.name} looks like a zip/pickle file"


# -- loading ------------------------------------------------------------------------------------------------
SUBPROCESS = textwrap.dedent(
    """
    import json, sys
    import graftkit
    sys.path.insert(0, {tests!r})
    from test_export import outputs
    graft = graftkit.load_graft({directory!r})
    print(json.dumps(outputs(graft)))
    """
)


def test_fresh_process_gives_the_same_answers(exported, run, tiny_backbone):
    script = SUBPROCESS.format(tests=str(Path(__file__).parent), directory=str(exported))
    env = {**os.environ, "GRAFTKIT_CACHE": str(run.parent / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # meanwhile: the original graft, built from the run directory as `graftkit eval` does
    backbone = tiny_backbone("llama")
    original = build_graft(load_recipe(run / "recipe.yaml"), backbone=backbone)
    try:
        load_graft_tensors(original, resolve_checkpoint(run, "best"))
        original.eval()
        want = outputs(original)
    finally:
        original.injector.detach()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    got = json.loads(out.strip().splitlines()[-1])
    assert got["answers"] == want["answers"]
    torch.testing.assert_close(torch.tensor(got["logits"]), torch.tensor(want["logits"]), rtol=1e-4, atol=1e-5)
    # the memory matters, so equal logits above mean equal graft tensors, not just an equal backbone
    assert not torch.allclose(torch.tensor(want["logits"]), torch.tensor(want["empty_logits"]), atol=1e-4)


def test_load_onto_a_passed_backbone(exported, tiny_backbone):
    backbone = tiny_backbone("llama")
    with loaded(exported, backbone) as graft:
        assert graft.backbone is backbone
        assert graft.export_config["tasks"][0]["task"] == "babilong"
        assert not graft.training
        assert graft.identity() == json.loads((exported / CONFIG_FILE).read_text())["identity"]
    assert no_hooks(backbone)


def test_reexport_replaces_a_previous_export(exported, run, tiny_backbone, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(exported, out)
    export_run(run, out, checkpoint="3", backbone=tiny_backbone("llama"))
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPORT_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


def test_cli_export(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRAFTKIT_CACHE", str(run.parent / "cache"))
    assert main(["export", str(run), "--checkpoint", "last", "--out", str(tmp_path / "cli")]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == sorted(EXPORT_FILES)
    assert "exported" in capsys.readouterr().out


# -- refusals -------------------------------------------------------------------------------------------------
def test_refuses_to_overwrite_a_foreign_directory(run, tmp_path, capsys):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match=r"precious.*not a previous graftkit export.*notes\.txt"):
        export_run(run, target)
    assert main(["export", str(run), "--out", str(target)]) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert (target / "notes.txt").read_text() == "keep me"


def test_refuses_a_missing_directory(tmp_path):
    with pytest.raises(ExportError, match="no such export directory"):
        load_graft(tmp_path / "nowhere")
    with pytest.raises(ExportError, match="not a graftkit export"):
        load_graft(tmp_path)


def test_refuses_another_family(exported, tiny_backbone):
    with pytest.raises(ExportError, match=r"backbone family differs: the graft was trained on 'llama'.*this backbone has 'qwen2'"):
        load_graft(exported, backbone=tiny_backbone("qwen2"))


def test_refuses_another_hidden_size(copy, tiny_backbone):
    edit_config(copy, lambda c: c["backbone_manifest"].update(hidden_size=128))
    with pytest.raises(ExportError, match=r"hidden size differs: the graft was trained on 128 .*this backbone has 64"):
        load_graft(copy, backbone=tiny_backbone("llama"))


def test_refuses_another_tokenizer(copy, tiny_backbone):
    have = tiny_backbone("llama").manifest()["tokenizer"]
    edit_config(copy, lambda c: c["backbone_manifest"].update(tokenizer="0123456789abcdef"))
    with pytest.raises(ExportError, match=rf"tokenizer fingerprint differs: .*'0123456789abcdef'.*'{have}'"):
        load_graft(copy, backbone=tiny_backbone("llama"))


def test_refuses_a_missing_plugin(copy):
    def change(c):
        c["memory"]["kind"] = "foo"
        c["plugins"]["memory"] = {"name": "foo", "plugin": "graftkit_foo", "distribution": "graftkit-foo", "version": "1.2"}

    edit_config(copy, change)
    with pytest.raises(ExportError) as info:
        load_graft(copy)
    assert str(info.value) == "memory 'foo' comes from distribution 'graftkit-foo' 1.2: pip install graftkit-foo"


def test_an_unknown_builtin_kind_does_not_ask_to_upgrade_to_the_installed_version(copy):
    from graftkit.plugins import _version

    here = _version("graftkit")

    def change(c):
        c["memory"]["kind"] = "foo"
        c["plugins"]["memory"] = {"name": "foo", "plugin": "graftkit", "distribution": "graftkit", "version": here}

    edit_config(copy, change)
    with pytest.raises(ExportError, match=f"this graftkit \\({here}\\) has no memory 'foo'"):
        load_graft(copy)


@pytest.mark.parametrize("version", [0, -3, True])
def test_refuses_a_format_version_that_never_existed(copy, version):
    edit_config(copy, lambda c: c.update(format_version=version))
    with pytest.raises(ExportError, match=f"damaged \\(format_version is {version!r}"):
        load_graft(copy)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_refuses_a_damaged_tensor_file(copy, damage, tiny_backbone):
    path = copy / TENSORS_FILE
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=rf"{TENSORS_FILE}: (truncated|corrupted)"):
        load_graft(copy, backbone=tiny_backbone("llama"))


def test_refuses_a_damaged_safetensors_header(copy, tiny_backbone):
    path = copy / TENSORS_FILE
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + path.read_bytes()[24:])
    edit_config(copy, lambda c: c["files"].pop(TENSORS_FILE))  # no checksum: the reader itself must refuse
    with pytest.raises(ExportError, match=rf"{TENSORS_FILE}: truncated or damaged safetensors file"):
        load_graft(copy, backbone=tiny_backbone("llama"))


def test_refuses_damaged_json(copy):
    text = (copy / CONFIG_FILE).read_text()
    (copy / CONFIG_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(ExportError, match=rf"{CONFIG_FILE}: damaged or truncated JSON"):
        load_graft(copy)


def test_refuses_incomplete_json(copy):
    edit_config(copy, lambda c: c.pop("memory"))
    with pytest.raises(ExportError, match=rf"{CONFIG_FILE}: damaged or incomplete \(memory: Field required"):
        load_graft(copy)


def test_refuses_a_newer_format(copy):
    edit_config(copy, lambda c: c.update(format_version=99, graftkit_version="9.0"))
    with pytest.raises(ExportError, match=r"export format 99 \(written by graftkit 9.0\) is newer than this graftkit"):
        load_graft(copy)


def test_unknown_keys_warn_and_are_ignored(copy, tiny_backbone):
    def change(c):
        c["future_field"] = {"x": 1}
        c["memory"]["config"]["new_knob"] = 3
        c["backbone_manifest"]["vision_tower"] = "none"

    edit_config(copy, change)
    with pytest.warns(ExportWarning) as record:
        with loaded(copy, tiny_backbone("llama")) as graft:
            assert graft.memory.name == "titans"
    messages = "\n".join(str(w.message) for w in record)
    for key in ("'future_field'", "'memory.config.new_knob'", "'backbone_manifest.vision_tower'"):
        assert key in messages


def test_refusals_leave_the_backbone_bare(copy, tiny_backbone):
    """A load that fails after the graft was built must not leave injector hooks on a shared backbone."""
    backbone = tiny_backbone("llama")
    tensors = load_file(str(copy / TENSORS_FILE))
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(3, 3)
    from safetensors.torch import save_file

    save_file(tensors, str(copy / TENSORS_FILE))
    edit_config(copy, lambda c: c["files"].pop(TENSORS_FILE))
    with pytest.raises(ExportError, match="does not fit the graft"):
        load_graft(copy, backbone=backbone)
    assert no_hooks(backbone)


def test_an_export_without_an_option_is_loaded_with_the_option_s_former_default(tiny_backbone, tmp_path):
    """An export records every option of its components; one made before an option existed lacks it, and was made
    with what that option's former default (`Config.former_defaults`) does."""
    from graftkit.api import graft_from_configs
    from graftkit.export import export_graft

    backbone = tiny_backbone("llama")
    former = {"memory": {"key_span": 1, "gate_span": 1, "write_floor": 0.0}, "injector": {"num_tokens": 16, "direct_read": False, "gate": "scalar"}}
    graft = graft_from_configs(
        backbone,
        "linear",
        {"heads": 2, "dim_head": 16, "write_layer": 1, **former["memory"]},
        "mid_layer",
        {"layer": 1, "heads": 2, **former["injector"]},
    )
    try:
        out = export_graft(graft, tmp_path / "export")
    finally:
        graft.injector.detach()
    config = json.loads((out / CONFIG_FILE).read_text())
    for block, options in former.items():
        assert graftkit.components(block)[config[block]["kind"]].Config.former_defaults == options
        for key in options:
            del config[block]["config"][key]
    (out / CONFIG_FILE).write_text(json.dumps(config))
    with loaded(out, backbone) as again:
        for block, options in former.items():
            assert {key: getattr(getattr(again, block).config, key) for key in options} == options, block
        assert again.graft_state_dict().keys() == graft.graft_state_dict().keys()


def test_public_api():
    assert graftkit.load_graft is load_graft
    assert "load_graft" in graftkit.__all__
