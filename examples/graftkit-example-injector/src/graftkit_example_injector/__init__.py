"""graftkit-example-injector: registers the `additive_read` injector with graftkit.

graftkit finds this module through the ``graftkit`` entry-point group (see pyproject.toml) and calls its
hooks. A hook only registers: the injector module (which imports torch) is imported inside the hook,
when graftkit collects components, never at plugin discovery.
"""

from graftkit import hookimpl

__version__ = "0.1.0"


@hookimpl
def register_injectors(register):
    from graftkit_example_injector.injector import AdditiveRead

    register(AdditiveRead)
