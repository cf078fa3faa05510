"""PNG plots of a run's metrics.jsonl (loss, answer accuracy, evaluation accuracy)."""

from __future__ import annotations

import json
from pathlib import Path


def metric_lines(path: Path) -> list[tuple[str, dict]]:
    """(line, object) of each line of metrics.jsonl that is a whole JSON object: a line torn by a crash is skipped."""
    out = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            out.append((line, row))
    return out


def plot_metrics(metrics_path: Path, out_dir: Path) -> list[Path]:
    import matplotlib  # imported only to draw: it takes a while to load

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [row for _, row in metric_lines(metrics_path)]
    train = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "eval" in r]
    written = []
    if train:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in train], [r["loss"] for r in train])
        ax.set(xlabel="step", ylabel="turn-2 answer loss", title="training loss")
        ax.grid(alpha=0.3)
        written.append(_save(fig, out_dir / "loss.png"))
    if train or evals:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if train:
            ax.plot([r["step"] for r in train], [r["answer_acc"] for r in train], label="train answer acc (teacher-forced)")
        for key in sorted({k for r in evals for k in r["eval"]}):
            ax.plot([r["step"] for r in evals], [r["eval"].get(key) for r in evals], marker="o", label=f"eval {key}")
        ax.set(xlabel="step", ylabel="accuracy", ylim=(0, 1), title="accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / "accuracy.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
