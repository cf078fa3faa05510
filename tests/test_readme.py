"""The README and the Makefile say the same as the code: the default recipe, its run folder, the recipe
shown in full, every recipe file named, and every command, flag and make target the README uses."""

from __future__ import annotations

import argparse
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
    named = set(re.findall(r"recipes/([a-z0-9_./-]+\.yaml)", README)) | {f"{m}.yaml" for m in re.findall(r"`(smollm2_\w+)`", README)}
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


def code_in_readme() -> list[str]:
    """The README's shell code: the lines of its bash and plain fenced blocks, and its inline `code` spans."""
    blocks = [text for language, text in re.findall(r"```([a-z]*)\n(.*?)```", README, re.DOTALL) if language in ("", "bash")]
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", README, flags=re.DOTALL))
    return [line for block in blocks for line in block.splitlines()] + spans


def test_every_command_flag_and_make_target_the_readme_uses_exists():
    from graftkit.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    used = []
    for code in code_in_readme():
        for name, rest in re.findall(r"(?:^|[\s/])graftkit ([a-z][a-z-]*)([^#]*)", code):
            used.append(name)
            assert name in commands, f"the README uses `graftkit {name}`, which is no command"
            for flag in re.findall(r"(?<!\S)(--[a-z][a-z-]*)", rest):
                assert flag in commands[name]._option_string_actions, f"`graftkit {name}` has no {flag}"
        for target in re.findall(r"\bmake ([a-z]+)", code):
            assert re.search(rf"^{target}:", MAKEFILE, re.MULTILINE), f"the Makefile has no target {target!r}"
    assert {"train", "eval", "validate", "reference", "export", "memorize", "ask", "chat"} <= set(used)


def test_the_readme_points_at_the_recipe_reference():
    assert "[docs/recipes.md](docs/recipes.md)" in README and (ROOT / "docs" / "recipes.md").is_file()
