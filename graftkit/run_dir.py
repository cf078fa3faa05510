"""A training run's folder: refused when it holds someone else's files, locked while a run writes to it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from graftkit.errors import GraftkitError

#: An empty file that marks a folder as a graftkit run (written before anything else of the run).
MARKER = ".graftkit-run"
LOCK = ".lock"


#: Entries that only a graftkit run folder holds (beside its recipe.yaml).
RUN_ENTRIES = (MARKER, LOCK, "metrics.jsonl", "checkpoints")


def is_run(folder: Path) -> bool:
    """Whether `folder` holds a graftkit training run."""
    return any((Path(folder) / name).exists() for name in RUN_ENTRIES)


def check_foreign(run_dir: Path) -> None:
    """Refuse an existing, non-empty `output_dir` that is not a graftkit run (a project folder, an export)."""
    if not run_dir.is_dir():
        if run_dir.exists():
            raise GraftkitError(f"output_dir: {run_dir} is a file, not a folder")
        return
    entries = sorted(p.name for p in run_dir.iterdir())
    if entries and not is_run(run_dir):
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise GraftkitError(f"output_dir: {run_dir} holds files that are not a graftkit run ({shown}); choose a new or empty folder")


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold `run_dir/.lock` (the process id) while a run writes to the folder; a second run is refused."""
    path = run_dir / LOCK
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            owner = _owner(path)
            if owner is not None and _alive(owner):
                raise GraftkitError(f"output_dir: another graftkit run (process {owner}) is writing to {run_dir}") from None
            path.unlink(missing_ok=True)  # left by a run that no longer exists
    else:
        raise GraftkitError(f"output_dir: could not lock {run_dir} (another run took it over)")
    with os.fdopen(fd, "w") as handle:
        handle.write(str(os.getpid()))
    try:
        yield
    finally:
        if _owner(path) == os.getpid():
            path.unlink(missing_ok=True)


def _owner(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
