"""The benchmarks `make bench` runs measure the graft `make train` trains unless told otherwise."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKEFILE = (ROOT / "Makefile").read_text(encoding="utf-8")


@pytest.fixture
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # how `python bench/X.py` finds bench/common.py
    yield
    for name in ("common", "generation_overhead", "recall_latency", "train_step_cache"):
        sys.modules.pop(name, None)


def make_targets(target: str) -> list[str]:
    """The recipe lines of one Makefile target."""
    block = re.search(rf"^{target}:.*?\n((?:\t.*\n)+)", MAKEFILE, re.MULTILINE)
    assert block, f"the Makefile has no {target} target"
    return block[1].splitlines()


@pytest.mark.parametrize("name", ["generation_overhead", "recall_latency", "train_step_cache"])
def test_a_graft_benchmark_builds_the_make_train_recipe_by_default(bench_path, name):
    recipe = re.search(r"^RECIPE \?= (\S+)$", MAKEFILE, re.MULTILINE)[1]
    args = importlib.import_module(name).arguments([])
    assert args.recipe == ROOT / recipe
    assert any(f"bench/{name}.py --recipe $(RECIPE)" in line for line in make_targets("bench"))


def test_make_bench_runs_every_benchmark_in_bench():
    run = {m for line in make_targets("bench") for m in re.findall(r"bench/(\w+)\.py", line)}
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py")} - {"common"}
    assert run == scripts
