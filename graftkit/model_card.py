"""The README.md model card of an exported graft (`graftkit.export`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from graftkit.plugins import get_plugins
from graftkit.task import Task


def model_card(
    config: dict,
    tensors: Mapping[str, torch.Tensor],
    recipe_yaml: str | None,
    evaluation: str | None,
    source: str | None,
    out: Path,
    files: Mapping[str, str],
) -> str:
    """The card's markdown; `files` names each file of the export and what it holds."""
    manifest, plugins = config["backbone_manifest"], config["plugins"]
    mem, inj = config["memory"], config["injector"]
    params = sum(t.numel() for t in tensors.values())
    step = config["checkpoint"].get("step")
    tasks = [t for t in config["tasks"] if isinstance(t, dict)]
    statement, question = _demo(tasks)
    prompts = list(config.get("prompts") or {})
    name = out.name
    standardised = " (standardised per channel)" if mem["config"].get("standardize", True) else ""
    ask = f'ask(graft, "{question}", state)'
    ask_in_prompt = f'ask(graft, "{question}", state, task="{prompts[0]}")  # in a prompt it was trained with' if prompts else None
    lines = [
        f"# graftkit graft: {mem['kind']} memory + {inj['kind']} injector on {manifest['family']} ({manifest['source']})",
        "",
        "A trainable test-time memory grafted onto a frozen language model with "
        "[graftkit](https://pypi.org/project/graftkit/). Turn 1 (`memorize`) runs the frozen backbone over a text "
        f"and writes its layer-{mem['config'].get('write_layer', 0)} hidden states{standardised} into the {mem['kind']} memory; "
        f"turn 2 (`answer`) sees the question alone, and the {inj['kind']} injector feeds what the memory recalls "
        "back into the backbone. The context reaches turn 2 only through the memory state.",
        "",
        f"This directory holds the graft only (memory and injector weights{' and write-layer statistics' if standardised else ''}, "
        f"{params:,} values in {len(tensors)} tensors); the backbone is loaded separately and stays frozen.",
        "",
        "| | |",
        "|---|---|",
        f"| backbone | `{manifest['family']}` from `{manifest['source']}`"
        + (f" (revision `{manifest['revision']}`)" if manifest.get("revision") else "")
        + f", hidden size {manifest['hidden_size']}, {manifest['num_layers']} layers, tokenizer `{manifest['tokenizer']}` |",
        f"| memory | `{mem['kind']}` from {_dist(plugins['memory'])} |",
        f"| injector | `{inj['kind']}` from {_dist(plugins['injector'])} |",
        f"| trained tasks | {'; '.join(_describe(t) for t in tasks) if tasks else 'not recorded'} |",
        f"| task prompts | {', '.join(f'`{p}`' for p in prompts) if prompts else 'none: questions are sent as they are'} |",
        f"| checkpoint | {config['checkpoint'].get('which') or 'n/a'}, step {step if step is not None else 'n/a'} |",
        f"| exported with | graftkit {config['graftkit_version']}, export format {config['format_version']} |",
        "",
        "## Load it",
        "",
        "```python",
        "import graftkit",
        "from graftkit.sessions import ask, memorize, save_state",
        "",
        f'graft = graftkit.load_graft("{name}")  # loads the backbone named above (or pass backbone=...)',
        f'state = memorize(graft, "{statement}")  # turn 1',
        f"print({ask})",
        *([f"print({ask_in_prompt})"] if ask_in_prompt else []),
        'save_state(graft, state, "alice.safetensors")  # one memory per user; load_state(graft, path) reads it back',
        "```",
        "",
        "From the shell:",
        "",
        "```sh",
        f"graftkit memorize {name} --state alice.safetensors notes.txt",
        f'graftkit ask {name} --state alice.safetensors "{question}"' + (f" --task {prompts[0]}" if prompts else ""),
        f"graftkit chat {name} --state alice.safetensors",
        "```",
        "",
        "Loading needs the plugins that provide the components: " + ", ".join(sorted({f"`{p['distribution']}`" for p in plugins.values()})) + ".",
        "",
        "## Recipe",
        "",
    ]
    if recipe_yaml:
        lines += [f"Trained from {('`' + source + '`') if source else 'this recipe'}:", "", "```yaml", recipe_yaml.rstrip(), "```"]
    else:
        lines += ["Not trained from a graftkit recipe (exported from code)."]
    lines += ["", "## Evaluation", ""]
    if evaluation:
        lines += ["Two-turn protocol, on the tasks above (`graftkit eval`):", "", evaluation.rstrip()]
    else:
        lines += ["Not evaluated: the run directory had no `eval/results.md` (run `graftkit eval RUN_DIR` before exporting)."]
    lines += ["", "## Files", "", *(f"- `{name}`: {contents}" for name, contents in files.items()), ""]
    return "\n".join(lines)


def _demo(tasks: list[dict]) -> tuple[str, str]:
    """A statement and a question about it, from the first trained task that is installed here."""
    registry = get_plugins().registries["task"]
    for t in tasks:
        if t.get("task") in registry.classes:
            return registry.classes[t["task"]].demo
    return Task.demo


def _describe(task: dict) -> str:
    options = ", ".join(f"{k}={v}" for k, v in task.items() if k not in ("task", "weight", "seed") and v not in (None, ""))
    return f"`{task.get('task')}` ({options})" if options else f"`{task.get('task')}`"


def _dist(record: Mapping[str, str]) -> str:
    return f"`{record['distribution']}` {record['version']}".rstrip()
