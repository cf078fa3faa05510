"""The plugin manager: built-ins and entry points, registered through the same hooks.

Set ``GRAFTKIT_NO_PLUGIN_AUTOLOAD=1`` to skip third-party entry points (built-ins still load), and
``GRAFTKIT_DISABLE_PLUGINS=a,b`` to skip named entry points.
"""

from __future__ import annotations

import difflib
import importlib
import os
import warnings
from dataclasses import dataclass
from importlib import metadata

import pluggy

from graftkit import hookspecs
from graftkit.errors import DuplicateComponentError, GraftkitError
from graftkit.registry import KINDS, Registry

BUILTINS = ("graftkit.backbones", "graftkit.memories", "graftkit.injectors", "graftkit.tasks")
AUTOLOAD_ENV = "GRAFTKIT_NO_PLUGIN_AUTOLOAD"
DISABLE_ENV = "GRAFTKIT_DISABLE_PLUGINS"
HOOKS = {"backbone": "register_backbones", "memory": "register_memories", "injector": "register_injectors", "task": "register_tasks"}


class PluginWarning(UserWarning):
    """A third-party plugin could not be loaded; everything else keeps working."""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str
    version: str


class Plugins:
    """A pluggy manager plus the component registries it fills."""

    def __init__(self, autoload: bool | None = None):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        version = _version("graftkit")
        for module_name in BUILTINS:
            self.add(importlib.import_module(module_name), module_name, PluginInfo(module_name, "graftkit", version))
        if autoload is None:
            autoload = os.environ.get(AUTOLOAD_ENV, "") in ("", "0")
        if autoload:
            self._load_entry_points()
        for name, plugin in self.pm.list_name_plugin():
            unknown = self._unknown_hooks(plugin)
            if unknown and name not in BUILTINS:  # e.g. a misspelt hook: check_pending would refuse everything
                self.pm.unregister(plugin)
                info = self.info.pop(name)
                warnings.warn(
                    f"{_unknown_hook_message(name, unknown)}; the plugin (distribution {info.distribution!r}) is skipped",
                    PluginWarning,
                    stacklevel=2,
                )
        self.pm.check_pending()
        self.registries = {kind: self._collect(kind) for kind in KINDS}

    def add(self, plugin: object, name: str, info: PluginInfo | None = None) -> None:
        """Register a plugin object or module (tests and embedding applications use this).

        Raises GraftkitError for a hook with a wrong signature or an unknown (e.g. misspelt) hook name, and
        DuplicateComponentError for a component name another plugin registers; the manager is then unchanged.
        """
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise GraftkitError(f"graftkit plugin {name!r} is invalid: {exc}") from None
        self.info[name] = info or PluginInfo(name, "(registered in code)", "")
        if hasattr(self, "registries"):
            try:
                unknown = self._unknown_hooks(plugin)
                if unknown:
                    raise GraftkitError(_unknown_hook_message(name, unknown))
                self.registries = {kind: self._collect(kind) for kind in KINDS}
            except Exception:
                self.pm.unregister(plugin)
                del self.info[name]
                raise

    def _unknown_hooks(self, plugin: object) -> list[str]:
        """Hooks `plugin` implements that graftkit does not define (what pm.check_pending() rejects)."""
        return sorted(
            hook_name
            for hook_name, caller in vars(self.pm.hook).items()
            if not hook_name.startswith("_")
            and not caller.has_spec()
            and any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls())
        )

    def _load_entry_points(self) -> None:
        disabled = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
        for ep in metadata.entry_points(group=hookspecs.PROJECT):
            if ep.name in disabled or self.pm.get_plugin(ep.name) is not None:
                continue
            dist = ep.dist.name if ep.dist else "?"
            try:
                plugin = ep.load()
                self.add(plugin, ep.name, PluginInfo(ep.name, dist, ep.dist.version if ep.dist else ""))
            except Exception as exc:  # a broken third-party plugin must not take graftkit down
                warnings.warn(
                    f"graftkit plugin {ep.name!r} from distribution {dist!r} failed to load and is skipped: {type(exc).__name__}: {exc}",
                    PluginWarning,
                    stacklevel=2,
                )

    def _collect(self, kind: str) -> Registry:
        registry = Registry(kind)
        hook = getattr(self.pm.hook, HOOKS[kind])
        for impl in hook.get_hookimpls():  # registration order: built-ins first, then entry points
            owner = impl.plugin_name
            try:
                impl.function(register=lambda cls, owner=owner: registry.register(cls, owner))
            except DuplicateComponentError:
                raise
            except Exception as exc:
                if owner in BUILTINS:
                    raise
                self.warn_failed(owner, HOOKS[kind], exc)
        return registry

    def warn_failed(self, owner: str, hook: str, exc: Exception) -> None:
        """Warn that third-party plugin `owner` raised `exc` in `hook` and is skipped there."""
        info = self.info.get(owner)
        warnings.warn(
            f"graftkit plugin {owner!r} from distribution {info.distribution if info else '?'!r} failed in "
            f"{hook} and is skipped: {type(exc).__name__}: {exc}",
            PluginWarning,
            stacklevel=3,
        )

    def owner_of(self, kind: str, name: str) -> PluginInfo:
        return self.info[self.registries[kind].owners[name]]


def _unknown_hook_message(name: str, unknown: list[str]) -> str:
    known = sorted(n for n in vars(hookspecs) if n.startswith("register_"))
    hooks = []
    for hook in unknown:
        hint = difflib.get_close_matches(hook, known, n=1)
        hooks.append(repr(hook) + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    return f"graftkit plugin {name!r} implements unknown hook {', '.join(hooks)}; graftkit's hooks are {', '.join(known)}"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "0+unknown"


_current: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugin manager, created on first use."""
    global _current
    if _current is None:
        _current = Plugins()
    return _current


def reset_plugins(plugins: Plugins | None = None) -> Plugins | None:
    """Replace (or forget, with None) the process-wide manager; returns the old one."""
    global _current
    old, _current = _current, plugins
    return old
