"""The plugin system: built-ins and third-party plugins register through the same hooks.

Third-party plugins are simulated three ways: objects registered in code (`Plugins.add`), fake entry
points (monkeypatched `importlib.metadata.entry_points` pointing at modules written to tmp_path), and
the real installable package tests/plugins/graftkit-test-plugin (tests skip when it is not installed).
"""

from __future__ import annotations

import importlib.metadata
import itertools
import sys
import textwrap
import warnings

import pluggy
import pytest
import torch
from pydantic import BaseModel, Field

import graftkit
from graftkit import hookimpl
from graftkit.cli import main
from graftkit.errors import DuplicateComponentError, GraftkitError, UnknownComponentError
from graftkit.memory import Memory, MemoryConfig
from graftkit.plugins import AUTOLOAD_ENV, DISABLE_ENV, HOOKS, Plugins, PluginWarning, get_plugins, reset_plugins
from graftkit.registry import KINDS

BUILTIN_COMPONENTS = {
    "backbone": {"qwen2", "llama", "mistral"},
    "memory": {"titans", "linear", "attention_slots", "episodic"},
    "injector": {"layer0_soft_prompt", "mid_layer", "multi_layer_xattn", "copy"},
    "task": {"babilong", "jsonl", "profile"},
}
BUILTIN_PLUGINS = {"backbone": "graftkit.backbones", "memory": "graftkit.memories", "injector": "graftkit.injectors", "task": "graftkit.tasks"}

TEST_PLUGIN_DIST = "graftkit-test-plugin"
INSTALL_HINT = "pip install --no-deps --no-build-isolation ./tests/plugins/graftkit-test-plugin"


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_test_plugin = pytest.mark.skipif(not _installed(TEST_PLUGIN_DIST), reason=f"{TEST_PLUGIN_DIST} is not installed (CI runs: {INSTALL_HINT})")


# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture
def isolated(monkeypatch):
    """Forget the process-wide plugin manager for one test and restore it afterwards."""
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    old = reset_plugins(None)
    yield
    reset_plugins(old)


_counter = itertools.count()


@pytest.fixture
def fake_entry_points(tmp_path, monkeypatch, isolated):
    """`install({ep_name: module_source})`: those modules become the only `graftkit` entry points."""
    monkeypatch.syspath_prepend(str(tmp_path))
    real = importlib.metadata.entry_points

    def install(plugins: dict[str, str]) -> dict[str, str]:
        eps, modules = [], {}
        for ep_name, source in plugins.items():
            module = f"gk_fake_plugin_{ep_name}_{next(_counter)}"
            (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
            eps.append(importlib.metadata.EntryPoint(name=ep_name, value=module, group="graftkit"))
            modules[ep_name] = module
            monkeypatch.delitem(sys.modules, module, raising=False)

        def entry_points(**params):
            if params.get("group") == "graftkit":
                return importlib.metadata.EntryPoints(eps)
            return real(**params)

        monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
        importlib.invalidate_caches()
        return modules

    yield install
    for name in [m for m in sys.modules if m.startswith("gk_fake_plugin_")]:
        del sys.modules[name]


def memory_plugin_source(name: str, field: str = "size") -> str:
    """Source of a plugin module that registers one small memory called `name`."""
    return f"""
        from pydantic import Field
        from graftkit import hookimpl
        from graftkit.memory import Memory, MemoryConfig

        class FakeMemory(Memory):
            '''A memory registered by a fake entry point.'''
            name = {name!r}

            class Config(MemoryConfig):
                {field}: int = Field(1, description="an option")

        @hookimpl
        def register_memories(register):
            register(FakeMemory)
    """


def make_memory(name: str) -> type[Memory]:
    class InCodeMemory(Memory):
        """Keeps the last written vector (registered in code by a test)."""

        class Config(MemoryConfig):
            width_hint: int = Field(4, description="unused; exercises component-level validation")

        def _init_state(self, batch_size, device, dtype):
            return {"last": torch.zeros(batch_size, self.dim, device=device, dtype=dtype)}

        def _write(self, x, state, mask):
            return state.replace(last=x[:, -1])

        def _read(self, q, state):
            return state["last"][:, None, :].expand_as(q)

    InCodeMemory.name = name
    return InCodeMemory


class MemoryPlugin:
    def __init__(self, *classes):
        self.classes = classes

    @hookimpl
    def register_memories(self, register):
        for cls in self.classes:
            register(cls)


# -- built-ins ---------------------------------------------------------------------------------------


def test_builtins_register_through_the_hooks(isolated):
    plugins = Plugins(autoload=False)
    for kind in KINDS:
        registry = plugins.registries[kind]
        assert BUILTIN_COMPONENTS[kind] <= set(registry.classes), (kind, sorted(registry.classes))
        hook = getattr(plugins.pm.hook, HOOKS[kind])
        assert BUILTIN_PLUGINS[kind] in [impl.plugin_name for impl in hook.get_hookimpls()]
        for name in BUILTIN_COMPONENTS[kind]:
            assert registry.owners[name] == BUILTIN_PLUGINS[kind]
            owner = plugins.owner_of(kind, name)
            assert owner.distribution == "graftkit"
            assert owner.name == BUILTIN_PLUGINS[kind]
            assert registry.classes[name].name == name
    # the built-in plugins are the modules themselves, registered under their import names
    assert plugins.pm.get_plugin("graftkit.memories") is sys.modules["graftkit.memories"]


def test_no_autoload_means_only_builtins(isolated):
    plugins = Plugins(autoload=False)
    assert set(plugins.info) == set(BUILTIN_PLUGINS.values())
    for kind in KINDS:
        assert set(plugins.registries[kind].classes) == BUILTIN_COMPONENTS[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_component_contract(kind, isolated):
    """One class per component: a string `name`, a pydantic Config that forbids extras, every field described."""
    plugins = Plugins(autoload=False)
    for name, cls in plugins.registries[kind].classes.items():
        assert cls.name == name
        assert issubclass(cls.Config, BaseModel), name
        assert cls.Config.model_config.get("extra") == "forbid", name
        for field_name, field in cls.Config.model_fields.items():
            assert field.description, f"{kind} {name}: Config.{field_name} has no description"
        assert (cls.__doc__ or "").strip(), f"{kind} {name} has no docstring (`graftkit plugins` shows its first line)"
        if kind == "task":  # a task may need the user's data files; nothing else is required
            required = {f for f, info in cls.Config.model_fields.items() if info.is_required()}
            assert required <= {"train"}, (name, required)
        else:
            cls.Config()  # every option has a default: `kind: name` alone is a valid block


def test_registration_hooks_do_not_load_models(isolated, monkeypatch):
    """Hooks only register: building the manager must not touch transformers' model loading."""
    import transformers

    def forbidden(*args, **kwargs):
        raise AssertionError("a registration hook loaded a model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", forbidden)
    Plugins(autoload=True)


def test_get_plugins_is_cached_and_reset_replaces_it(isolated):
    first = get_plugins()
    assert get_plugins() is first
    mine = Plugins(autoload=False)
    assert reset_plugins(mine) is first
    assert get_plugins() is mine


# -- third-party plugins registered in code -----------------------------------------------------------


def test_plugin_added_in_code_is_usable_everywhere(isolated, tmp_path, capsys):
    plugins = Plugins(autoload=False)
    cls = make_memory("in_code_memory")
    plugins.add(MemoryPlugin(cls), "my_plugin")
    assert plugins.registries["memory"].classes["in_code_memory"] is cls
    assert plugins.owner_of("memory", "in_code_memory").distribution == "(registered in code)"
    assert BUILTIN_COMPONENTS["memory"] <= set(plugins.registries["memory"].classes)
    reset_plugins(plugins)

    assert graftkit.components("memory")["in_code_memory"] is cls
    memory = graftkit.create("memory", "in_code_memory", dim=4)
    state = memory.write(torch.arange(8.0).reshape(1, 2, 4), memory.init_state(1))
    assert torch.equal(memory.read(torch.zeros(1, 3, 4), state), torch.tensor([4.0, 5, 6, 7]).expand(1, 3, 4))

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "schema_version: 1\nbackbone: {kind: llama, source: tiny-random}\n"
        "memory: {kind: in_code_memory, width_hint: 2}\ninjector: {kind: mid_layer}\ndata: {task: babilong}\n"
    )
    assert graftkit.load_recipe(recipe).component_config("memory").width_hint == 2
    with pytest.raises(graftkit.RecipeError, match=r"memory\.width_hnt: unknown key; did you mean 'width_hint'\?"):
        graftkit.load_recipe(recipe, ["memory.width_hnt=2"])

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "my_plugin" in out
    assert any(line.split()[:2] == ["in_code_memory", "[(registered"] for line in out.splitlines())


def test_plugin_can_add_a_cli_command(isolated, capsys):
    class CommandPlugin:
        @hookimpl
        def register_commands(self, cli):
            p = cli.add_parser("shout", help="print the argument in capitals")
            p.add_argument("word")
            p.set_defaults(func=lambda args: print(args.word.upper()))

    plugins = Plugins(autoload=False)
    plugins.add(CommandPlugin(), "command_plugin")
    reset_plugins(plugins)
    assert main(["shout", "graft"]) == 0  # a command returning None exits 0
    assert capsys.readouterr().out == "GRAFT\n"


def test_a_plugin_whose_commands_fail_is_skipped_and_the_rest_still_work(isolated, capsys):
    class BrokenCommands:
        @hookimpl
        def register_commands(self, cli):
            cli.add_parser("half", help="added before the failure")
            raise RuntimeError("cannot add my commands")

    plugins = Plugins(autoload=False)
    plugins.add(BrokenCommands(), "broken_commands")
    reset_plugins(plugins)
    with pytest.warns(PluginWarning, match=r"'broken_commands' .* failed in register_commands and is skipped: RuntimeError"):
        assert main(["plugins"]) == 0
    assert "plugins:" in capsys.readouterr().out
    with pytest.warns(PluginWarning), pytest.raises(SystemExit) as exited:
        main(["half"])  # what it half-added is gone: an unknown command, as argparse reports it
    assert exited.value.code == 2 and "invalid choice: 'half'" in capsys.readouterr().err


# -- duplicates --------------------------------------------------------------------------------------


def test_duplicate_name_names_both_plugins_and_leaves_manager_unchanged(isolated):
    plugins = Plugins(autoload=False)
    builtin_titans = plugins.registries["memory"].classes["titans"]
    with pytest.raises(DuplicateComponentError) as info:
        plugins.add(MemoryPlugin(make_memory("titans")), "impostor")
    message = str(info.value)
    assert "memory 'titans' is registered twice" in message
    assert "'graftkit.memories'" in message and "'impostor'" in message
    assert message.index("graftkit.memories") < message.index("impostor")  # load order: the built-in came first
    # the failed plugin was rolled back: the manager still works and still has the built-in
    assert plugins.pm.get_plugin("impostor") is None and "impostor" not in plugins.info
    assert plugins.registries["memory"].classes["titans"] is builtin_titans
    plugins.add(MemoryPlugin(make_memory("other")), "fine")
    assert "other" in plugins.registries["memory"].classes


def test_one_plugin_registering_a_name_twice(isolated):
    plugins = Plugins(autoload=False)
    with pytest.raises(DuplicateComponentError, match="'twice' is registered twice"):
        plugins.add(MemoryPlugin(make_memory("twice"), make_memory("twice")), "clumsy")


def test_two_entry_point_plugins_with_one_name(fake_entry_points, capsys):
    fake_entry_points({"alpha": memory_plugin_source("shared_name"), "beta": memory_plugin_source("shared_name")})
    with pytest.raises(DuplicateComponentError) as info:
        Plugins()
    assert "'alpha'" in str(info.value) and "'beta'" in str(info.value)
    # on the command line that is a message and an exit code, not a traceback
    reset_plugins(None)
    assert main(["plugins"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("graftkit: error: memory 'shared_name' is registered twice")
    assert "GRAFTKIT_DISABLE_PLUGINS" in err


def test_disabling_one_of_two_conflicting_plugins(fake_entry_points, monkeypatch):
    fake_entry_points({"alpha": memory_plugin_source("shared_name"), "beta": memory_plugin_source("shared_name")})
    monkeypatch.setenv(DISABLE_ENV, "beta")
    plugins = Plugins()
    assert plugins.registries["memory"].owners["shared_name"] == "alpha"
    assert "beta" not in plugins.info


# -- unknown names -----------------------------------------------------------------------------------


def test_unknown_name_suggests_closest_and_lists_installed(isolated):
    plugins = Plugins(autoload=False)
    with pytest.raises(UnknownComponentError) as info:
        plugins.registries["memory"].get("titan")
    message = str(info.value)
    assert "unknown memory 'titan'; did you mean 'titans'?" in message
    assert "installed: attention_slots, episodic, linear, titans" in message
    with pytest.raises(UnknownComponentError) as info:
        plugins.registries["injector"].get("zzz")
    assert "did you mean" not in str(info.value)  # nothing close: no suggestion, still the listing
    assert "layer0_soft_prompt" in str(info.value)


def test_unknown_name_through_the_public_api(isolated):
    reset_plugins(Plugins(autoload=False))
    with pytest.raises(UnknownComponentError, match=r"^memory\.kind: unknown memory 'linaer'; did you mean 'linear'\?"):
        graftkit.create("memory", "linaer", dim=8)
    with pytest.raises(UnknownComponentError, match="did you mean 'llama'"):
        graftkit.load_backbone({"kind": "lama", "source": "tiny-random"})
    with pytest.raises(GraftkitError, match="unknown component kind 'memories'"):
        graftkit.components("memories")
    with pytest.raises(GraftkitError, match="backbone.kind: required"):
        graftkit.load_backbone({"source": "tiny-random"})


# -- broken third-party plugins ----------------------------------------------------------------------


def test_plugin_failing_on_import_is_skipped_with_a_warning(fake_entry_points):
    fake_entry_points(
        {
            "broken_import": "raise ImportError('needs a package that is not installed')\n",
            "good": memory_plugin_source("good_memory"),
        }
    )
    with pytest.warns(PluginWarning) as record:
        plugins = Plugins()
    messages = [str(w.message) for w in record if issubclass(w.category, PluginWarning)]
    assert len(messages) == 1
    assert "'broken_import'" in messages[0] and "needs a package that is not installed" in messages[0]
    assert "good_memory" in plugins.registries["memory"].classes
    for kind in KINDS:
        assert BUILTIN_COMPONENTS[kind] <= set(plugins.registries[kind].classes)
    assert "broken_import" not in plugins.info


def test_plugin_failing_in_its_hook_is_skipped_with_a_warning(fake_entry_points):
    fake_entry_points(
        {
            "raises": """
            from graftkit import hookimpl

            @hookimpl
            def register_injectors(register):
                raise RuntimeError("plugin bug")
        """,
            "good": memory_plugin_source("good_memory"),
        }
    )
    with pytest.warns(PluginWarning, match=r"'raises'.*register_injectors.*plugin bug"):
        plugins = Plugins()
    assert BUILTIN_COMPONENTS["injector"] <= set(plugins.registries["injector"].classes)
    assert "good_memory" in plugins.registries["memory"].classes


def test_plugin_with_a_wrong_hook_signature_is_skipped(fake_entry_points):
    fake_entry_points(
        {
            "bad_signature": """
            from graftkit import hookimpl

            @hookimpl
            def register_memories(registrar):
                pass
        """,
        }
    )
    with pytest.warns(PluginWarning, match=r"(?s)'bad_signature'.*registrar"):
        plugins = Plugins()
    assert "bad_signature" not in plugins.info
    assert BUILTIN_COMPONENTS["memory"] <= set(plugins.registries["memory"].classes)


def test_component_without_name_or_config_is_a_plugin_error(isolated):
    class NoConfig:
        name = "no_config"

    class NoName:
        class Config(MemoryConfig):
            pass

    plugins = Plugins(autoload=False)
    with pytest.raises(TypeError, match="'no_config' has no pydantic `Config`"):
        plugins.registries["memory"].register(NoConfig, "p")
    with pytest.raises(TypeError, match="NoName has no string `name`"):
        plugins.registries["memory"].register(NoName, "p")


# -- misspelt hook names (pluggy's check_pending) ------------------------------------------------------

MISSPELT = """
    from graftkit import hookimpl

    @hookimpl
    def register_memory(register):  # misspelt: the hook is register_memories
        raise AssertionError("never called")
"""


def test_pluggy_check_pending_rejects_a_misspelt_hook(isolated):
    """What graftkit builds on: pluggy accepts the registration, check_pending() refuses it."""

    class Misspelt:
        @hookimpl
        def register_memory(self, register):
            pass

    plugins = Plugins(autoload=False)
    plugins.pm.register(Misspelt(), name="misspelt")
    with pytest.raises(pluggy.PluginValidationError, match="unknown hook 'register_memory'"):
        plugins.pm.check_pending()


def test_misspelt_hook_in_an_installed_plugin_warns_and_skips_it(fake_entry_points, capsys):
    """User-facing: one misspelt third-party plugin must not take graftkit down (check_pending would)."""
    fake_entry_points({"misspelt": MISSPELT, "good": memory_plugin_source("good_memory")})
    with pytest.warns(PluginWarning) as record:
        plugins = Plugins()
    (warning,) = [w for w in record if issubclass(w.category, PluginWarning)]
    message = str(warning.message)
    assert "'misspelt'" in message
    assert "unknown hook 'register_memory' (did you mean 'register_memories'?)" in message
    assert "skipped" in message
    assert plugins.pm.get_plugin("misspelt") is None and "misspelt" not in plugins.info
    plugins.pm.check_pending()  # what is left is valid
    assert "good_memory" in plugins.registries["memory"].classes
    # and the command line keeps working
    reset_plugins(None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        assert main(["plugins"]) == 0
    assert "good_memory" in capsys.readouterr().out


def test_misspelt_hook_added_in_code_is_an_error(isolated):
    class Misspelt:
        @hookimpl
        def register_injector(self, register):
            pass

    plugins = Plugins(autoload=False)
    with pytest.raises(GraftkitError, match=r"'sloppy'.*'register_injector' \(did you mean 'register_injectors'\?\)"):
        plugins.add(Misspelt(), "sloppy")
    assert plugins.pm.get_plugin("sloppy") is None
    plugins.pm.check_pending()


# -- autoload switches -------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "loaded"), [(None, True), ("0", True), ("1", False)])
def test_no_plugin_autoload_env(fake_entry_points, monkeypatch, value, loaded):
    fake_entry_points({"ep_plugin": memory_plugin_source("ep_memory")})
    if value is not None:
        monkeypatch.setenv(AUTOLOAD_ENV, value)
    plugins = Plugins()
    assert ("ep_memory" in plugins.registries["memory"].classes) is loaded
    assert ("ep_plugin" in plugins.info) is loaded
    assert BUILTIN_COMPONENTS["memory"] <= set(plugins.registries["memory"].classes)  # built-ins always load


def test_disable_named_plugins_env(fake_entry_points, monkeypatch):
    fake_entry_points({"one": memory_plugin_source("memory_one"), "two": memory_plugin_source("memory_two")})
    monkeypatch.setenv(DISABLE_ENV, " two , unrelated")
    plugins = Plugins()
    assert "memory_one" in plugins.registries["memory"].classes
    assert "memory_two" not in plugins.registries["memory"].classes


def test_entry_point_plugin_info(fake_entry_points):
    fake_entry_points({"ep_plugin": memory_plugin_source("ep_memory", field="rank")})
    plugins = Plugins()
    info = plugins.owner_of("memory", "ep_memory")
    assert info.name == "ep_plugin"
    assert info.distribution == "?"  # a bare EntryPoint has no distribution
    assert plugins.registries["memory"].classes["ep_memory"].Config(rank=3).rank == 3


# -- the real installed third-party package -------------------------------------------------------------


@needs_test_plugin
def test_installed_plugin_registers_through_its_entry_point(isolated):
    plugins = Plugins()
    assert "test_mean" in plugins.registries["memory"].classes
    owner = plugins.owner_of("memory", "test_mean")
    assert owner.name == "test_plugin"
    assert owner.distribution == TEST_PLUGIN_DIST
    assert owner.version == importlib.metadata.version(TEST_PLUGIN_DIST)
    for kind in KINDS:
        assert BUILTIN_COMPONENTS[kind] <= set(plugins.registries[kind].classes)


@needs_test_plugin
def test_installed_plugin_component_works(isolated, tmp_path):
    memory = graftkit.create("memory", "test_mean", dim=3, gain_init=2.0)
    state = memory.init_state(2)
    x = torch.tensor([[[1.0, 2, 3], [3, 4, 5]], [[0, 0, 6], [9, 9, 9]]])
    state = memory.write(x, state, mask=torch.tensor([[True, True], [True, False]]))
    out = memory.read(torch.zeros(2, 4, 3), state)
    assert torch.allclose(out[0], torch.tensor([4.0, 6, 8]).expand(4, 3))
    assert torch.allclose(out[1], torch.tensor([0.0, 0, 12]).expand(4, 3))
    out.sum().backward()
    assert memory.gain.grad is not None

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "schema_version: 1\nbackbone: {kind: llama}\nmemory: {kind: test_mean, gain_init: 0.5}\n"
        "injector: {kind: layer0_soft_prompt}\ndata: {task: babilong}\n"
    )
    assert graftkit.load_recipe(recipe).component_config("memory").gain_init == 0.5
    with pytest.raises(graftkit.RecipeError, match="did you mean 'gain_init'"):
        graftkit.load_recipe(recipe, ["memory.gain=1"])


@needs_test_plugin
def test_installed_plugin_in_the_cli(isolated, capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert any(line.split()[:2] == ["test_mean", f"[{TEST_PLUGIN_DIST}]"] for line in out.splitlines()), out
    assert main(["test-plugin-hello", "--name", "tests"]) == 0
    assert capsys.readouterr().out == "hello from graftkit-test-plugin, tests\n"


@needs_test_plugin
def test_installed_plugin_obeys_the_switches(isolated, monkeypatch):
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    assert "test_mean" not in Plugins().registries["memory"].classes
    monkeypatch.setenv(AUTOLOAD_ENV, "0")
    monkeypatch.setenv(DISABLE_ENV, "test_plugin")
    assert "test_mean" not in Plugins().registries["memory"].classes


# -- `graftkit plugins` ------------------------------------------------------------------------------


def test_cli_plugins_lists_builtins(isolated, capsys):
    reset_plugins(Plugins(autoload=False))
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in out.splitlines():
        if not line.startswith(" "):
            current = line.rstrip(":")
            sections[current] = {}
        else:
            name, owner, *_ = line.split()
            sections[current][name] = owner
    assert set(sections["plugins"]) == set(BUILTIN_PLUGINS.values())
    for kind in KINDS:
        assert sections[kind] == {name: "[graftkit]" for name in BUILTIN_COMPONENTS[kind]}, kind
