"""Name -> component class, per kind, with the errors users meet: duplicates and unknown names."""

from __future__ import annotations

import difflib
from typing import Any

from graftkit.errors import DuplicateComponentError, UnknownComponentError

KINDS = ("backbone", "memory", "injector", "task")


class Registry:
    """Components of one kind (backbone, memory, injector or task), each remembered with its plugin."""

    def __init__(self, kind: str):
        self.kind = kind
        self.classes: dict[str, type[Any]] = {}
        self.owners: dict[str, str] = {}

    def register(self, cls: type, owner: str) -> None:
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"plugin {owner}: {self.kind} class {cls.__qualname__} has no string `name`")
        if not hasattr(cls, "Config"):
            raise TypeError(f"plugin {owner}: {self.kind} {name!r} has no pydantic `Config`")
        if name in self.classes and self.classes[name] is not cls:
            raise DuplicateComponentError(
                f"{self.kind} {name!r} is registered twice: by plugin {self.owners[name]!r} and by plugin {owner!r}; "
                "uninstall one of them or block it with GRAFTKIT_DISABLE_PLUGINS"
            )
        self.classes[name] = cls
        self.owners[name] = owner

    def get(self, name: str, where: str | None = None) -> type[Any]:
        if name in self.classes:
            return self.classes[name]
        raise UnknownComponentError(unknown_message(self.kind, name, sorted(self.classes), where))


def unknown_message(kind: str, name: object, installed: list[str], where: str | None = None) -> str:
    """'unknown memory 'titan'; did you mean 'titans'? installed: ...' (with the dotted path if known)."""
    prefix = f"{where}: " if where else ""
    hint = difflib.get_close_matches(str(name), installed, n=1)
    did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
    listing = ", ".join(installed) if installed else "none"
    return f"{prefix}unknown {kind} {name!r}{did_you_mean} (installed: {listing})"
