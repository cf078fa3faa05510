"""Recipes: every shipped recipe parses; every broken one fails with dotted paths, all at once, exit 2.

The broken corpus lives in tests/recipes_broken/*.yaml. Each file states what it must produce in comment
lines at its top, one per expected problem, in order:

    # error: <dotted.path> | <fragment of the message>

`(file)` as the path means a whole-file problem (malformed YAML, not a mapping) that has no dotted path.
Adding a file to the folder adds a test case.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import graftkit
from graftkit.cli import main
from graftkit.errors import GraftkitError, RecipeError
from graftkit.recipe import resolved_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
BROKEN = sorted((Path(__file__).parent / "recipes_broken").glob("*.yaml"))
EXPECT = re.compile(r"^#\s*error:\s*(?P<path>\S+)\s*\|\s*(?P<fragment>.+?)\s*$")
NO_PATH = "(file)"
BASE = ROOT / "recipes" / "experiments" / "smollm2_titans_layer0.yaml"


def expected_problems(path: Path) -> list[tuple[str, str]]:
    """The (dotted path or '', message fragment) pairs a broken recipe declares in its header."""
    expected = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if m := EXPECT.match(line):
            expected.append(("" if m["path"] == NO_PATH else m["path"], m["fragment"]))
    return expected


def problem_lines(stderr: str, source: str) -> list[str]:
    """The indented `path: message` lines of a RecipeError printed by the CLI."""
    head, *rest = stderr.strip().splitlines()
    assert head == f"graftkit: error: invalid recipe {source}:", stderr
    assert all(line.startswith("  ") for line in rest), stderr
    return [line[2:] for line in rest]


def assert_line_matches(line: str, path: str, fragment: str) -> None:
    if path:
        assert line.startswith(f"{path}: "), f"expected a problem at {path!r}, got {line!r}"
        assert fragment in line, f"expected {fragment!r} in {line!r}"
    else:  # a whole-file problem: the message itself, no dotted path in front
        assert line.startswith(fragment), f"expected {line!r} to start with {fragment!r}"


# -- shipped recipes ---------------------------------------------------------------------------------


def test_recipes_folder_is_not_empty():
    assert len(RECIPES) >= 4, RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_shipped_recipe_is_valid(path):
    recipe = graftkit.load_recipe(path)
    assert recipe.schema_version == 1
    for block in ("backbone", "memory", "injector"):
        spec = getattr(recipe, block)
        cls = graftkit.components(block)[spec.kind]
        config = recipe.component_config(block)
        assert isinstance(config, cls.Config)
        # every option written in the recipe reached the component's Config unchanged
        dumped = config.model_dump()
        for key, value in spec.options().items():
            assert dumped[key] == value, (block, key)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_cli_validate_accepts_shipped_recipe(path, capsys):
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: ok"), out


LOADED = {p: graftkit.load_recipe(p) for p in RECIPES}
INFERENCE_ONLY = {"write_floor"}  # read at inference only: a graft loads whole whatever its value
SECOND_RUNS = [p for p, recipe in LOADED.items() if recipe.train.init_from]


def test_some_shipped_recipes_are_second_runs():
    assert len(SECOND_RUNS) >= 2, SECOND_RUNS


@pytest.mark.parametrize("path", SECOND_RUNS, ids=lambda p: p.name)
def test_a_second_run_starts_from_a_shipped_recipe_with_the_same_graft(path):
    """`train.init_from: runs/X` must name the output of a shipped recipe whose graft has the same
    components and options (but for inference-only settings), so its tensors load whole; and whose
    training data it repeats (it may add lengths), so the cache serves it."""
    second = LOADED[path]
    firsts = [recipe for recipe in LOADED.values() if recipe.output_dir == second.train.init_from]
    assert len(firsts) == 1, f"{path.name}: init_from {second.train.init_from} is the output of {len(firsts)} recipes"
    first = firsts[0]
    for block in ("backbone", "memory", "injector"):
        options = [recipe.component_config(block).model_dump(exclude=INFERENCE_ONLY) for recipe in (first, second)]
        assert options[0] == options[1], (path.name, block)
    varying = {"train_lengths", "train_samples"}
    assert first.task_configs()[0].model_dump(exclude=varying) == second.task_configs()[0].model_dump(exclude=varying), path.name
    for length in first.task_configs()[0].train_lengths:
        assert length in second.task_configs()[0].train_lengths, (path.name, length)
        assert first.task_configs()[0].samples_for(length) == second.task_configs()[0].samples_for(length), (path.name, length)


# -- the default recipe and the component defaults ---------------------------------------------------------

DEFAULT = ROOT / "recipes" / "smollm2_linear_mid_layer.yaml"
#: The graft the `make train` default was measured with (BENCHMARKS.md). Its recipe writes only what differs from
#: the component defaults: a changed default must not change it unnoticed.
MEASURED = {
    "backbone": {"kind": "llama", "source": "smollm2-135m-instruct", "revision": None, "dtype": "float32", "quantize": None, "seed": 0},
    "memory": {
        "kind": "linear",
        "dim": None,
        "write_layer": 8,
        "segment_tokens": 1024,
        "standardize": True,
        "heads": 8,
        "dim_head": 64,
        "chunk_size": 64,
        "decay": False,
        "key_span": 6,
        "value_span": 1,
        "value_offset": 0,
        "gate_span": 4,
        "write_floor": 0.3,
    },
    "injector": {
        "kind": "mid_layer",
        "heads": 8,
        "dim_head": 64,
        "gate": "token",
        "gate_init": 0.0,
        "layer": 7,
        "num_tokens": 0,
        "direct_read": True,
    },
}


def test_the_default_recipe_builds_the_measured_graft():
    resolved = resolved_recipe(graftkit.load_recipe(DEFAULT))
    for block, options in MEASURED.items():
        assert resolved[block] == options, block


@pytest.mark.parametrize("block", ["memory", "injector"])
def test_the_default_recipe_writes_only_what_differs_from_the_component_defaults(block):
    spec = getattr(graftkit.load_recipe(DEFAULT), block)
    fields = graftkit.components(block)[spec.kind].Config.model_fields
    same = [key for key, value in spec.options().items() if fields[key].get_default(call_default_factory=True) == value]
    assert not same, f"{DEFAULT.name}: {block} writes its defaults {same}"


#: A run's recipe.yaml as runs recorded it before they wrote every option: the options its recipe set.
SAVED_BEFORE = {
    "schema_version": 1,
    "backbone": {"kind": "llama", "source": "tiny-random"},
    "memory": {"kind": "linear", "heads": 2, "dim_head": 16, "write_layer": 1},
    "injector": {"kind": "mid_layer", "layer": 1, "heads": 2},
    "data": [{"task": "babilong", "tasks": ["qa1"], "train_lengths": ["0k"], "eval_lengths": ["0k"]}],
    "train": {"steps": 4, "batch_size": 2},
    "output_dir": "runs/saved_before",
}
FORMER = {"memory": {"key_span": 1, "gate_span": 1, "write_floor": 0.0}, "injector": {"num_tokens": 16, "direct_read": False, "gate": "scalar"}}


def saved_run(folder: Path) -> Path:
    """A run folder (it has checkpoints/) whose recipe.yaml is SAVED_BEFORE."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(SAVED_BEFORE))
    return folder / "recipe.yaml"


def test_a_run_saved_before_runs_recorded_every_option_is_read_with_the_defaults_it_was_trained_with(tmp_path):
    path = saved_run(tmp_path / "run")
    recipe = graftkit.load_recipe(path)
    for block, former in FORMER.items():
        assert graftkit.components(block)[SAVED_BEFORE[block]["kind"]].Config.former_defaults == former
        config = recipe.component_config(block)
        assert {key: getattr(config, key) for key in former} == former, block
        assert {key: getattr(recipe, block).options()[key] for key in former} == former  # what build_graft builds from
    # an override still changes them, for that use only
    assert graftkit.load_recipe(path, ["memory.write_floor=0.5"]).component_config("memory").write_floor == 0.5
    # the same text as a recipe of one's own takes today's defaults
    mine = tmp_path / "mine.yaml"
    mine.write_text(path.read_text())
    today = graftkit.load_recipe(mine)
    for block, former in FORMER.items():
        defaults = graftkit.components(block)[SAVED_BEFORE[block]["kind"]].Config.model_fields
        assert {key: getattr(today.component_config(block), key) for key in former} == {key: defaults[key].default for key in former}
        assert all(defaults[key].default != value for key, value in former.items())


def test_resuming_a_run_saved_before_compares_what_it_was_trained_with(tmp_path):
    from graftkit.train import check_resumable

    path = saved_run(tmp_path / "run")
    check_resumable(path.parent, resolved_recipe(graftkit.load_recipe(path)))  # its own recipe.yaml: the same graft
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump(SAVED_BEFORE))  # the recipe text, read with today's defaults: another graft
    with pytest.raises(GraftkitError, match=r"injector.direct_read: False in the run, True now"):
        check_resumable(path.parent, resolved_recipe(graftkit.load_recipe(mine)))


# -- broken recipes ----------------------------------------------------------------------------------


def test_broken_corpus_covers_the_error_families():
    names = {p.stem for p in BROKEN}
    for required in (
        "typo_top_level_key",
        "typo_nested_key",
        "wrong_types",
        "unknown_memory_kind",
        "unknown_key_in_component",
        "missing_required",
        "malformed_yaml",
        "not_a_mapping",
        "three_problems",
    ):
        assert required in names
    for path in BROKEN:
        assert expected_problems(path), f"{path.name} declares no '# error: path | fragment' line"


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.stem)
def test_broken_recipe_raises_recipe_error_with_every_problem(path):
    expected = expected_problems(path)
    with pytest.raises(RecipeError) as info:
        graftkit.load_recipe(path)
    problems = dict(info.value.problems)
    assert len(problems) == len(info.value.problems), "one problem per path"
    assert sorted(problems) == sorted(p for p, _ in expected), info.value.problems  # order is not part of the contract
    for dotted, fragment in expected:
        assert fragment in problems[dotted], (dotted, problems[dotted])
    assert info.value.exit_code == 2


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.stem)
def test_cli_validate_broken_recipe(path, capsys):
    expected = expected_problems(path)
    assert main(["validate", str(path)]) == 2  # returns: no exception escapes main()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Traceback" not in captured.err
    lines = problem_lines(captured.err, str(path))
    assert len(lines) == len(expected), captured.err  # one line per problem, all reported at once
    for dotted, fragment in expected:
        matching = [line for line in lines if line.startswith(f"{dotted}: ")] if dotted else lines
        assert len(matching) == 1, (dotted, captured.err)
        assert_line_matches(matching[0], dotted, fragment)


def test_three_problems_from_both_passes_are_reported_together(capsys):
    path = Path(__file__).parent / "recipes_broken" / "three_problems.yaml"
    assert main(["validate", str(path)]) == 2
    lines = problem_lines(capsys.readouterr().err, str(path))
    assert sorted(line.split(":")[0] for line in lines) == ["injector.num_token", "memory.kind", "train.lr"]


def test_unknown_kind_lists_installed_components():
    path = Path(__file__).parent / "recipes_broken" / "unknown_memory_kind.yaml"
    with pytest.raises(RecipeError) as info:
        graftkit.load_recipe(path)
    ((dotted, message),) = info.value.problems
    assert dotted == "memory.kind"
    for name in ("titans", "linear", "attention_slots"):
        assert name in message.split("installed:")[1]


def test_not_utf8_file(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("schema_version: 1\n# caf\xe9\n".encode("latin-1"))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not a UTF-8 text file" in err and str(path) in err


def test_a_recipe_or_override_nested_too_deeply_is_a_message(tmp_path, capsys):
    deep = "[" * 5000 + "]" * 5000
    path = tmp_path / "deep.yaml"
    path.write_text(f"schema_version: 1\nmemory: {deep}\n")
    assert main(["validate", str(path)]) == 2
    assert "nested too deeply to be a recipe" in capsys.readouterr().err
    assert main(["validate", str(ROOT / "recipes" / "smollm2_linear_mid_layer.yaml"), f"train.steps={deep}"]) == 2
    assert "train.steps: override train.steps=...: the value is nested too deeply" in capsys.readouterr().err


def test_missing_file(tmp_path, capsys):
    path = tmp_path / "no_such_recipe.yaml"
    with pytest.raises(RecipeError, match="no_such_recipe.yaml"):
        graftkit.load_recipe(path)
    assert main(["validate", str(path)]) == 2
    captured = capsys.readouterr()
    assert f"recipe file {path} does not exist" in captured.err
    assert "Traceback" not in captured.err


def test_directory_is_not_a_recipe(tmp_path, capsys):
    assert main(["validate", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err


# -- overrides ---------------------------------------------------------------------------------------


def test_overrides_are_applied_and_typed():
    recipe = graftkit.load_recipe(
        BASE,
        [
            "train.lr=3e-4",  # YAML 1.1 reads this as a string: the schema makes it a float
            "train.steps=10",
            "data.tasks=[qa1, qa2]",
            "output_dir=runs/override test",
            "memory.write_layer=3",
            "injector.gate_init=-2.5",
        ],
    )
    assert recipe.train.lr == pytest.approx(3e-4) and type(recipe.train.lr) is float
    assert recipe.train.steps == 10 and type(recipe.train.steps) is int
    assert recipe.task_configs()[0].tasks == ["qa1", "qa2"]
    assert recipe.output_dir == "runs/override test"
    assert recipe.component_config("memory").write_layer == 3
    assert recipe.component_config("injector").gate_init == -2.5
    # untouched values keep what the file says
    assert recipe.train.batch_size == 8 and recipe.memory.kind == "titans"


def test_training_samples_per_length():
    recipe = graftkit.load_recipe(BASE, ["data.train_lengths=[0k, 1k, 4k]", "data.train_samples={0k: 50, 1K: 40, 4000: 3}"])
    assert [recipe.task_configs()[0].samples_for(length) for length in ("0k", "1k", "4k")] == [50, 40, 3]
    assert graftkit.load_recipe(BASE, ["data.train_samples=7"]).task_configs()[0].samples_for("4k") == 7


def test_override_does_not_touch_the_file():
    before = BASE.read_text()
    assert graftkit.load_recipe(BASE, ["train.lr=3e-4"]).train.lr == pytest.approx(3e-4)
    assert BASE.read_text() == before
    assert graftkit.load_recipe(BASE).train.lr == pytest.approx(1e-3)


def test_override_can_add_a_key_the_file_does_not_set():
    recipe = graftkit.load_recipe(BASE, ["train.warmup_steps=7", "data.babi_dir=/tmp/babi"])
    assert recipe.train.warmup_steps == 7
    assert recipe.task_configs()[0].babi_dir == "/tmp/babi"


def test_cli_validate_with_override(capsys):
    assert main(["validate", str(BASE), "train.lr=3e-4", "memory.write_layer=2"]) == 0
    assert "ok" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "dotted", "fragment"),
    [
        ("train.lr=abc", "train.lr", "valid number"),
        ("train.lr.x=1", "train.lr", "cannot set 'x' inside a float"),
        ("nokey", "override 'nokey'", "expected dotted.key=value"),
        ("=3", "override '=3'", "expected dotted.key=value"),
        ("train..lr=1", "override 'train..lr=1'", "expected dotted.key=value"),
        ("train.lrr=1", "train.lrr", "did you mean 'lr'?"),
        ("memory.kind=titan", "memory.kind", "did you mean 'titans'?"),
        ("memory.heads=many", "memory.heads", "valid integer"),
        ("data.train_samples=0", "data.train_samples", "positive integer"),
        ("data.train_samples={0k: 10, 1k: -1}", "data.train_samples", "positive integer"),
        ("data.train_samples={0k: 10}", "data.train_samples", "train_lengths is ['0k', '1k']"),
        ("data.train_samples={0k: 10, 1k: 5, 4k: 2}", "data.train_samples", "names the lengths ['0k', '1k', '4k']"),
    ],
)
def test_bad_override(override, dotted, fragment, capsys):
    with pytest.raises(RecipeError) as info:
        graftkit.load_recipe(BASE, [override])
    assert [p for p, _ in info.value.problems] == [dotted]
    assert fragment in info.value.problems[0][1]
    assert main(["validate", str(BASE), override]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = problem_lines(err, str(BASE))
    assert line.startswith(f"{dotted}: ") and fragment in line


def test_bad_overrides_are_reported_together():
    with pytest.raises(RecipeError) as info:
        graftkit.load_recipe(BASE, ["nokey", "train.lr=abc", "train.steps=0"])
    paths = [p for p, _ in info.value.problems]
    assert sorted(paths) == ["override 'nokey'", "train.lr", "train.steps"]


def test_the_recall_stage_is_refused_with_training_stories_in_other_words(capsys):
    assert main(["validate", str(ROOT / "recipes" / "experiments" / "smollm2_linear_recall.yaml"), "data.train_vocabulary=varied"]) == 2
    assert "train.recall_steps: classifies into bAbI's answers" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, field",
    [("memory.write_layer=31", "memory.write_layer"), ("injector.layer=30", "injector.layer"), ("injector.layer=-31", "injector.layer")],
)
def test_a_layer_outside_a_known_backbone_is_refused_at_validation(override, field, capsys):
    path = str(ROOT / "recipes" / "smollm2_linear_mid_layer.yaml")
    assert main(["validate", path, override]) == 2
    assert f"{field}: " in capsys.readouterr().err
    assert main(["validate", path, "memory.write_layer=30", "injector.layer=-30"]) == 0  # the last ones that exist
