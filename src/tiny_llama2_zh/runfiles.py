"""The files a run folder holds for people to read: `metrics.jsonl` (one JSON record per log line) and its curves
as PNG. Written by the training plumbing, read by `tinyllm plot`, the demo summary and the report."""

import json
from collections.abc import Iterable
from pathlib import Path

from tiny_llama2_zh.errors import UsageError

METRICS_FILE = "metrics.jsonl"

# Curves drawn when present, one panel each: (title, [(metric key, legend label, style)]).
PANELS: list[tuple[str, list[tuple[str, str, str]]]] = [
    ("loss (nats / token)", [("loss", "train", "-"), ("eval_loss", "validation", "o-")]),
    ("learning rate", [("learning_rate", "learning rate", "-")]),
    ("gradient norm", [("grad_norm", "gradient norm", "-")]),
    ("tokens / s", [("tokens_per_second", "tokens/s", "-")]),
    # reward model
    ("pair accuracy", [("accuracy", "train batches", "-"), ("eval_accuracy", "held out", "o-")]),
    ("reward margin (chosen - rejected)", [("margin", "train batches", "-"), ("eval_margin", "held out", "o-")]),
    # PPO / RLOO
    ("reward-model score", [("score", "rollouts", "-"), ("eval_score", "held-out prompts", "o-")]),
    ("KL to the reference (nats / reply)", [("kl", "rollouts", "-"), ("eval_kl", "held-out prompts", "o-")]),
    ("policy and value loss", [("policy_loss", "policy", "-"), ("value_loss", "value", "-")]),
    ("clip fraction / approx. KL", [("clip_fraction", "clip fraction", "-"), ("approx_kl", "approx. KL", "-")]),
    ("entropy (nats / token)", [("entropy", "entropy", "-")]),
    ("reply length (tokens)", [("response_length", "rollouts", "-"), ("eval_response_length", "held out", "o-")]),
]


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl. A line cut short by a crash (the last one) is skipped, not fatal."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is it a run folder written by a tinyllm recipe?")
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                continue  # the process died mid-write; everything before it is intact
            raise UsageError(f"{path}:{number}: not a JSON record ({error.msg})") from error
    return records


def append_metrics(path: str | Path, records: Iterable[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Keep the records up to `last_step` (a resumed run recomputes the rest), replacing the file atomically."""
    path = Path(path)
    if not path.exists():
        return
    kept = [record for record in read_metrics(path) if record.get("step", 0) <= last_step]
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    temporary.replace(path)


def plot_curves(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """One PNG with a panel for every curve the run logged (loss and validation loss first)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / METRICS_FILE)
    panels = []
    for title, curves in PANELS:
        series = []
        for key, label, style in curves:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                series.append((points, label, style))
        if series:
            panels.append((title, series))
    if not panels or panels[0][0] != PANELS[0][0]:
        raise UsageError(f"{run_dir / METRICS_FILE} holds no loss values to plot")
    columns = min(len(panels), 4)
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), dpi=100, squeeze=False)
    for axis in axes.flat[len(panels) :]:
        axis.set_visible(False)
    for axis, (title, series) in zip(axes.flat, panels):
        for points, label, style in series:
            axis.plot(*zip(*points), style, label=label, linewidth=1.2, markersize=3)
        axis.set_xlabel("optimizer step")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(run_dir.name)
    output = Path(output) if output else run_dir / "loss.png"
    figure.tight_layout()
    figure.savefig(output)
    plt.close(figure)
    return output
