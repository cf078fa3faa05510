"""The public entry points: look up, configure and build components."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from graftkit.backbone import Backbone
from graftkit.errors import GraftkitError, RecipeError
from graftkit.graft import Graft
from graftkit.plugins import get_plugins
from graftkit.recipe import Recipe, load_recipe, pydantic_problems
from graftkit.registry import KINDS


def components(kind: str) -> dict[str, type]:
    """Installed components of one kind ('backbone', 'memory' or 'injector'): {name: class}."""
    if kind not in KINDS:
        raise GraftkitError(f"unknown component kind {kind!r}; use one of {', '.join(KINDS)}")
    return dict(get_plugins().registries[kind].classes)


def configure(kind: str, name: str, options: Mapping[str, Any]):
    """(class, validated Config) for a component; invalid options raise RecipeError with dotted paths."""
    if kind not in KINDS:
        raise GraftkitError(f"unknown component kind {kind!r}; use one of {', '.join(KINDS)}")
    cls = get_plugins().registries[kind].get(name, where=f"{kind}.kind")
    try:
        return cls, cls.Config.model_validate(dict(options))
    except ValidationError as exc:
        raise RecipeError(pydantic_problems(exc, cls.Config, prefix=kind)) from None


def create(kind: str, name: str, **options):
    """A configured component. Injectors also take `hidden_size` and `num_layers` (the backbone's)."""
    extra = {}
    if kind == "injector":
        try:
            extra = {"hidden_size": options.pop("hidden_size"), "num_layers": options.pop("num_layers")}
        except KeyError as exc:
            raise GraftkitError(f"create('injector', {name!r}) needs {exc.args[0]}= (the backbone's)") from None
    cls, config = configure(kind, name, options)
    return cls(config, **extra)


def load_backbone(spec: Mapping[str, Any]) -> Backbone:
    """A frozen backbone adapter from a recipe-style block, e.g. {'kind': 'llama', 'source': '...'}."""
    spec = dict(spec)
    if "kind" not in spec:
        raise GraftkitError("backbone.kind: required (one of: " + ", ".join(components("backbone")) + ")")
    return create("backbone", spec.pop("kind"), **spec)


def build_graft(recipe: Recipe | str | Path, backbone: Backbone | None = None, calibrate: bool = True) -> Graft:
    """A Graft built from a recipe (a Recipe or a path to one); pass `backbone` to reuse a loaded one.

    `calibrate=False` skips measuring the write statistics, for a caller that loads trained graft
    tensors next (they carry the statistics)."""
    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe)
    if not isinstance(recipe, Recipe):
        raise GraftkitError(f"build_graft: expected a Recipe or a recipe file path, got {type(recipe).__name__}")
    if backbone is None:
        backbone = load_backbone({"kind": recipe.backbone.kind, **recipe.backbone.options()})
    return graft_from_configs(
        backbone, recipe.memory.kind, recipe.memory.options(), recipe.injector.kind, recipe.injector.options(), calibrate=calibrate
    )


def graft_from_configs(
    backbone: Backbone, memory_kind: str, memory_options: Mapping, injector_kind: str, injector_options: Mapping, calibrate: bool = True
) -> Graft:
    """A Graft on a loaded backbone from memory/injector kinds and options (dim is the backbone's)."""
    memory_options = dict(memory_options)
    if memory_options.get("dim") not in (None, backbone.hidden_size):
        raise GraftkitError(f"memory.dim: {memory_options['dim']} does not match the backbone's hidden size {backbone.hidden_size}")
    memory_options["dim"] = backbone.hidden_size
    memory = create("memory", memory_kind, **memory_options)
    injector = create("injector", injector_kind, hidden_size=backbone.hidden_size, num_layers=backbone.num_layers, **dict(injector_options))
    return Graft(backbone, memory, injector, calibrate=calibrate)
