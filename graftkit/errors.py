"""Errors that users meet. Each carries a message meant to be printed as is, without a traceback."""

from __future__ import annotations


class GraftkitError(Exception):
    """A user-facing error: the CLI prints its message and exits with `exit_code`."""

    exit_code = 1


class RecipeError(GraftkitError):
    """A recipe (or override) failed validation; `problems` holds one (dotted.path, message) per error."""

    exit_code = 2

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        head = f"invalid recipe {source}" if source else "invalid recipe"
        lines = [f"{path}: {message}" if path else message for path, message in self.problems]
        super().__init__(head + ":\n" + "\n".join(f"  {line}" for line in lines))


class UnknownComponentError(GraftkitError):
    """A recipe or API call named a component that no installed plugin registers."""

    exit_code = 2


class DuplicateComponentError(GraftkitError):
    """Two plugins registered the same component name for one kind."""


class StateError(GraftkitError):
    """A memory state file does not belong to this memory / graft, or is damaged."""


class ExportError(GraftkitError):
    """An exported graft cannot be loaded here (missing plugin, mismatched backbone, damaged file)."""
