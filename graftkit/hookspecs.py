"""The plugin contract of graftkit: the only hooks a plugin implements.

A plugin is any module or object with functions marked by `graftkit.hookimpl`, registered either by
graftkit itself (the built-in backbones, memories, injectors and tasks) or through the ``graftkit``
entry-point group of an installed distribution::

    [project.entry-points.graftkit]
    my_injector = "my_package.plugin"

Hooks only *register* classes. They must not load models, touch the network or import heavy
dependencies: they run every time graftkit starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import argparse

PROJECT = "graftkit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: The callable a ``register_*`` hook receives: ``register(cls)`` adds one component class.
#: The class must have a string ``name`` and a pydantic ``Config``.
Register = Callable[[type], None]


@hookspec
def register_backbones(register: Register) -> None:
    """Register backbone adapter classes.

    :param register: call ``register(cls)`` once per backbone family; ``cls.name`` is the value of
        ``backbone.kind`` in recipes (``qwen2``, ``llama``, ...), ``cls.Config`` validates the block.
    :return: nothing; return values are ignored.

    .. versionadded:: 0.1
    """


@hookspec
def register_memories(register: Register) -> None:
    """Register memory classes (subclasses of :class:`graftkit.memory.Memory`).

    :param register: call ``register(cls)`` once per memory; ``cls.name`` is the value of
        ``memory.kind`` in recipes, ``cls.Config`` (a :class:`graftkit.memory.MemoryConfig`)
        validates the block.
    :return: nothing; return values are ignored.

    .. versionadded:: 0.1
    """


@hookspec
def register_injectors(register: Register) -> None:
    """Register injector classes (subclasses of :class:`graftkit.injector.Injector`).

    :param register: call ``register(cls)`` once per injector; ``cls.name`` is the value of
        ``injector.kind`` in recipes, ``cls.Config`` validates the block.
    :return: nothing; return values are ignored.

    .. versionadded:: 0.1
    """


@hookspec
def register_tasks(register: Register) -> None:
    """Register task classes (subclasses of :class:`graftkit.task.Task`).

    :param register: call ``register(cls)`` once per task; ``cls.name`` is the value of ``task`` in a
        recipe's ``data`` block, ``cls.Config`` (a :class:`graftkit.task.TaskConfig`) validates the block.
    :return: nothing; return values are ignored.

    .. versionadded:: 0.2
    """


@hookspec
def register_commands(cli: argparse._SubParsersAction) -> None:
    """Add sub-commands to the ``graftkit`` command line.

    :param cli: the sub-parser collection of the ``graftkit`` parser; call ``cli.add_parser(name)``
        and set ``func`` with ``parser.set_defaults(func=callable)``. The callable receives the parsed
        ``argparse.Namespace`` and returns an exit code (or ``None`` for 0).
    :return: nothing; return values are ignored.

    .. versionadded:: 0.1
    """
