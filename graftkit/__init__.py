"""graftkit: graft a trainable test-time memory onto a frozen open-weight LLM."""

from graftkit.api import build_graft, components, create, load_backbone
from graftkit.errors import GraftkitError, RecipeError, StateError
from graftkit.export import load_graft
from graftkit.hookspecs import hookimpl
from graftkit.recipe import Recipe, load_recipe
from graftkit.state import MemoryState

__all__ = [
    "GraftkitError",
    "MemoryState",
    "Recipe",
    "RecipeError",
    "StateError",
    "build_graft",
    "components",
    "create",
    "hookimpl",
    "load_backbone",
    "load_graft",
    "load_recipe",
]
