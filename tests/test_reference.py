"""The recipe reference: docs/recipes.md is what `graftkit reference` renders now, from the built-in components'
own Configs, and every recipe key it lists is described."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from graftkit import hookimpl
from graftkit.cli import main
from graftkit.memory import Memory, MemoryConfig
from graftkit.plugins import Plugins, reset_plugins
from graftkit.recipe import ComponentBlock, Recipe, TaskBlock, TrainConfig
from graftkit.reference import render

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "recipes.md"


@pytest.fixture
def builtins_only():
    """The built-in components alone: test plugins installed beside graftkit stay out of the reference."""
    plugins = Plugins(autoload=False)
    old = reset_plugins(plugins)
    yield plugins
    reset_plugins(old)


def test_docs_recipes_md_is_what_graftkit_reference_renders(builtins_only):
    assert DOCS.read_text(encoding="utf-8") == render(builtins_only), (
        "docs/recipes.md is out of date: run `make docs` (GRAFTKIT_NO_PLUGIN_AUTOLOAD=1 graftkit reference --out docs/recipes.md)"
    )


def test_the_command_prints_and_writes_the_same_text(builtins_only, tmp_path, capsys):
    assert main(["reference"]) == 0
    printed = capsys.readouterr().out
    assert main(["reference", "--out", str(tmp_path / "recipes.md")]) == 0
    assert (tmp_path / "recipes.md").read_text(encoding="utf-8") == printed == render(builtins_only)


def test_every_key_of_every_block_is_described_and_listed(builtins_only):
    text = render(builtins_only)
    models = [Recipe, TrainConfig, ComponentBlock, TaskBlock]
    models += [cls.Config for registry in builtins_only.registries.values() for cls in registry.classes.values()]
    for model in models:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__qualname__}.{name} has no description"
            assert f"- `{name}` (" in text, f"{model.__qualname__}.{name} is not in the reference"
    for kind, registry in builtins_only.registries.items():
        for name in registry.classes:
            assert f"`{name}`" in text.split(f"## `{'data' if kind == 'task' else kind}`")[1], f"{kind} {name} is not in the reference"


class NoteMemory(Memory):
    """Keeps notes (a test plugin)."""

    name = "notes"

    class Config(MemoryConfig):
        pages: int = Field(3, ge=1, le=9, description="Pages of notes.")


class NotePlugin:
    @hookimpl
    def register_memories(self, register):
        register(NoteMemory)


def test_a_plugin_component_is_documented_with_its_own_keys_and_where_it_comes_from():
    plugins = Plugins(autoload=False)
    plugins.add(NotePlugin(), "notes")
    text = render(plugins)
    section = text.split("### `notes`")[1].split("###")[0]
    assert "Keeps notes (a test plugin). (registered in code)" in section
    assert "- `pages` (int from 1 to 9, default `3`): Pages of notes." in section
    assert "`write_layer`" not in section  # shared keys are listed once, under the memory block
    assert "### `notes`" not in render(Plugins(autoload=False))
