"""Throughput and peak memory of graftkit's titans memory against titans-pytorch, on CPU.

Both memories run the same configuration (dim 576, 4 heads × 64, a 2-layer memory MLP of width 4 ×
64, chunks of 64, batch 4 × 1024 tokens) and the same work: write a sequence into an empty memory,
then read at every position of it (titans-pytorch: `retrieved, state = NeuralMemory(...)(seq)`, which
stores and retrieves the sequence in one call). The arithmetic is nearly the same: both take each
chunk's gradients at one set of weights (graftkit: the weights the previous chunk left, chunk after
chunk; titans-pytorch: the call's initial weights for every chunk, then a scan over chunks), and
both pay for the same four 576 ↔ 256 projections, about a third of graftkit's no-grad time. Two
modes: without autograd, and with a backward pass of a loss on the reads (training). Timings
alternate between the two implementations, repeat by repeat, and report the median (and the
fastest) wall-clock time; the machine may be shared (the report prints its CPU pressure), so look at both.

Peak memory is measured in a fresh subprocess per implementation and mode (Linux): after imports,
model and input are built and a small warm-up run (one row, two chunks) has done the one-time lazy
initialisation, the kernel's peak-RSS mark is reset (`/proc/self/clear_refs`), one run of the
workload follows, and the report gives the peak resident set size over that run (`VmHWM`) and
its growth over the resident size before it. It counts everything the run touched (activations,
autograd graph, allocator caches), which is what a user's machine has to hold.

Needs `pip install titans-pytorch==0.5.5` (the `bench` extra). Run:

    python bench/memory_throughput.py            # full configuration (a few minutes on 2 cores)
    python bench/memory_throughput.py --quick    # smoke run (1 × 256 tokens), under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata

import torch

FULL = dict(dim=576, heads=4, dim_head=64, chunk_size=64, batch=4, tokens=1024, repeats=5)
QUICK = dict(dim=576, heads=4, dim_head=64, chunk_size=64, batch=1, tokens=256, repeats=2)
DEPTH, EXPANSION = 2, 4
IMPLEMENTATIONS = ("graftkit", "titans-pytorch")
MODES = ("no grad", "with backward")


def build(implementation: str, cfg: dict) -> torch.nn.Module:
    """The memory module of one implementation at the shared configuration."""
    if implementation == "graftkit":
        from graftkit.memories.titans import TitansMemory

        config = TitansMemory.Config(
            dim=cfg["dim"],
            heads=cfg["heads"],
            dim_head=cfg["dim_head"],
            depth=DEPTH,
            expansion=EXPANSION,
            chunk_size=cfg["chunk_size"],
        )
        return TitansMemory(config)
    from titans_pytorch import NeuralMemory

    return NeuralMemory(
        dim=cfg["dim"],
        chunk_size=cfg["chunk_size"],
        heads=cfg["heads"],
        dim_head=cfg["dim_head"],
        default_model_kwargs=dict(depth=DEPTH, expansion_factor=float(EXPANSION)),
    )


def workload(implementation: str, module: torch.nn.Module, x: torch.Tensor, backward: bool) -> None:
    """Write `x` into an empty memory and read at every position; optionally backward a loss."""
    with torch.set_grad_enabled(backward):
        if implementation == "graftkit":
            state = module.write(x, module.init_state(x.shape[0]))
            reads = module.read(x, state)
        else:
            reads, _ = module(x)
        if backward:
            reads.square().mean().backward()
            module.zero_grad(set_to_none=True)
    assert torch.isfinite(reads).all(), f"{implementation}: non-finite reads"


def time_all(cfg: dict) -> dict[tuple[str, str], list[float]]:
    """Wall-clock seconds per (implementation, mode), alternating implementations every repeat."""
    torch.manual_seed(0)
    x = torch.randn(cfg["batch"], cfg["tokens"], cfg["dim"])
    modules = {name: build(name, cfg) for name in IMPLEMENTATIONS}
    times: dict[tuple[str, str], list[float]] = {}
    for mode in MODES:
        backward = mode == "with backward"
        for name in IMPLEMENTATIONS:  # warm-up
            workload(name, modules[name], x, backward)
        for repeat in range(cfg["repeats"]):
            order = IMPLEMENTATIONS if repeat % 2 == 0 else IMPLEMENTATIONS[::-1]
            for name in order:
                start = time.perf_counter()
                workload(name, modules[name], x, backward)
                times.setdefault((name, mode), []).append(time.perf_counter() - start)
    return times


def cpu_pressure() -> float | None:
    """Linux PSI: % of the last 60 s in which some runnable task waited for a CPU (None if unknown)."""
    try:
        with open("/proc/pressure/cpu") as pressure:
            some = pressure.readline().split()
        return float(dict(field.split("=") for field in some[1:])["avg60"])
    except (OSError, KeyError, ValueError, IndexError):
        return None


def peak_memory(implementation: str, mode: str, quick: bool, threads: int) -> dict:
    """Run one workload in a fresh interpreter and return its peak-RSS figures (MiB)."""
    command = [sys.executable, __file__, "--measure-memory", implementation, mode, "--threads", str(threads)]
    if quick:
        command.append("--quick")
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_memory_here(implementation: str, mode: str, cfg: dict) -> None:
    torch.manual_seed(0)
    x = torch.randn(cfg["batch"], cfg["tokens"], cfg["dim"])
    module = build(implementation, cfg)
    # one small run first, so one-time lazy initialisation (thread pools, torch.func) is not counted
    workload(implementation, module, x[:1, : 2 * cfg["chunk_size"]], mode == "with backward")
    with open("/proc/self/clear_refs", "w") as marks:
        marks.write("5")  # reset the peak-RSS mark to the current resident size
    before = _status_mib("VmRSS")
    workload(implementation, module, x, mode == "with backward")
    peak = _status_mib("VmHWM")
    print(json.dumps({"peak_mib": peak, "growth_mib": peak - before}))


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (1 × 256 tokens, 2 repeats)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per implementation and mode")
    parser.add_argument("--measure-memory", nargs=2, metavar=("IMPL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        metadata.version("titans-pytorch")
    except metadata.PackageNotFoundError:
        print("titans-pytorch is not installed: pip install titans-pytorch==0.5.5 (or graftkit[bench])", file=sys.stderr)
        return 1
    cfg = dict(QUICK if args.quick else FULL)
    if args.repeats:
        cfg["repeats"] = args.repeats
    torch.set_num_threads(args.threads)
    if args.measure_memory:
        measure_memory_here(*args.measure_memory, cfg)
        return 0

    busy_before = cpu_pressure()
    times = time_all(cfg)
    busy_after = cpu_pressure()
    memory = {(name, mode): peak_memory(name, mode, args.quick, args.threads) for mode in MODES for name in IMPLEMENTATIONS}
    tokens = cfg["batch"] * cfg["tokens"]
    print(
        f"titans memory, CPU ({os.cpu_count()} cores, {args.threads} torch threads, {platform.machine()}), "
        f"torch {torch.__version__}, titans-pytorch {metadata.version('titans-pytorch')}; "
        f"dim {cfg['dim']}, {cfg['heads']} heads × {cfg['dim_head']}, MLP depth {DEPTH} × expansion {EXPANSION}, "
        f"chunk {cfg['chunk_size']}, batch {cfg['batch']} × {cfg['tokens']} tokens; "
        f"median (fastest) of {cfg['repeats']} alternating repeats"
    )
    if busy_before is not None and busy_after is not None:
        print(
            f"CPU pressure (share of time some task waited for a CPU, last 60 s): {busy_before:.0f}% before the "
            f"timings, {busy_after:.0f}% after; above a few % the machine was shared and times are inflated"
        )
    print()
    print("| implementation | mode | median s (fastest) | tokens/s (median) | peak RSS growth MiB (peak MiB) |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        for name in IMPLEMENTATIONS:
            t = times[(name, mode)]
            mem = memory[(name, mode)]
            print(
                f"| {name} | {mode} | {statistics.median(t):.3f} ({min(t):.3f}) | {tokens / statistics.median(t):,.0f} "
                f"| {mem['growth_mib']:,.0f} ({mem['peak_mib']:,.0f}) |"
            )
    print()
    for mode in MODES:
        ours, theirs = (statistics.median(times[(name, mode)]) for name in IMPLEMENTATIONS)
        fastest = min(times[("titans-pytorch", mode)]) / min(times[("graftkit", mode)])
        growth = {name: memory[(name, mode)]["growth_mib"] for name in IMPLEMENTATIONS}
        print(
            f"{mode}: graftkit has {theirs / ours:.2f}× the throughput of titans-pytorch (medians; fastest vs "
            f"fastest {fastest:.2f}×); peak RSS growth {growth['graftkit']:,.0f} MiB vs {growth['titans-pytorch']:,.0f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
