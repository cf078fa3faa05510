"""The third-party plugin example (examples/graftkit-example-injector), installed as its own distribution:
it shows up in `graftkit plugins`, leaves the backbone untouched at init, trains from a recipe, and its
distribution is recorded in an export.

CI installs it with `pip install --no-deps -e examples/graftkit-example-injector` (Makefile `test`).
"""

from __future__ import annotations

import json
from importlib import metadata

import pytest
import torch

from graftkit.api import graft_from_configs
from graftkit.cli import main
from graftkit.injector import Injector
from graftkit.recipe import validate_recipe

DIST = "graftkit-example-injector"


def _installed() -> bool:
    try:
        dist = metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        return False
    return any(ep.group == "graftkit" for ep in dist.entry_points)


pytestmark = pytest.mark.skipif(not _installed(), reason=f"{DIST} is not installed: pip install --no-deps -e examples/graftkit-example-injector")

MEMORY = {"heads": 2, "dim_head": 16, "expansion": 2, "chunk_size": 16, "write_layer": 1}


def test_listed_by_graftkit_plugins(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert f"example_injector                 {DIST} 0.1.0" in out
    assert f"additive_read            [{DIST}]" in out


def test_closed_gate_leaves_the_backbone_exact(tiny_backbone):
    backbone = tiny_backbone("llama")
    ids = torch.tensor([backbone.chat_ids("Where is Mary?")])
    with torch.no_grad():
        bare = backbone.model(input_ids=ids).logits
    graft = graft_from_configs(backbone, "titans", MEMORY, "additive_read", {})
    try:
        with torch.no_grad():
            state = graft.memorize("Mary went to the kitchen.")
            assert torch.equal(graft(ids, state).logits, bare)  # gate closed at init
            graft.injector.gate.fill_(1.0)
            assert not torch.allclose(graft(ids, state).logits, bare)  # open: the memory read gets in
            assert torch.equal(graft(ids, graft.init_state(1)).logits, bare)  # an empty memory adds nothing
            assert torch.equal(backbone.model(input_ids=ids).logits, bare)  # outside reading(): a no-op
    finally:
        graft.injector.detach()
    hooks = [h for m in backbone.model.modules() for h in m._forward_hooks.values()]
    assert not any(isinstance(getattr(h, "__self__", None), Injector) for h in hooks)


def test_trains_from_a_recipe_and_exports(tmp_path, monkeypatch):
    from graftkit.checkpoint import resolve_checkpoint
    from graftkit.export import CONFIG_FILE, export_run
    from graftkit.train import train

    monkeypatch.setenv("GRAFTKIT_CACHE", str(tmp_path / "cache"))
    recipe = validate_recipe(
        {
            "schema_version": 1,
            "backbone": {"kind": "llama", "source": "tiny-random"},
            "memory": {"kind": "titans", **MEMORY},
            "injector": {"kind": "additive_read", "gate_init": 0.0},
            "data": {"task": "babilong", "tasks": ["qa1"], "train_lengths": ["0k"], "eval_lengths": ["0k"], "train_samples": 8, "eval_samples": 4},
            "train": {"steps": 3, "eval_every": 3, "batch_size": 2, "lr": 0.01, "warmup_steps": 0},
            "output_dir": str(tmp_path / "run"),
        }
    )
    result = train(recipe, progress=False)
    assert result.last_step == 3 and result.best_step == 3
    from safetensors.torch import load_file

    tensors = load_file(str(resolve_checkpoint(result.run_dir, "last") / "graft.safetensors"))
    assert tensors["injector.gate"].abs().max() > 0  # the closed gate opened: gradients reached the plugin
    out = export_run(result.run_dir, tmp_path / "export")
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["plugins"]["injector"] == {"name": "additive_read", "plugin": "example_injector", "distribution": DIST, "version": "0.1.0"}
