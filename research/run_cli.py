"""What the research scripts that measure a trained run share: their arguments and their error handling.

parser = run_parser(__doc__, lengths="1k,16k", n=100, n_help="test samples per length")
run("facts_only", measure, parser.parse_args())   # measure(args) loads args.run_dir
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch


def run_parser(doc: str, lengths: str, n: int, n_help: str) -> argparse.ArgumentParser:
    """RUN_DIR, its recipe overrides, --checkpoint, --lengths, --n and --threads."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--checkpoint", default="best", help="best, last, or a step number")
    parser.add_argument("--lengths", default=lengths)
    parser.add_argument("--n", type=int, default=n, help=n_help)
    parser.add_argument("--threads", type=int, default=None)
    return parser


def run(name: str, measure: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> None:
    """measure(args) with --threads applied; a bad run folder, override or checkpoint ends in a message."""
    if args.threads:
        torch.set_num_threads(args.threads)
    from graftkit.errors import GraftkitError

    try:
        measure(args)
    except GraftkitError as exc:
        raise SystemExit(f"{name}: {exc}") from None
