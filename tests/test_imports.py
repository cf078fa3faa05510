"""How graftkit's modules import one another: core never imports a plugin package, and no import cycles.

The checks read the source with `ast` (nothing is imported), so they cover every module, whatever a test
run happens to load. The plugin folders are read under the names pyproject.toml maps them to.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_PACKAGES = ("graftkit.backbones", "graftkit.memories", "graftkit.injectors", "graftkit.tasks")

Modules = dict[str, tuple[Path, bool]]  # dotted name -> (file, whether it is a package's __init__)


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """graftkit/ and each plugin folder, by the package name it is installed as."""
    mapped = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {"graftkit": root / "graftkit", **{name: root / folder for name, folder in mapped.items()}}


def find_modules(dirs: Mapping[str, Path]) -> Modules:
    found = {}
    for package, folder in dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            is_init = parts[-1] == "__init__"
            found[".".join((package, *(parts[:-1] if is_init else parts)))] = (path, is_init)
    return found


def imported_names(node: ast.Import | ast.ImportFrom, module: str, is_init: bool) -> list[str]:
    """The absolute dotted names an import statement in `module` names: `import a.b` gives a.b, `from a
    import b` gives a and a.b (b may be a submodule or an attribute)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split(".") if is_init else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def run_at_import(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported: those in the module body and in class
    bodies, `if`, `try` and `with` blocks included; not those in functions or under `if TYPE_CHECKING:`."""
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(modules: Modules) -> dict[str, set[str]]:
    """{module: the modules it imports at import time}.

    A statement's edge goes to the deepest module it names (`from a import b` goes to a.b when that is a
    module, else to a, whose body must have run to hold b), and to the packages above that module which
    are not also above the importer: those start running before the importer does and are not waited for.
    """
    graph: dict[str, set[str]] = {}
    for name, (path, is_init) in modules.items():
        own = set(_ancestors(name))
        edges = set()
        for node in run_at_import(ast.parse(path.read_text(encoding="utf-8"))):
            names = imported_names(node, name, is_init)
            if isinstance(node, ast.ImportFrom):  # the base itself only when some name is not a submodule of it
                base, rest = names[0], names[1:]
                names = [n if n in modules else base for n in rest]
            for target in names:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if not target:
                    continue  # not one of graftkit's modules
                edges.add(target)
                edges.update(a for a in _ancestors(target) if a in modules and a not in own)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that ends where it starts, or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in done:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done:
            found = visit(node)
            if found:
                return found
    return None


def plugin_imports(modules: Modules) -> list[str]:
    """`file:line: module` for every import, anywhere in a core module (functions included), of a plugin package."""
    found = []
    for name, (path, is_init) in modules.items():
        if any(name == p or name.startswith(p + ".") for p in PLUGIN_PACKAGES):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = imported_names(node, name, is_init)
                bad = sorted({p for n in names for p in PLUGIN_PACKAGES if n == p or n.startswith(p + ".")})
                found += [f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{node.lineno}: {p}" for p in bad]
    return found


# -- the checks on graftkit ------------------------------------------------------------------------------


def test_modules_are_found():
    modules = find_modules(package_dirs())
    assert {"graftkit", "graftkit.graft", "graftkit.data.babilong", "graftkit.objectives.read"} <= set(modules)
    assert {"graftkit.backbones.hf", "graftkit.memories.linear", "graftkit.injectors.xattn", "graftkit.tasks.profile"} <= set(modules)


def test_core_never_imports_a_plugin_package():
    """Plugins import core; core reaches them only through the registry (`graftkit.plugins`)."""
    found = plugin_imports(find_modules({"graftkit": ROOT / "graftkit"}))
    assert not found, "core modules import plugin packages:\n" + "\n".join(found)


def test_no_import_cycles():
    """No chain of module-level imports among graftkit's modules (core and built-in plugins) leads back to its start."""
    cycle = find_cycle(import_graph(find_modules(package_dirs())))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# -- the checks themselves --------------------------------------------------------------------------------


def write_package(root: Path, files: Mapping[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return {"graftkit": root / "graftkit"}


def test_a_cycle_is_found(tmp_path):
    dirs = write_package(
        tmp_path,
        {
            "graftkit/__init__.py": "",
            "graftkit/a.py": "from graftkit.b import thing\n",
            "graftkit/b.py": "import os\n\nclass B:\n    from graftkit.c import other\n",
            "graftkit/c.py": "from . import a\n",
        },
    )
    assert find_cycle(import_graph(find_modules(dirs))) == ["graftkit.a", "graftkit.b", "graftkit.c", "graftkit.a"]


def test_imports_in_functions_and_for_type_checking_make_no_cycle(tmp_path):
    dirs = write_package(
        tmp_path,
        {
            "graftkit/__init__.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from graftkit.a import A\n",
            "graftkit/a.py": "import graftkit.b\n",
            "graftkit/b.py": "def f():\n    from graftkit.a import A\n",
            "graftkit/sub/__init__.py": "from graftkit.sub.x import X\n",
            "graftkit/sub/x.py": "from graftkit.sub.y import Y\n",  # its own package: already running, not waited for
            "graftkit/sub/y.py": "",
        },
    )
    graph = import_graph(find_modules(dirs))
    assert graph["graftkit.a"] == {"graftkit.b"} and graph["graftkit"] == set()
    assert find_cycle(graph) is None


def test_a_package_init_and_a_module_that_takes_a_name_from_it_are_a_cycle(tmp_path):
    dirs = write_package(
        tmp_path,
        {
            "graftkit/__init__.py": "",
            "graftkit/sub/__init__.py": "from graftkit.sub.x import X\nclass Base: ...\n",
            "graftkit/sub/x.py": "from graftkit.sub import Base\n",
        },
    )
    assert find_cycle(import_graph(find_modules(dirs))) == ["graftkit.sub", "graftkit.sub.x", "graftkit.sub"]


def test_a_plugin_import_is_found_anywhere(tmp_path):
    dirs = write_package(
        tmp_path,
        {
            "graftkit/__init__.py": "",
            "graftkit/fine.py": "from graftkit.task import Task\nBUILTINS = ('graftkit.tasks',)\n",
            "graftkit/deep.py": "def f():\n    if True:\n        from graftkit.tasks.babilong import BabilongTask\n",
            "graftkit/sub/rel.py": "from .. import backbones\n",
        },
    )
    found = plugin_imports(find_modules(dirs))
    assert [f.rsplit(": ", 1)[1] for f in found] == ["graftkit.tasks", "graftkit.backbones"]
    assert found[0].endswith("deep.py:3: graftkit.tasks")
