"""Loss curves as PNG from a run's metrics.jsonl (train loss per logging step, validation loss per evaluation)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt

from tiny_llama2_zh.train.common import read_metrics


def plot_loss_curves(run_dir: str | Path, output: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    validation = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not validation:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no loss values to plot")
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        axes.plot(*zip(*train), label="train loss", linewidth=1.2)
    if validation:
        axes.plot(*zip(*validation), "o-", label="validation loss", linewidth=1.5)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (nats / token)")
    axes.set_title(f"loss: {run_dir.name}")
    axes.grid(alpha=0.3)
    axes.legend()
    output = Path(output) if output else run_dir / "loss.png"
    figure.tight_layout()
    figure.savefig(output)
    plt.close(figure)
    return output
