"""The README and the Makefile say the same as the code: the default recipe, its run folder, the recipe
shown in full, and every recipe file named."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

import graftkit

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
MAKEFILE = (ROOT / "Makefile").read_text(encoding="utf-8")


def make_default(name: str) -> str:
    match = re.search(rf"^{name} \?= (\S+)$", MAKEFILE, re.MULTILINE)
    assert match, f"Makefile sets no {name}"
    return match[1]


def test_make_train_runs_the_recipe_the_readme_names_into_its_output_dir():
    recipe, run = make_default("RECIPE"), make_default("RUN")
    assert graftkit.load_recipe(ROOT / recipe).output_dir == run
    assert f"`graftkit train {recipe}` then `graftkit eval {run} --n 200`" in README


def test_the_recipe_shown_in_full_is_the_file_it_names():
    block = re.search(r"```yaml\n# (recipes/\S+\.yaml)[^\n]*\n(.*?)```", README, re.DOTALL)
    assert block, "the README shows no recipe file in full"
    assert block[1] == make_default("RECIPE")
    assert yaml.safe_load(block[2]) == yaml.safe_load((ROOT / block[1]).read_text(encoding="utf-8"))


def test_every_recipe_the_readme_names_exists():
    named = set(re.findall(r"recipes/([a-z0-9_.-]+\.yaml)", README)) | {
        f"{m}.yaml" for m in re.findall(r"`(smollm2_\w+)`", README)
    }
    assert named, "the README names no recipe"
    missing = sorted(n for n in named if not (ROOT / "recipes" / n).is_file())
    assert not missing, missing


def test_the_own_data_example_is_valid_and_is_the_shipped_file(tmp_path):
    from graftkit.tasks.jsonl import read_episodes

    block = re.search(r"### Train on your own data.*?```json\n(.*?)```", README, re.DOTALL)
    assert block, "the README shows no JSON Lines example"
    lines = block[1].strip().splitlines()
    (tmp_path / "shown.jsonl").write_text(block[1])
    assert len(read_episodes(tmp_path / "shown.jsonl")) == len(lines) >= 2
    shipped = (ROOT / "examples" / "data" / "my_episodes.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines[0] == shipped[0]
    recipe = graftkit.load_recipe(ROOT / "recipes" / "smollm2_jsonl.yaml")
    assert "recipes/smollm2_jsonl.yaml" in README and recipe.output_dir == "runs/my_graft" and "eval runs/my_graft" in README
