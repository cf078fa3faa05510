"""Recipes: YAML files that compose a backbone, a memory and an injector, and say how to train them.

Validation has two passes: the file's own schema (this module), then each component block against
its component's `Config`. Every problem is collected and reported at once, one `dotted.path: message`
line each (`RecipeError`, exit code 2).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from graftkit.config import Config, with_former_defaults
from graftkit.data.tasks import DataError, length_label
from graftkit.errors import RecipeError, UnknownComponentError
from graftkit.injector import reads_each_position
from graftkit.memory import Memory
from graftkit.plugins import get_plugins
from graftkit.run_dir import is_run
from graftkit.task import TaskConfig

COMPONENT_BLOCKS = {"backbone": "backbone", "memory": "memory", "injector": "injector"}


class ComponentBlock(BaseModel):
    """`kind` picks the component; every other key is checked against that component's Config."""

    model_config = ConfigDict(extra="allow")

    kind: str = Field(description="Registered component name (see `graftkit plugins`).")

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TaskBlock(BaseModel):
    """`task` picks the task; every other key is checked against that task's Config."""

    model_config = ConfigDict(extra="allow")

    task: str = Field(description="Registered task name (see `graftkit plugins`): babilong, jsonl, profile, ...")

    def options(self) -> dict[str, Any]:
        return {"task": self.task, **(self.model_extra or {})}


def _label(length: str) -> str:
    try:
        return length_label(length)
    except DataError:
        return str(length)  # an invalid label is reported where lengths are used


class TrainConfig(Config):
    steps: int = Field(600, gt=0, description="Optimizer steps.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(30, ge=0, description="Linear warm-up steps before the cosine decay.")
    batch_size: int = Field(8, gt=0, description="Samples per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(0, description="Seed of initialisation and sample order.")
    eval_every: int = Field(200, gt=0, description="Evaluate (and checkpoint) every N steps.")
    log_every: int = Field(10, gt=0, description="Write a metrics line every N steps.")
    read_loss: float = Field(
        0.0,
        ge=0,
        description="Weight of an auxiliary loss on the memory's per-position reads of the question: decoded by the "
        "backbone's own final norm and LM head, some question position should name the answer's first token. "
        "Needs an injector that reads the memory at every position (direct_read). 0 = off; metrics.jsonl logs it as read_loss.",
    )
    init_from: str | None = Field(
        None,
        description="Start from these graft tensors instead of a fresh initialisation: a safetensors file, a checkpoint "
        "folder, an export, or a run directory (its best checkpoint). Every tensor in it must fit this graft; graft "
        "tensors it lacks keep their initialisation. With the recall stage or loss, the recall head saved beside "
        "those tensors (by a run that trained with recall_weight) is loaded too when it was trained over the same "
        "answers with the same recall_query. Ignored by --resume.",
    )
    recall_steps: int = Field(
        0,
        ge=0,
        description="Steps of a recall stage before the end-to-end steps: the memory and the injector's query learn to "
        "give back the answer (a linear head of the stage's own classifies the read at each question position; the "
        "distributions are mixed), at train.lr, constant. Needs an injector that reads the memory at every position "
        "(direct_read). 0 = off; skipped by --resume. metrics.jsonl logs recall_step, recall_loss, recall_acc and, at the end "
        "of the stage, recall_eval (recall accuracy on the evaluation samples).",
    )
    recall_query: Literal["mixture", "last_word"] = Field(
        "mixture",
        description="What the recall stage classifies: every question position's read, their distributions mixed "
        "(mixture), or only the read at the question's last word (last_word; often the name asked about).",
    )
    recall_lengths: list[str] = Field(
        default_factory=list,
        description="The training lengths the recall stage draws its batches from (each one of data.train_lengths); "
        "empty = all of them (long contexts make recall steps slow: a 4k write costs several times a 1k one).",
    )
    recall_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the recall loss kept on during the end-to-end steps: the recall head (the one the recall "
        "stage trained, or a new one) goes on classifying the memory's reads of each training question the "
        "recall_query way, so the memory keeps what the stage taught it while the rest learns to use it. Needs an "
        "injector that reads the memory at every position (direct_read). 0 = off; metrics.jsonl logs aux_recall_loss and "
        "aux_recall_acc.",
    )
    write_cost: float = Field(
        0.0,
        ge=0,
        description="Weight of a cost on writing during the end-to-end steps: the memory's write mass (its per-token "
        "write strengths summed over each context, averaged over rows and heads; a token written at full strength "
        "counts 1) times this weight is added to the loss, so the memory learns to write only what answers need and "
        "a longer context wears it less. Needs a memory with per-token write strengths (linear: β; titans: θ). 0 = off; "
        "metrics.jsonl logs write_mass.",
    )
    background_cost: float = Field(
        0.0,
        ge=0,
        description="Weight of a cost on writing book text during the end-to-end steps: like write_cost, but the "
        "strengths are summed only over context tokens outside the episode's facts (tasks that build their "
        "contexts know where they put them; inference needs no such labels), so the memory learns to leave book text out with no cost on "
        "writing facts. Needs a memory with per-token write strengths. 0 = off; metrics.jsonl logs background_mass.",
    )
    preserve_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of a loss that keeps the grafted model the backbone where its memory is not asked for: "
        "general prompts, each followed by the bare backbone's greedy answer, and passages of the training books "
        "(all disjoint from what `graftkit eval`'s preservation row scores) are read with the batch's memory states, "
        "and the grafted model's next-token distributions (over the answer; over the whole passage) are pulled to "
        "the bare backbone's (KL). 0 = off; metrics.jsonl logs preserve_kl.",
    )
    answer_space: bool = Field(
        False,
        description="Train each answer as it reads inside a sentence, after a space, so its tokens are the ones the "
        "sessions hold (a value copied from memory is spelled as it was written); answers are compared stripped.",
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="Graft tensors held fixed during training, by name or dotted prefix (memory, injector.to_query): "
        "e.g. a memory trained by an earlier stage and loaded with init_from. Each entry must name some graft tensor.",
    )
    cache_hidden_states: bool = Field(True, description="Cache turn-1 hidden states on disk (exact: the backbone is frozen).")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="accelerate mixed precision; auto = bf16 on a CUDA device that supports it, else no."
    )


class Recipe(Config):
    schema_version: Literal[1] = Field(description="Recipe format version.")
    backbone: ComponentBlock = Field(description="The frozen model: `kind` (its architecture) and its options, below.")
    memory: ComponentBlock = Field(description="The memory: `kind` and that memory's options, below.")
    injector: ComponentBlock = Field(description="How the memory's reads reach the backbone: `kind` and that injector's options, below.")
    data: list[TaskBlock] = Field(
        min_length=1,
        description="The tasks to train and evaluate on: one block (a mapping) or a list of blocks, each "
        "`{task: NAME, weight: ..., ...its options}`.",
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="How the graft is trained, below.")
    output_dir: str = Field("runs/graft", description="Where checkpoints, metrics and plots are written.")

    # filled by the second pass: each block validated by its component's (or task's) own Config
    _configs: dict[str, BaseModel] = {}
    _tasks: list[TaskConfig] = []

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    def component_config(self, kind: str) -> BaseModel:
        return self._configs[kind]

    def task_configs(self) -> list[TaskConfig]:
        """Each data block validated by its task's Config, in order."""
        return list(self._tasks)


def load_recipe(path: str | Path, overrides: Iterable[str] = (), training: bool = True, saved: bool | None = None) -> Recipe:
    """Read, override and validate a recipe file; raises RecipeError listing every problem.

    `training=False` (evaluating or exporting a trained run) skips the checks that only concern training:
    whether the objectives it asks for suit its injector, memory and tasks. `saved`: the file is a training
    run's own recipe.yaml (default: when it is named so and its folder holds a run), read as `saved_recipe`
    says."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError([("", f"recipe file {path} does not exist")], source=str(path))
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise RecipeError([("", f"malformed YAML{where}: {getattr(exc, 'problem', exc)}")], source=str(path)) from None
    except UnicodeDecodeError:
        raise RecipeError([("", "not a UTF-8 text file")], source=str(path)) from None
    except RecursionError:
        raise RecipeError([("", "nested too deeply to be a recipe")], source=str(path)) from None
    if not isinstance(raw, dict):
        raise RecipeError([("", "a recipe is a YAML mapping (key: value lines)")], source=str(path))
    if saved is None:
        saved = path.name == "recipe.yaml" and is_run(path.parent)
    return validate_recipe(raw, overrides, source=str(path), training=training, saved=saved)


def validate_recipe(raw: dict, overrides: Iterable[str] = (), source: str | None = None, training: bool = True, saved: bool = False) -> Recipe:
    """A Recipe from a raw mapping (after `overrides`), every component and task block checked against its Config;
    `saved`: a run's own recipe.yaml (see `saved_recipe`)."""
    problems: list[tuple[str, str]] = []
    single = isinstance(raw.get("data"), dict)  # one block written as a mapping: its paths read `data.key`
    if single:
        raw = {**raw, "data": [raw["data"]]}
    for item in overrides:
        problems += apply_override(raw, item)
    if saved:
        raw = saved_recipe(raw)
    try:
        recipe = Recipe.model_validate(raw)
        specs = {block: getattr(recipe, block) for block in COMPONENT_BLOCKS}
    except ValidationError as exc:
        recipe = None
        problems += pydantic_problems(exc, Recipe)
        specs = {}  # still run the second pass on every block that passed the first, to report all errors at once
        for block in COMPONENT_BLOCKS:
            try:
                specs[block] = ComponentBlock.model_validate(raw.get(block))
            except ValidationError:
                pass  # already reported by the first pass
    configs: dict[str, BaseModel] = {}  # only blocks that validated: any other left a problem
    for block, spec in specs.items():
        config, errors = validate_block(block, spec)
        problems += errors
        if config is not None:
            configs[block] = config
    task_configs, errors = validate_tasks(raw.get("data"), recipe, single)
    problems += errors
    if training and recipe is not None and "injector" in configs and not errors:
        problems += _cross_checks(recipe, configs["injector"], task_configs)
    if single:  # the user wrote one mapping: name its keys `data.key`, as written
        problems = [(re.sub(r"^data\.0(?=\.|$)", "data", path), message) for path, message in problems]
    if problems or recipe is None:
        raise RecipeError(problems, source)
    recipe._configs = configs
    recipe._tasks = task_configs
    return recipe


def saved_recipe(raw: dict) -> dict:
    """A run's saved recipe with what it was trained with: each component block gets the former default
    (`Config.former_defaults`) of every option it does not record. A run saved since `resolved_recipe` records
    every option, so only older runs, whose recipe.yaml holds just what their recipe set, are filled."""
    registries = get_plugins().registries
    filled = dict(raw)
    for block, kind in COMPONENT_BLOCKS.items():
        spec = raw.get(block)
        if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
            continue
        cls = registries[kind].classes.get(spec["kind"])
        if cls is not None:
            filled[block] = with_former_defaults(cls.Config, spec)
    return filled


def resolved_recipe(recipe: Recipe) -> dict:
    """The recipe as a run's recipe.yaml records it: every option of its backbone, memory and injector written
    out, defaults included, so that the run is read as it was trained after a default changes."""
    resolved = recipe.model_dump(mode="json")
    for block in COMPONENT_BLOCKS:
        resolved[block] = {"kind": getattr(recipe, block).kind, **recipe.component_config(block).model_dump(mode="json")}
    return resolved


def validate_tasks(data: Any, recipe: Recipe | None, single: bool = False) -> tuple[list[TaskConfig], list[tuple[str, str]]]:
    """Each data block against its task's Config; paths are `data.key` for a recipe that wrote one block as a
    mapping (`single`), `data.N.key` in a list."""
    registry = get_plugins().registries["task"]
    blocks = recipe.data if recipe is not None else _blocks(data)
    single = single and len(blocks) == 1
    configs, problems = [], []
    for index, block in enumerate(blocks):
        where = "data" if single else f"data.{index}"
        try:
            cls = registry.get(block.task)
        except UnknownComponentError as exc:
            problems.append((f"{where}.task", str(exc)))
            continue
        try:
            configs.append(cls.Config.model_validate(block.options()))
        except ValidationError as exc:
            problems += pydantic_problems(exc, cls.Config, prefix=where)
    return configs, problems


def _blocks(data: Any) -> list[TaskBlock]:
    """The blocks of a `data` value that failed the first pass, as far as they parse (for the second pass)."""
    items = [data] if isinstance(data, dict) else data if isinstance(data, list) else []
    blocks = []
    for item in items:
        try:
            blocks.append(TaskBlock.model_validate(item))
        except ValidationError:
            pass  # already reported by the first pass
    return blocks


def writes_with_strengths(memory_class) -> bool:
    """Whether a memory class reports per-token write strengths (overrides `Memory.write_strengths`)."""
    return getattr(memory_class, "write_strengths", Memory.write_strengths) is not Memory.write_strengths


def _cross_checks(recipe: Recipe, injector_config: BaseModel, task_configs: list[TaskConfig]) -> list[tuple[str, str]]:
    """Problems that involve more than one block."""
    tasks = get_plugins().registries["task"]
    injector = get_plugins().registries["injector"].get(recipe.injector.kind)
    problems = []
    for field, value in (
        ("read_loss", recipe.train.read_loss),
        ("recall_steps", recipe.train.recall_steps),
        ("recall_weight", recipe.train.recall_weight),
    ):
        if value > 0 and not reads_each_position(injector, injector_config):
            problems.append(
                (
                    f"train.{field}",
                    f"needs an injector that reads the memory at every position; {recipe.injector.kind!r} as configured "
                    f"does not (set injector.direct_read: true, or train.{field}: 0)",
                )
            )
    for field in ("write_cost", "background_cost"):
        if getattr(recipe.train, field) > 0 and not writes_with_strengths(get_plugins().registries["memory"].get(recipe.memory.kind)):
            problems.append(
                (
                    f"train.{field}",
                    f"memory {recipe.memory.kind!r} has no per-token write strengths to put a cost on (linear and titans have; set train.{field}: 0)",
                )
            )
    for field, need, what in (
        ("recall_steps", "closed_answers", "answers from a closed set to classify reads into"),
        ("recall_weight", "closed_answers", "answers from a closed set to classify reads into"),
        ("background_cost", "marks_facts", "a way to tell fact tokens from background"),
    ):
        lacking = [c.task for c in task_configs if not getattr(tasks.get(c.task), need, False)]
        if getattr(recipe.train, field) > 0 and lacking:
            problems.append(
                (f"train.{field}", f"needs tasks with {what}; task {lacking[0]!r} has none (set train.{field}: 0, or train only on tasks that have)")
            )
    problems += _layer_problems(recipe, injector_config)
    varied = [c.task for c in task_configs if getattr(c, "train_vocabulary", "babi") == "varied"]
    for field in ("recall_steps", "recall_weight"):
        if getattr(recipe.train, field) > 0 and varied:
            problems.append(
                (
                    f"train.{field}",
                    f"classifies into bAbI's answers, but task {varied[0]!r} retells training "
                    "stories in other words (train_vocabulary: varied); set one of them off",
                )
            )
    lengths = {_label(n) for c in task_configs for n in getattr(c, "train_lengths", [])}
    unknown = sorted(set(map(_label, recipe.train.recall_lengths)) - lengths)
    if unknown:
        problems.append(("train.recall_lengths", f"{unknown} are not training lengths of any task (they are: {sorted(lengths)})"))
    return problems


def _layer_problems(recipe: Recipe, injector_config: BaseModel) -> list[tuple[str, str]]:
    """Layer indices outside the backbone, when its adapter knows the layer count without loading it
    (the optional `layer_count` classmethod of the backbone contract, `graftkit.backbone`)."""
    source = recipe.backbone.options().get("source")
    try:
        counter = getattr(get_plugins().registries["backbone"].get(recipe.backbone.kind), "layer_count", None)
    except UnknownComponentError:
        return []  # reported by the second pass
    count = counter(source) if counter is not None and isinstance(source, str) else None
    if count is None:
        return []
    problems = []
    memory_layer = recipe.memory.options().get("write_layer")
    if isinstance(memory_layer, int) and not 0 <= memory_layer <= count:
        problems.append(("memory.write_layer", f"{memory_layer} is outside 0..{count} ({source} has {count} decoder layers)"))
    layer, layers = getattr(injector_config, "layer", None), getattr(injector_config, "layers", None)
    for name, value in [("injector.layer", layer)] + [(f"injector.layers.{i}", v) for i, v in enumerate(layers or [])]:
        if isinstance(value, int) and not -count <= value < count:
            problems.append((name, f"{value} is outside 0..{count - 1} ({source} has {count} decoder layers; negative counts from the end)"))
    return problems


def validate_block(block: str, spec: ComponentBlock) -> tuple[BaseModel | None, list[tuple[str, str]]]:
    registry = get_plugins().registries[block]
    try:
        cls = registry.get(spec.kind)
    except UnknownComponentError as exc:
        return None, [(f"{block}.kind", str(exc))]
    try:
        return cls.Config.model_validate(spec.options()), []
    except ValidationError as exc:
        return None, pydantic_problems(exc, cls.Config, prefix=block)


def apply_override(raw: dict, item: str) -> list[tuple[str, str]]:
    """Apply one `dotted.key=value` (value parsed as YAML) to the raw recipe mapping."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        return [(f"override {item!r}", "expected dotted.key=value, e.g. train.lr=3e-4")]
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # not YAML: keep the literal string, the schema decides
    except RecursionError:
        return [(key, f"override {key}=...: the value is nested too deeply")]
    parts = key.split(".")
    node: dict | list = raw
    for depth, part in enumerate(parts[:-1]):
        child = _child(node, part)
        if isinstance(child, list) and len(child) == 1 and not parts[depth + 1].isdigit():
            child = child[0]  # `data.key=...` reaches into a list of one block
        if not isinstance(child, (dict, list)):
            return [(".".join(parts[: depth + 1]), f"override {item!r}: cannot set {parts[depth + 1]!r} inside a {type(child).__name__}")]
        node = child
    if isinstance(node, list):
        if not (parts[-1].isdigit() and int(parts[-1]) < len(node)):
            return [(key, f"override {item!r}: no item {parts[-1]} in a list of {len(node)}")]
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value
    return []


def _child(node: dict | list, part: str):
    """The child `part` names in a mapping (created empty if missing) or, by index, in a list (None if out of range)."""
    if isinstance(node, list):
        return node[int(part)] if part.isdigit() and int(part) < len(node) else None
    return node.setdefault(part, {})


def pydantic_problems(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    """One (dotted.path, message) per pydantic error, with a suggestion for misspelt keys."""
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        path = ".".join(([prefix] if prefix else []) + loc)
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            fields = _fields_at(model, loc[:-1])
            hint = difflib.get_close_matches(loc[-1], fields, n=1)
            message = "unknown key" + (f"; did you mean {hint[0]!r}?" if hint else f" (allowed: {', '.join(fields)})")
        elif err["type"] == "missing":
            message = "required key is missing"
        elif "input" in err:
            message += f" (got {err['input']!r})"
        problems.append((path, message))
    return problems


def _fields_at(model: type[BaseModel], parents: list[str]) -> list[str]:
    """Field names of the (nested) model at `parents`, for suggestions."""
    for name in parents:
        field = model.model_fields.get(name)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
