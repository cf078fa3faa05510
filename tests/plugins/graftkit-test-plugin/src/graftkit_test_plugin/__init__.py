"""graftkit-test-plugin: registers the `test_mean` memory and the `test-plugin-hello` command.

Registered through the ``graftkit`` entry-point group (see pyproject.toml). The hooks only register:
the memory module (which imports torch) is imported inside the hook, when graftkit collects components.
"""

from graftkit import hookimpl

COMMAND = "test-plugin-hello"
GREETING = "hello from graftkit-test-plugin"


@hookimpl
def register_memories(register):
    from graftkit_test_plugin.memory import MeanMemory

    register(MeanMemory)


@hookimpl
def register_commands(cli):
    parser = cli.add_parser(COMMAND, help="print a greeting (graftkit-test-plugin)")
    parser.add_argument("--name", default=None, help="who to greet")
    parser.set_defaults(func=_hello)


def _hello(args) -> int:
    print(GREETING + (f", {args.name}" if args.name else ""))
    return 0
