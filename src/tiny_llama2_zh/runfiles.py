"""The files a run folder holds for people to read: `metrics.jsonl` (one JSON record per log line) and its curves
as PNG. Written by the training plumbing, read by `tinyllm plot`, the demo summary and the report."""

import fnmatch
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tiny_llama2_zh.errors import UsageError

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class Panel:
    """One chart of a run's curves: (metric key, legend label, line style) for each curve it may draw. A key with a
    `*` matches every logged key of that shape, labelled by the part the `*` stands for (TRL logs one
    `rewards/<function>/mean` per reward function). `only_with`: drawn only in runs that logged one of those keys,
    for a key whose meaning depends on the stage (`eval_accuracy` is pairs ranked right for the reward model and
    DPO, answers right for GRPO)."""

    title: str
    curves: tuple[tuple[str, str, str], ...]
    only_with: tuple[str, ...] = ()


# Curves drawn when present, one panel each, loss first.
PANELS: tuple[Panel, ...] = (
    Panel("loss (nats / token)", (("loss", "train", "-"), ("eval_loss", "validation", "o-"))),
    Panel("learning rate", (("learning_rate", "learning rate", "-"),)),
    Panel("gradient norm", (("grad_norm", "gradient norm", "-"),)),
    Panel("tokens / s", (("tokens_per_second", "tokens/s", "-"),)),
    # reward model and DPO (TRL's DPO logs its batches' pair accuracy and margin as rewards/accuracies, /margins)
    Panel(
        "pair accuracy",
        (
            ("accuracy", "train batches", "-"),
            ("rewards/accuracies", "train batches", "-"),
            ("eval_accuracy", "held out", "o-"),
        ),
        only_with=("margin", "rewards/margins"),  # logged by the reward model's and DPO's train batches
    ),
    Panel(
        "reward margin (chosen - rejected)",
        (
            ("margin", "train batches", "-"),
            ("rewards/margins", "train batches", "-"),
            ("eval_margin", "held out", "o-"),
        ),
    ),
    # GRPO and RLOO (TRL): the rewards of each step's sampled replies, the share of prompts whose replies all scored
    # alike (their advantages are 0: no learning signal), and greedy accuracy on held-out prompts
    Panel(
        "rewards of sampled replies (mean)",
        (("reward", "sum of the rewards", "-"), ("rewards/*/mean", "*", "-")),
        only_with=("reward_std",),
    ),
    Panel("prompts whose replies all scored alike", (("frac_reward_zero_std", "share of a step's prompts", "-"),)),
    Panel("held-out task accuracy (greedy)", (("eval_accuracy", "held out", "o-"),), only_with=("reward_std",)),
    # PPO and RLOO: the reward model's score, and the independent judge that would show the score being gamed
    Panel("reward-model score", (("score", "rollouts", "-"), ("eval_score", "held-out prompts", "o-"))),
    Panel("replies an independent judge reads as wanted", (("eval_judge_positive", "held-out prompts", "o-"),)),
    Panel("KL to the reference (nats / reply)", (("kl", "rollouts", "-"), ("eval_kl", "held-out prompts", "o-"))),
    Panel(
        "policy, value and PPO-ptx loss",
        (("policy_loss", "policy", "-"), ("value_loss", "value", "-"), ("ptx_loss", "PPO-ptx", "-")),
    ),
    Panel("clip fraction / approx. KL", (("clip_fraction", "clip fraction", "-"), ("approx_kl", "approx. KL", "-"))),
    Panel("entropy (nats / token)", (("entropy", "entropy", "-"),)),
    Panel(
        "reply length (tokens)",
        (
            ("response_length", "rollouts", "-"),
            ("completions/mean_length", "sampled replies", "-"),
            ("eval_response_length", "held out", "o-"),
        ),
    ),
)

Series = tuple[list[tuple[int, float]], str, str]  # (step, value) points, legend label, line style


def _matching_keys(pattern: str, logged: set[str]) -> list[tuple[str, str]]:
    """(key, what its `*` stands for) for every logged key a curve's pattern matches; a plain key matches itself."""
    if "*" not in pattern:
        return [(pattern, "")] if pattern in logged else []
    prefix, suffix = pattern.split("*", 1)
    return [
        (key, key[len(prefix) : len(key) - len(suffix)]) for key in sorted(logged) if fnmatch.fnmatchcase(key, pattern)
    ]


def panel_series(records: list[dict]) -> list[tuple[str, list[Series]]]:
    """The panels a run's records fill: (title, [(points, label, style)]) in PANELS' order, empty ones left out."""
    logged = {key for record in records for key, value in record.items() if isinstance(value, (int, float))}
    panels = []
    for panel in PANELS:
        if panel.only_with and logged.isdisjoint(panel.only_with):
            continue
        series = []
        for pattern, label, style in panel.curves:
            for key, name in _matching_keys(pattern, logged):  # logged: each key has a number in some record
                points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
                series.append((points, label.replace("*", name), style))
        if series:
            panels.append((panel.title, series))
    return panels


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
    panels = panel_series(records)
    if not panels or panels[0][0] != PANELS[0].title:
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
