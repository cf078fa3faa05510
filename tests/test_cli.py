"""The `graftkit` command line: usage, exit codes, and user errors printed as messages, never tracebacks.

Most tests call `graftkit.cli.main([...])` in-process; a few run the installed entry point (and
`python -m graftkit.cli`) in subprocesses, started together to keep the suite fast.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from graftkit import hookimpl
from graftkit.cli import main
from graftkit.errors import GraftkitError, RecipeError, StateError
from graftkit.plugins import Plugins, reset_plugins

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "experiments" / "smollm2_titans_layer0.yaml"
THREE_PROBLEMS = ROOT / "tests" / "recipes_broken" / "three_problems.yaml"
COMMANDS = ("validate", "plugins", "train", "eval")


def graftkit_command() -> list[str]:
    script = Path(sys.executable).with_name("graftkit")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "graftkit.cli"]


# -- subprocesses (the real entry point, a fresh interpreter) -------------------------------------------

RUNS = {
    "broken": graftkit_command() + ["validate", str(THREE_PROBLEMS)],
    "missing": [sys.executable, "-m", "graftkit.cli", "validate", str(ROOT / "no" / "such_recipe.yaml")],
    "override": graftkit_command() + ["validate", str(RECIPE), "train.steps=5", "train.lr.x=1", "nokey"],
}


@pytest.fixture(scope="module")
def runs():
    """Run every command in RUNS concurrently; {name: CompletedProcess}."""
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for name, cmd in RUNS.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(RUNS[name], proc.returncode, out, err)
    return results


def test_subprocess_broken_recipe(runs):
    result = runs["broken"]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"graftkit: error: invalid recipe {THREE_PROBLEMS}:"
    assert len(lines) == 4, result.stderr  # the header plus one line per problem
    body = "\n".join(lines[1:])
    assert "  train.lr: Input should be a valid number" in body
    assert "  memory.kind: unknown memory 'titan'; did you mean 'titans'?" in body
    assert "  injector.num_token: unknown key; did you mean 'num_tokens'?" in body


def test_subprocess_missing_file(runs):
    result = runs["missing"]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"recipe file {ROOT / 'no' / 'such_recipe.yaml'} does not exist" in result.stderr


def test_subprocess_bad_overrides(runs):
    result = runs["override"]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "  train.lr: override 'train.lr.x=1': cannot set 'x' inside a float" in result.stderr
    assert "  override 'nokey': expected dotted.key=value" in result.stderr


# -- usage -------------------------------------------------------------------------------------------


def test_no_command_prints_usage_and_exits_2(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: graftkit")
    for command in COMMANDS:
        assert command in out


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "Graft a trainable memory onto a frozen LLM" in out
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: graftkit {command}")


def test_unknown_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_validate_needs_a_recipe(capsys):
    with pytest.raises(SystemExit) as info:
        main(["validate"])
    assert info.value.code == 2
    assert "the following arguments are required: recipe" in capsys.readouterr().err


def test_validate_ok_exit_0(capsys):
    assert main(["validate", str(RECIPE)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{RECIPE}: ok (backbone llama, memory titans, injector layer0_soft_prompt, tasks babilong)\n"
    assert captured.err == ""


# -- how command errors become exit codes ---------------------------------------------------------------


class Failing:
    """A plugin adding a command that raises what it is told to."""

    @hookimpl
    def register_commands(self, cli):
        p = cli.add_parser("fail")
        p.add_argument("what")
        p.set_defaults(func=self.run)

    @staticmethod
    def run(args):
        if args.what == "graftkit":
            raise GraftkitError("something the user can fix")
        if args.what == "state":
            raise StateError("state file belongs to another memory")
        if args.what == "recipe":
            raise RecipeError([("train.lr", "must be positive")], source="r.yaml")
        if args.what == "interrupt":
            raise KeyboardInterrupt
        if args.what == "code":
            return 3
        if args.what == "bug":
            raise ZeroDivisionError("a bug, not a user error")
        return None


@pytest.fixture
def failing_command():
    plugins = Plugins(autoload=False)
    plugins.add(Failing(), "failing")
    old = reset_plugins(plugins)
    yield
    reset_plugins(old)


@pytest.mark.parametrize(
    ("what", "code", "stderr"),
    [
        ("graftkit", 1, "graftkit: error: something the user can fix\n"),
        ("state", 1, "graftkit: error: state file belongs to another memory\n"),
        ("recipe", 2, "graftkit: error: invalid recipe r.yaml:\n  train.lr: must be positive\n"),
        ("interrupt", 130, "graftkit: interrupted\n"),
        ("code", 3, ""),
        ("nothing", 0, ""),
    ],
)
def test_exit_codes(failing_command, capsys, what, code, stderr):
    assert main(["fail", what]) == code
    assert capsys.readouterr().err == stderr


def test_internal_bugs_are_not_disguised(failing_command):
    """Only GraftkitError is a user message; anything else is a bug and keeps its traceback."""
    with pytest.raises(ZeroDivisionError):
        main(["fail", "bug"])
