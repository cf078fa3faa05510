"""The README.md model card of an exported graft (`graftkit.export`)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from graftkit.export import CONFIG_FILE, README_FILE, TENSORS_FILE


def model_card(config: dict, tensors: Mapping[str, torch.Tensor], recipe_yaml: str | None, evaluation: str | None,
               source: str | None, out: Path) -> str:
    manifest, plugins = config["backbone_manifest"], config["plugins"]
    mem, inj = config["memory"], config["injector"]
    params = sum(t.numel() for t in tensors.values())
    step = config["checkpoint"].get("step")
    tasks = config["tasks"]
    task = tasks[0] if tasks else None
    name = out.name
    standardised = " (standardised per channel)" if mem["config"].get("standardize", True) else ""
    ask = (f'ask(graft, "Where is Mary?", state, task="{task}")  # in the prompt of the task it was trained on'
           if task else 'ask(graft, "Where is Mary?", state)')
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
        f"| trained tasks | {', '.join(tasks) if tasks else 'not recorded'} |",
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
        'state = memorize(graft, "Mary went to the kitchen. John moved to the garden.")  # turn 1',
        f"print({ask})",
        'save_state(graft, state, "alice.safetensors")  # one memory per user; load_state(graft, path) reads it back',
        "```",
        "",
        "From the shell:",
        "",
        "```sh",
        f"graftkit memorize {name} --state alice.safetensors notes.txt",
        f'graftkit ask {name} --state alice.safetensors "Where is Mary?"',
        f"graftkit chat {name} --state alice.safetensors",
        "```",
        "",
        "Loading needs the plugins that provide the components: "
        + ", ".join(sorted({f"`{p['distribution']}`" for p in plugins.values()}))
        + ".",
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
        lines += ["BABILong, two-turn protocol (`graftkit eval`):", "", evaluation.rstrip()]
    else:
        lines += ["Not evaluated: the run directory had no `eval/results.md` (run `graftkit eval RUN_DIR` before exporting)."]
    lines += ["", "## Files", "", f"- `{CONFIG_FILE}`: configuration and provenance",
              f"- `{TENSORS_FILE}`: graft tensors (safetensors, no pickle)", f"- `{README_FILE}`: this card", ""]
    return "\n".join(lines)


def _dist(record: Mapping[str, str]) -> str:
    return f"`{record['distribution']}` {record['version']}".rstrip()
