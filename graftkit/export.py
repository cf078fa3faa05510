"""Exported grafts: a trained graft as a self-describing directory of exactly three files.

``export_run(RUN_DIR, OUT)`` (``graftkit export RUN_DIR --out OUT``) writes

  graft_config.json         format version, graftkit version, the plugin distributions that provide
                            the backbone family, memory and injector, their validated configs, the
                            backbone block and manifest (family, source, revision, hidden size, layer
                            count, tokenizer fingerprint), the trained tasks, the checkpoint step, and a
                            sha256 of the tensor file
  graft_model.safetensors   graft tensors only (memory, injector, write statistics); never a backbone tensor
  README.md                 a model card: what it is, how to load it, the recipe, the evaluation

and nothing else (no pickle anywhere). The files are written into a temporary sibling directory and
moved into place when complete; an existing ``OUT`` is replaced only if it is empty or a previous export.

``load_graft(OUT)`` rebuilds the graft on the backbone the manifest names (or on one passed in) and
refuses, with a message that says what to do, anything that would silently give a different model:
another backbone family, hidden size, layer count or tokenizer; a component whose plugin is not
installed; a damaged file; an export format newer than this graftkit reads. Keys this version does
not know are ignored with a warning naming them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from graftkit.api import graft_from_configs, load_backbone
from graftkit.backbone import Backbone
from graftkit.checkpoint import load_run
from graftkit.config import with_former_defaults
from graftkit.errors import ExportError, GraftkitError
from graftkit.graft import Graft
from graftkit.model_card import model_card
from graftkit.plugins import _version, get_plugins
from graftkit.task import build_task

EXPORT_FORMAT = "graftkit.export"
FORMAT_VERSION = 1  #: the newest export format this graftkit writes and reads
CONFIG_FILE = "graft_config.json"
TENSORS_FILE = "graft_model.safetensors"
README_FILE = "README.md"
EXPORT_FILES = (CONFIG_FILE, TENSORS_FILE, README_FILE)
FILE_CONTENTS = {
    CONFIG_FILE: "configuration and provenance",
    TENSORS_FILE: "graft tensors (safetensors, no pickle)",
    README_FILE: "this card",
}  #: what each file holds, for the model card
TENSORS_FORMAT = "graftkit.graft_tensors/1"
COMPONENTS = ("backbone", "memory", "injector")


class ExportWarning(UserWarning):
    """An export holds something this graftkit does not know; it is ignored."""


# -- the schema of graft_config.json (open: unknown keys warn instead of failing) --------------------------
class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class PluginRecord(_Open):
    name: str  # the component name (e.g. "titans")
    plugin: str  # the pluggy plugin that registered it (entry-point or module name)
    distribution: str  # the installable distribution that ships the plugin
    version: str


class PluginsRecord(_Open):
    backbone: PluginRecord
    memory: PluginRecord
    injector: PluginRecord


class ComponentRecord(_Open):
    kind: str
    config: dict[str, Any]


class ManifestRecord(_Open):
    family: str
    source: str
    revision: str | None = None
    hidden_size: int
    num_layers: int
    tokenizer: str


class CheckpointRecord(_Open):
    which: str | None = None
    step: int | None = None
    eval: dict[str, Any] | None = None


class FileRecord(_Open):
    sha256: str
    bytes: int


class ExportConfig(_Open):
    format: str
    format_version: int
    graftkit_version: str
    created: str
    plugins: PluginsRecord
    backbone: ComponentRecord
    backbone_manifest: ManifestRecord
    memory: ComponentRecord
    injector: ComponentRecord
    tasks: list[Any] = []
    prompts: dict[str, dict[str, str]] = {}
    checkpoint: CheckpointRecord = CheckpointRecord()
    identity: dict[str, str] = {}
    files: dict[str, FileRecord]


# -- export ------------------------------------------------------------------------------------------------
def export_run(run_dir, out, checkpoint: str | int = "best", backbone: Backbone | None = None) -> Path:
    """Export checkpoint `checkpoint` ('best', 'last' or a step) of a training run to directory `out`.

    Pass `backbone` to reuse an already loaded backbone (it must be the recipe's); the graft built for
    the export is detached from it afterwards. Returns the export directory.
    """
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "recipe.yaml").is_file():
        raise ExportError(f"{run_dir}: not a graftkit run directory (no recipe.yaml)")
    check_target(out)
    recipe, graft, info = load_run(run_dir, str(checkpoint), backbone=backbone)
    try:
        results = run_dir / "eval" / "results.md"
        return export_graft(
            graft,
            out,
            recipe_yaml=(run_dir / "recipe.yaml").read_text(encoding="utf-8"),
            tasks=recipe.task_configs(),
            checkpoint={"which": str(checkpoint), "step": info.get("step"), "eval": info.get("eval")},
            evaluation=results.read_text(encoding="utf-8") if results.is_file() else None,
            source=str(run_dir),
        )
    finally:
        graft.injector.detach()


def export_graft(
    graft: Graft,
    out,
    *,
    recipe_yaml: str | None = None,
    tasks: list | None = None,
    checkpoint: Mapping[str, Any] | None = None,
    evaluation: str | None = None,
    source: str | None = None,
) -> Path:
    """Export an in-memory graft (e.g. from your own training loop) to directory `out`.

    `recipe_yaml`, `evaluation` (a markdown table) and `source` go into the model card; `tasks` (the task
    configs it was trained on, `recipe.task_configs()`) are described in the card, and their named prompts
    are recorded so that `graftkit ask --task NAME` can put a question the way training did.
    """
    out = Path(os.path.abspath(out))  # "." or "a/.." need a real name for the temporary sibling
    check_target(out)
    backbone, plugins = graft.backbone, get_plugins()
    tensors = _graft_tensors(graft)
    kinds = {"backbone": backbone.name, "memory": graft.memory.name, "injector": graft.injector.name}
    config: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "format_version": FORMAT_VERSION,
        "graftkit_version": _version("graftkit"),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "plugins": {kind: _plugin_record(plugins, kind, name) for kind, name in kinds.items()},
        "backbone": {"kind": backbone.name, "config": backbone.config.model_dump(mode="json")},
        "backbone_manifest": backbone.manifest(),
        "memory": {"kind": graft.memory.name, "config": graft.memory.config.model_dump(mode="json")},
        "injector": {"kind": graft.injector.name, "config": graft.injector.config.model_dump(mode="json")},
        "tasks": [t.model_dump(mode="json") for t in tasks or []],
        "prompts": {name: {"instruction": p.instruction, "template": p.template} for t in tasks or [] for name, p in build_task(t).prompts().items()},
        "checkpoint": dict(checkpoint or {}),
        "identity": graft.identity(),
        "files": {},
    }
    metadata = {
        "format": TENSORS_FORMAT,
        "graftkit_version": config["graftkit_version"],
        "backbone": f"{config['backbone_manifest']['family']}:{config['backbone_manifest']['source']}",
        "memory": graft.memory.name,
        "injector": graft.injector.name,
        "step": str(config["checkpoint"].get("step")),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata=metadata)
        _readable(tmp / TENSORS_FILE)
        config["files"][TENSORS_FILE] = _file_record(tmp / TENSORS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        card = model_card(config, tensors, recipe_yaml=recipe_yaml, evaluation=evaluation, source=source, out=out, files=FILE_CONTENTS)
        (tmp / README_FILE).write_text(card, encoding="utf-8")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_target(out: Path) -> None:
    """Refuse an `out` that exists and is neither empty nor a previous export (it would be destroyed)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory")
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if entries and not is_export(out):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ExportError(
            f"--out {out}: refusing to overwrite a non-empty directory that is not a previous graftkit export "
            f"(it holds {shown}); choose another --out or empty it"
        )


def is_export(directory: Path) -> bool:
    """True if `directory` holds a graftkit export and nothing else."""
    directory = Path(directory)
    entries = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
    if CONFIG_FILE not in entries or not entries <= set(EXPORT_FILES):
        return False
    try:
        return json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8")).get("format") == EXPORT_FORMAT
    except (ValueError, OSError, AttributeError):
        return False


def _graft_tensors(graft) -> dict[str, torch.Tensor]:
    """Graft tensors as independent contiguous CPU copies; a tensor shared with the backbone is refused."""
    backbone_storage = {t.data_ptr() for t in graft.backbone.model.state_dict().values() if t.numel()}
    tensors = {}
    for name, tensor in graft.graft_state_dict().items():
        if tensor.numel() and tensor.data_ptr() in backbone_storage:
            raise ExportError(
                f"graft tensor {name!r} is a backbone tensor (injector {graft.injector.name!r} or memory "
                f"{graft.memory.name!r} registers it); an export holds graft tensors only"
            )
        tensors[name] = tensor.detach().cpu().clone().contiguous()
    return tensors


def _plugin_record(plugins, kind: str, name: str) -> dict[str, str]:
    info = plugins.owner_of(kind, name)
    return {"name": name, "plugin": info.name, "distribution": info.distribution, "version": info.version}


def _file_record(path: Path) -> dict[str, Any]:
    return {"sha256": _sha256(path), "bytes": path.stat().st_size}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished export into place: a new `out` by one rename; an existing one (empty or a previous
    export, maybe the working directory) file by file, the config last, so that an interruption leaves
    tensors that do not match the recorded checksum (refused on load) rather than a silently mixed model."""
    if not out.exists():
        os.rename(tmp, out)
        return
    for name in (TENSORS_FILE, README_FILE, CONFIG_FILE):
        os.replace(tmp / name, out / name)


def _readable(path: Path) -> None:
    """safetensors writes 0600; an export is meant to be shared, so apply the usual umask instead."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


# -- load ------------------------------------------------------------------------------------------------------
def read_export_config(directory) -> dict:
    """The validated `graft_config.json` of an export (unknown keys warn and are dropped)."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise ExportError(f"{directory}: no such export directory")
    if not path.is_file():
        raise ExportError(f"{directory}: not a graftkit export (no {CONFIG_FILE}; make one with `graftkit export RUN_DIR --out DIR`)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path}: damaged or truncated JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path}: not a graftkit export configuration (format {raw.get('format') if isinstance(raw, dict) else None!r})")
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ExportError(f"{path}: damaged (format_version is {version!r}, expected an integer from 1)")
    if version > FORMAT_VERSION:
        raise ExportError(
            f"{path}: export format {version} (written by graftkit {raw.get('graftkit_version', '?')}) is newer than this "
            f"graftkit {_version('graftkit')} reads (up to {FORMAT_VERSION}): pip install --upgrade graftkit"
        )
    try:
        config = ExportConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ExportError(f"{path}: damaged or incomplete ({problems})") from None
    for key in _extra_keys(config):
        warnings.warn(f"{path}: unknown key '{key}' ignored (written by a newer graftkit?)", ExportWarning, stacklevel=3)
    return _drop_extras(config)


def _extra_keys(model: BaseModel, prefix: str = "") -> list[str]:
    keys = [prefix + k for k in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            keys += _extra_keys(value, f"{prefix}{name}.")
        elif isinstance(value, dict):
            keys += [k for key, v in value.items() if isinstance(v, BaseModel) for k in _extra_keys(v, f"{prefix}{name}.{key}.")]
    return keys


def _drop_extras(model: BaseModel) -> dict:
    out = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            value = _drop_extras(value)
        elif isinstance(value, dict):
            value = {k: _drop_extras(v) if isinstance(v, BaseModel) else v for k, v in value.items()}
        out[name] = value
    return out


def load_graft(directory, backbone: Backbone | None = None) -> Graft:
    """A `Graft` from an export directory, on the backbone its manifest names or on `backbone`.

    The returned graft is in eval mode and carries the export's configuration as `graft.export_config`
    (e.g. `graft.export_config["tasks"]`). Raises `ExportError` when the export cannot be loaded here.
    """
    directory = Path(directory)
    config = read_export_config(directory)
    path = directory / CONFIG_FILE
    plugins = get_plugins()
    classes = {}
    for kind in COMPONENTS:
        classes[kind] = _component_class(plugins, kind, config[kind]["kind"], config["plugins"][kind])
    # an export records every option: one that lacks an option predates it and was made with its former default
    options = {
        kind: with_former_defaults(classes[kind].Config, _known_options(classes[kind], config[kind]["config"], f"{kind}.config", path))
        for kind in COMPONENTS
    }
    tensors = _read_tensors(directory / TENSORS_FILE, config["files"].get(TENSORS_FILE))
    if backbone is None:
        backbone = load_backbone({"kind": config["backbone"]["kind"], **options["backbone"]})
    check_backbone(config["backbone_manifest"], backbone, directory)
    memory_options = {k: v for k, v in options["memory"].items() if k != "dim"}
    try:
        graft = graft_from_configs(
            backbone, config["memory"]["kind"], memory_options, config["injector"]["kind"], options["injector"], calibrate=False
        )  # the tensor file holds the statistics
    except GraftkitError as exc:
        raise ExportError(f"{path}: the recorded memory or injector configuration does not build here: {exc}") from None
    try:
        missing, unexpected = graft.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ExportError(
                f"{directory / TENSORS_FILE}: does not fit the graft {CONFIG_FILE} describes (missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}); a different plugin version may have changed the component"
            )
    except RuntimeError as exc:  # a shape mismatch
        graft.injector.detach()
        raise ExportError(f"{directory / TENSORS_FILE}: does not fit the graft {CONFIG_FILE} describes ({exc})") from None
    except ExportError:
        graft.injector.detach()
        raise
    graft.eval()
    graft.export_config = config
    return graft


def _component_class(plugins, kind: str, name: str, record: Mapping[str, str]):
    registry = plugins.registries[kind]
    if name in registry.classes:
        owner = plugins.owner_of(kind, name)
        if owner.distribution != record["distribution"] and record["distribution"] != "(registered in code)":
            warnings.warn(
                f"{kind} {name!r} was exported from distribution {record['distribution']!r} {record['version']}; "
                f"here it comes from {owner.distribution!r} {owner.version}",
                ExportWarning,
                stacklevel=3,
            )
        return registry.classes[name]
    dist, version = record["distribution"], record["version"]
    if dist == "graftkit":
        here = _version("graftkit")
        hint = (
            f"this graftkit ({here}) has no {kind} {name!r}; the export names one of its own that does not exist"
            if here == version
            else f"pip install --upgrade 'graftkit>={version}'"
        )
    elif dist == "(registered in code)":
        hint = "it was registered in code with Plugins.add(); register the same plugin before loading"
    else:
        hint = f"pip install {dist}"
    raise ExportError(f"{kind} {name!r} comes from distribution {dist!r}" + (f" {version}" if version else "") + f": {hint}")


def _known_options(cls, options: Mapping[str, Any], where: str, path: Path) -> dict:
    fields = getattr(cls.Config, "model_fields", {})
    known = {}
    for key, value in options.items():
        if key in fields:
            known[key] = value
        else:
            warnings.warn(
                f"{path}: unknown key '{where}.{key}' ignored (the installed {cls.name!r} has no such option)",
                ExportWarning,
                stacklevel=4,
            )
    return known


def _read_tensors(path: Path, record: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ExportError(f"{path}: missing (an export holds {', '.join(EXPORT_FILES)})")
    if record is not None:
        size = path.stat().st_size
        if size != record["bytes"]:
            raise ExportError(f"{path}: truncated or damaged ({size} bytes, the export recorded {record['bytes']})")
        if _sha256(path) != record["sha256"]:
            raise ExportError(f"{path}: corrupted (its sha256 does not match the one recorded in {CONFIG_FILE})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ExportError(f"{path}: truncated or damaged safetensors file ({exc})") from None


def check_backbone(manifest: Mapping[str, Any], backbone: Backbone, directory: Path) -> None:
    """Refuse a backbone of another family, width, depth or tokenizer than the graft was trained on."""
    have = backbone.manifest()
    checks = (
        ("family", "backbone family"),
        ("hidden_size", "hidden size"),
        ("num_layers", "layer count"),
        ("tokenizer", "tokenizer fingerprint"),
    )
    for key, label in checks:
        if have.get(key) != manifest.get(key):
            raise ExportError(
                f"{directory}: {label} differs: the graft was trained on {manifest.get(key)!r} "
                f"({manifest.get('family')} from {manifest.get('source')!r}), this backbone has {have.get(key)!r} "
                f"({have.get('family')} from {have.get('source')!r})"
            )
