"""Training checkpoints: graft tensors, optimizer, scheduler and RNG state, written atomically.

Layout of `RUN_DIR/checkpoints/step-000200/`:
  graft.safetensors      graft tensors only (memory + injector)
  optimizer.safetensors  optimizer tensors, flattened as state.<param index>.<name>
  trainer.json           step, optimizer param groups and scalars, scheduler state, python RNG, metrics
  rng.safetensors        torch CPU (and CUDA) RNG states
  recall_head.safetensors  with `train.recall_weight`: the recall head trained beside the graft
A checkpoint directory is written under a temporary name and renamed when complete, so a crash never
leaves a half-written checkpoint; `latest.json` / `best.json` name the current ones.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from graftkit.api import build_graft
from graftkit.backbone import Backbone
from graftkit.errors import GraftkitError
from graftkit.recipe import load_recipe
from graftkit.state import CHECKSUM, checksum

FILES = ("graft.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer.json")


def save_checkpoint(root: Path, step: int, graft, optimizer, scheduler, info: dict, keep: int = 2, kept: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_graft_tensors(graft, tmp / "graft.safetensors")
    for name, module in (kept or {}).items():  # modules trained beside the graft but not part of it
        metadata = module.file_metadata() if hasattr(module, "file_metadata") else None
        save_checked({k: v.detach().contiguous() for k, v in module.state_dict().items()}, tmp / f"{name}.safetensors", metadata)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_checked(opt_tensors, tmp / "optimizer.safetensors")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_checked(rng, tmp / "rng.safetensors")
    trainer = {
        "step": step,
        "optimizer": opt_meta,
        "scheduler": scheduler.state_dict(),
        "python_rng": _jsonable(random.getstate()),
        "numpy_rng": _jsonable(np.random.get_state()),
        **info,
    }
    (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _point(root / "latest.json", final)
    _prune(root, keep)
    return final


def save_checked(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file whose metadata holds the sha256 of its tensors (`graftkit.state.checksum`)."""
    save_file(tensors, str(path), metadata={**(metadata or {}), CHECKSUM: checksum(tensors)})


def load_checked(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a file `save_checked` wrote; ValueError when they do not match its checksum (a file
    without one, from an older graftkit, is read as it is)."""
    with safe_open(str(path), framework="pt") as f:
        recorded = (f.metadata() or {}).get(CHECKSUM)
    tensors = load_file(str(path))
    if recorded is not None and recorded != checksum(tensors):
        raise ValueError("its tensors do not match the checksum written with them")
    return tensors


def save_graft_tensors(graft, path) -> None:
    """The graft's tensors (memory, injector, write statistics) as one safetensors file."""
    save_checked({k: v.contiguous().cpu() for k, v in graft.graft_state_dict().items()}, Path(path))


def mark_best(root: Path, checkpoint: Path, accuracy: float) -> None:
    """Copy checkpoint's graft tensors to a new `best-STEP/` folder, then point `best.json` at it, then remove
    the previous one: a crash at any moment leaves `best.json` naming a complete folder."""
    step = read_json(checkpoint / "trainer.json")["step"]
    final, tmp = root / f"best-{step:06d}", root / f".best-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shutil.copy2(checkpoint / "graft.safetensors", tmp / "graft.safetensors")
    for kept in checkpoint.glob("*.safetensors"):  # modules trained beside the graft (a recall head), for init_from
        if kept.name not in FILES:
            shutil.copy2(kept, tmp / kept.name)
    (tmp / "trainer.json").write_text((checkpoint / "trainer.json").read_text())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _point(root / "best.json", final, accuracy=accuracy, step=step)
    for old in [*root.glob("best-*"), root / "best"]:
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def best_marked(root: Path) -> int | None:
    """The step `best.json` names, when the folder it names is there; None otherwise."""
    try:
        pointer = json.loads((root / "best.json").read_text())
        return int(pointer["step"]) if (root / pointer["path"] / "graft.safetensors").is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_json(path: Path) -> dict:
    """A JSON object a run wrote (trainer.json, latest.json, best.json); missing or damaged is a GraftkitError naming it."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GraftkitError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise GraftkitError(f"{path}: damaged ({exc})") from None
    if not isinstance(value, dict):
        raise GraftkitError(f"{path}: damaged (not a JSON object)")
    return value


def complete(checkpoint: Path) -> bool:
    """Whether a checkpoint folder holds its graft tensors and a readable trainer.json."""
    try:
        return (checkpoint / "graft.safetensors").is_file() and isinstance(read_json(checkpoint / "trainer.json").get("step"), int)
    except GraftkitError:
        return False


def resolve_checkpoint(run_dir: Path, which: str = "best") -> Path:
    """The directory of checkpoint `which`: 'best', 'last', a step number, or a checkpoint folder's name.

    When `latest.json` or `best.json` is missing or damaged, or names a folder that is gone, the newest complete
    folder of that kind is used instead (with a warning naming the pointer)."""
    root = Path(run_dir) / "checkpoints"
    if which in ("best", "last", "latest"):
        kind = "best" if which == "best" else "latest"
        pointer = root / f"{kind}.json"
        try:
            target = root / str(read_json(pointer)["path"])
            if complete(target):
                return target
            problem = f"names {target.name}, which is missing or incomplete"
        except (GraftkitError, KeyError) as exc:
            problem = "is missing" if not pointer.exists() else f"is damaged ({exc})"
        found = newest_complete(root, "best-*" if kind == "best" else "step-*")
        if found is None and kind == "best":  # no best copy yet: the newest checkpoint
            found = newest_complete(root, "step-*")
        if found is None:
            raise GraftkitError(f"{run_dir}: no {which} checkpoint (is this a graftkit run directory?)")
        if pointer.exists() or kind == "latest":
            warnings.warn(f"{pointer} {problem}; using {found.name}", CheckpointWarning, stacklevel=2)
        return found
    step = which[len("step-") :] if which.startswith("step-") else which  # a checkpoint folder's own name
    if not step.isdigit():
        raise GraftkitError(f"--checkpoint: expected best, last or a step number, got {which!r}")
    path = root / f"step-{int(step):06d}"
    if not path.is_dir():
        raise GraftkitError(f"{run_dir}: no checkpoint for step {which}")
    return path


def newest_complete(root: Path, pattern: str) -> Path | None:
    """The complete checkpoint folder matching `pattern` with the highest step, or None."""
    folders = sorted((p for p in root.glob(pattern) if p.is_dir() and not p.name.startswith(".")), reverse=True)
    return next((p for p in folders if complete(p)), None)


class DamagedCheckpoint(GraftkitError):
    """A file of a checkpoint folder is missing or cannot be read."""


class CheckpointWarning(UserWarning):
    """A run's checkpoint pointer was missing or damaged and another checkpoint was used."""


def load_run(run_dir, which: str = "best", backbone: Backbone | None = None, overrides=()):
    """(recipe, graft, checkpoint info) of a training run: the graft built from RUN_DIR/recipe.yaml with
    the tensors (write statistics included) of checkpoint `which` (see `resolve_checkpoint`).
    `overrides` (`key=value`) change the recipe for this use only (not its file)."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise GraftkitError(f"{run_dir}: not a graftkit run directory (no recipe.yaml)")
    recipe = load_recipe(run_dir / "recipe.yaml", overrides, training=False)
    path = resolve_checkpoint(run_dir, str(which))
    graft = build_graft(recipe, backbone=backbone, calibrate=False)  # the checkpoint holds the statistics
    try:
        info = load_graft_tensors(graft, path)
    except GraftkitError:
        graft.injector.detach()  # leave a shared backbone bare
        raise
    return recipe, graft, info


def load_graft_tensors(graft, checkpoint: Path) -> dict:
    path = Path(checkpoint) / "graft.safetensors"
    try:
        tensors = load_checked(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise DamagedCheckpoint(f"{path}: damaged or missing graft checkpoint ({exc})") from None
    try:
        missing, unexpected = graft.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # shapes differ: another configuration
        raise GraftkitError(f"{path}: does not fit this graft ({str(exc).splitlines()[-1].strip()}); was it trained with another recipe?") from None
    if missing or unexpected:
        raise GraftkitError(
            f"{path}: does not fit this graft (missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}); "
            "was it trained with another recipe?"
        )
    try:
        return read_json(Path(checkpoint) / "trainer.json")
    except GraftkitError as exc:
        raise DamagedCheckpoint(str(exc)) from None


def initial_tensors_file(path) -> Path:
    """The graft tensors `train.init_from` names: a safetensors file, a checkpoint folder, an export, or a
    run directory (its best checkpoint)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in ("graft.safetensors", "graft_model.safetensors"):  # a checkpoint folder; an export
            if (path / name).is_file():
                return path / name
        if (path / "checkpoints").is_dir():
            try:
                return resolve_checkpoint(path, "best") / "graft.safetensors"
            except GraftkitError as exc:
                raise GraftkitError(f"train.init_from: {exc}") from None
        raise GraftkitError(f"train.init_from: {path} holds no graft tensors (no graft.safetensors, graft_model.safetensors or checkpoints/)")
    raise GraftkitError(f"train.init_from: {path} does not exist")


def load_initial_tensors(graft, path) -> tuple[Path, list[str]]:
    """Load the graft tensors `path` names (see `initial_tensors_file`) into `graft` before training.

    Every tensor in the file must fit a graft tensor of the same name and shape; graft tensors the file
    lacks keep their initialisation. Returns the file read and the names it lacked."""
    file = initial_tensors_file(path)
    try:
        tensors = load_checked(file)
    except (SafetensorError, OSError, ValueError) as exc:
        raise GraftkitError(f"train.init_from: {file} is not a readable safetensors file ({exc})") from None
    own = graft.graft_state_dict()
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise GraftkitError(
            f"train.init_from: {file} holds tensors this graft does not have ({', '.join(unknown[:5])}); was it written for another recipe?"
        )
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in tensors.items() if v.shape != own[k].shape]
    if wrong:
        raise GraftkitError(f"train.init_from: {file}: shapes differ from this graft's ({'; '.join(wrong[:3])}); was it written for another recipe?")
    graft.load_state_dict(tensors, strict=False)
    return file, sorted(set(own) - set(tensors))


def load_checkpoint(checkpoint: Path, graft, optimizer, scheduler, kept: dict | None = None) -> dict:
    """Restore everything `save_checkpoint` wrote (with the same `kept` modules); returns trainer.json.
    A missing or damaged file is a GraftkitError naming it."""
    info = load_graft_tensors(graft, checkpoint)
    for name, module in (kept or {}).items():
        path = Path(checkpoint) / f"{name}.safetensors"
        if not path.is_file():
            raise GraftkitError(f"--resume: {checkpoint} has no {path.name}; was the run started with other train settings?")
        try:
            tensors = load_checked(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise DamagedCheckpoint(f"{path}: damaged ({exc})") from None
        try:
            module.load_state_dict(tensors)
        except RuntimeError as exc:  # e.g. a head over other answers: the data changed since
            raise GraftkitError(f"--resume: {path} does not fit this run ({str(exc).splitlines()[0]})") from None
    path = checkpoint / "optimizer.safetensors"
    try:
        optimizer.load_state_dict(_unflatten_optimizer(load_checked(path), info["optimizer"]))
        path = checkpoint / "trainer.json"
        scheduler.load_state_dict(info["scheduler"])
        path = checkpoint / "rng.safetensors"
        rng = load_checked(path)
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available():
            cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
            if cuda:
                torch.cuda.set_rng_state_all(cuda)
        path = checkpoint / "trainer.json"
        random.setstate(_tupled(info["python_rng"]))
        state = info["numpy_rng"]
        np.random.set_state((state[0], np.array(state[1], dtype=np.uint32), *state[2:]))
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
        raise DamagedCheckpoint(f"{path}: damaged or missing ({type(exc).__name__}: {exc})") from None
    return info


def load_newest(run_dir: Path, graft, optimizer, scheduler, kept: dict | None = None) -> tuple[Path, dict]:
    """(folder, trainer.json) of the newest checkpoint that loads whole (`load_checkpoint`): one with a damaged
    or missing file is passed over, with a warning, for the one before it."""
    last = resolve_checkpoint(run_dir, "last")
    earlier = sorted((p for p in last.parent.glob("step-*") if p.is_dir() and p.name < last.name), reverse=True)
    for candidate in earlier:
        try:
            return last, load_checkpoint(last, graft, optimizer, scheduler, kept)
        except DamagedCheckpoint as exc:
            warnings.warn(f"{exc}; resuming from {candidate.name}, the checkpoint before it", CheckpointWarning, stacklevel=2)
            last = candidate
    return last, load_checkpoint(last, graft, optimizer, scheduler, kept)


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def _point(pointer: Path, target: Path, **extra) -> None:
    tmp = pointer.with_name(pointer.name + ".tmp")
    tmp.write_text(json.dumps({"path": target.name, **extra}))
    os.replace(tmp, pointer)


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
