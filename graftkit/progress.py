"""Progress reporting for long work: tqdm bars and one-line status messages on stderr."""

from __future__ import annotations

import contextlib
import sys
import time

from tqdm.auto import tqdm


@contextlib.contextmanager
def status(message: str):
    """Print `message ...` before slow work and `done in Xs` after it."""
    print(f"{message} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"  done in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)


def bar(iterable=None, **kwargs):
    """A tqdm bar on stderr with graftkit's defaults (quiet under `disable=True`)."""
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, **kwargs)
