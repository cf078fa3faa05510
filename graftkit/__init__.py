"""graftkit: graft a trainable test-time memory onto a frozen open-weight LLM.

The public names below are imported from their modules on first use (PEP 562), so `import graftkit`,
which also runs before any `import graftkit.<module>`, loads nothing else.
"""

import importlib as _importlib
import types as _types
from typing import TYPE_CHECKING

#: Each public name and the module that defines it.
_EXPORTS = {
    "GraftkitError": "graftkit.errors",
    "MemoryState": "graftkit.state",
    "Recipe": "graftkit.recipe",
    "RecipeError": "graftkit.errors",
    "StateError": "graftkit.errors",
    "build_graft": "graftkit.api",
    "components": "graftkit.api",
    "create": "graftkit.api",
    "hookimpl": "graftkit.hookspecs",
    "load_backbone": "graftkit.api",
    "load_graft": "graftkit.export",
    "load_recipe": "graftkit.recipe",
}

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

if TYPE_CHECKING:
    from graftkit.api import build_graft, components, create, load_backbone
    from graftkit.errors import GraftkitError, RecipeError, StateError
    from graftkit.export import load_graft
    from graftkit.hookspecs import hookimpl
    from graftkit.recipe import Recipe, load_recipe
    from graftkit.state import MemoryState


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'graftkit' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # later lookups find it without coming here
    return value


def __dir__() -> list[str]:
    """The public names, the submodules imported so far and the module's dunder attributes."""
    loaded = {name for name, value in globals().items() if isinstance(value, _types.ModuleType) and value.__name__.startswith("graftkit.")}
    return sorted({*__all__, *loaded, *(name for name in globals() if name.startswith("__"))})
