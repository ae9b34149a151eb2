"""`tinyllm report RUN_DIR...`: the report card of a run — one `report.md` with PNGs that says how good each stage's
model is and how it trained, from the files the stages already wrote (nothing is re-measured here).

A RUN_DIR is a demo folder (`tinyllm demo`: one sub-folder per stage and `demo_state.json`) or any stage's run folder
(`train.output_dir` of pretrain, sft, reward, ppo, rloo, dpo, grpo; a `quantize --report` folder; an `eval` folder).
Every section names the command that produced its figures, after nanochat's report card.
"""

import json
import math
from pathlib import Path

from tiny_llama2_zh.eval.goals import evaluate_goals, goals_as_dicts, goals_table
from tiny_llama2_zh.eval.markdown import table
from tiny_llama2_zh.recipes import RECIPES
from tiny_llama2_zh.runfiles import METRICS_FILE, plot_curves

TRAINING_STAGES = tuple(RECIPES)
FILES_DIR = "report_files"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _stage_runs(run_dirs: list[Path]) -> list[tuple[str, Path, dict]]:
    """(stage, folder, summary.json) of every finished training run under the given folders, in pipeline order."""
    found, seen = [], set()
    for run_dir in run_dirs:
        for folder in [run_dir, *sorted(p for p in run_dir.iterdir() if p.is_dir())]:
            summary = _read_json(folder / "summary.json")
            if summary and summary.get("stage") in TRAINING_STAGES and folder.resolve() not in seen:
                seen.add(folder.resolve())  # a stage folder given on its own and inside its demo folder: once
                found.append((summary["stage"], folder, summary))
    return sorted(found, key=lambda run: TRAINING_STAGES.index(run[0]))


def _loss_line(summary: dict) -> str | None:
    before, after = summary.get("initial_validation_loss"), summary.get("final_validation_loss")
    if before is None or after is None:
        return None
    return (
        f"validation loss {before:.3f} -> {after:.3f} (perplexity {math.exp(min(before, 50)):,.1f} -> "
        f"{math.exp(min(after, 50)):,.1f})"
    )


def _stage_facts(stage: str, summary: dict) -> list[str]:
    facts = [f"{summary.get('steps', '?')} optimizer steps in {summary.get('train_seconds', 0):.0f} s"]
    tokens, seconds = summary.get("tokens_seen") or 0, summary.get("train_seconds") or 0
    if tokens and seconds:
        facts.append(f"{tokens:,} tokens seen, {tokens / seconds:,.0f} tokens/s")
    if stage in ("pretrain", "sft") and (loss := _loss_line(summary)):
        facts.append(loss)
    initial, final = summary.get("initial") or {}, summary.get("final") or {}
    if stage in ("reward", "dpo") and "accuracy" in final:
        per_source = ", ".join(
            f"{source} {100 * value['accuracy']:.1f} %" for source, value in final.get("per_source", {}).items()
        )
        label = "held-out pair accuracy" if stage == "reward" else "held-out implicit-reward accuracy"
        facts.append(
            f"{label} {100 * initial.get('accuracy', float('nan')):.1f} % -> {100 * final['accuracy']:.1f} % "
            f"({per_source}); margin {final.get('margin', float('nan')):+.3f}"
        )
    if stage in ("ppo", "rloo") and "eval_score" in final:
        facts.append(
            f"reward-model score of held-out replies {initial.get('eval_score', float('nan')):+.3f} -> "
            f"{final['eval_score']:+.3f}, KL to the SFT model {final.get('eval_kl', float('nan')):.3f} nats/reply"
        )
    if stage == "grpo" and "eval_accuracy" in final:
        facts.append(
            f"held-out task accuracy {100 * initial.get('eval_accuracy', float('nan')):.1f} % -> "
            f"{100 * final['eval_accuracy']:.1f} %"
        )
    return facts


def _bar_chart(values: dict[str, float], title: str, xlabel: str, output: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 0.4 * len(values) + 1.2), dpi=100)
    names = list(values)[::-1]
    axis.barh(names, [values[name] for name in names])
    axis.set_xlabel(xlabel)
    axis.set_title(title)
    axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(output)
    plt.close(figure)
    return output


def _quantize_command(folder: Path) -> str:
    report = _read_json(folder / "quantize_report.json") or {}
    parts = [
        "tinyllm quantize --report",
        *(f"--model {source}" for source in report.get("sources", [])),
        f"--output {folder}",
    ]
    if report.get("validation"):
        parts.append(f"--validation {report['validation']} --max-blocks {report['validation_blocks']}")
    if report.get("tasks"):
        parts.append(f"--tasks {report['tasks']} --limit {report['task_rows']}")
    return " ".join(parts)


def _mc_command(path: Path) -> str:
    result = _read_json(path) or {}
    models = " ".join(f"--model {model['name']}" for model in result.get("models", []))
    limit = f" --limit {result['limit']}" if result.get("limit") else ""
    tasks = f" --tasks-dir {result['tasks_dir']}" if result.get("tasks_dir") else ""
    return f"tinyllm eval mc --idioms{tasks} --shots {result.get('shots', 0)}{limit} {models} --output {path.parent}"


def _embedded(path: Path) -> str:
    """A stage's own markdown report, its headings moved under the card's section heading."""
    text = path.read_text(encoding="utf-8").strip()
    return "\n".join("###" + line if line.startswith("#") else line for line in text.splitlines())


def _section(title: str, command: str, body: list[str]) -> list[str]:
    return ["", f"## {title}", "", f"Produced by: `{command}`", "", *body]


def write_report(run_dirs: list[str | Path], output: str | Path | None = None) -> Path:
    """Write the report card for `run_dirs` to `output` (default: FIRST_RUN_DIR/report.md) and return its path."""
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise FileNotFoundError(f"{run_dir} is not a folder (a demo folder or a stage's run folder)")
    output = Path(output) if output else run_dirs[0] / "report.md"
    files = output.parent / FILES_DIR
    files.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Report card",
        "",
        f"Runs: {', '.join(f'`{run_dir}`' for run_dir in run_dirs)}. Re-create with "
        f"`tinyllm report {' '.join(str(run_dir) for run_dir in run_dirs)}`.",
    ]
    relative = lambda path: path.relative_to(output.parent).as_posix()  # noqa: E731

    for run_dir in run_dirs:
        state = _read_json(run_dir / "demo_state.json")
        if state:
            goals = goals_as_dicts(evaluate_goals(run_dir))
            met = sum(goal["met"] is True for goal in goals)
            lines += _section(
                f"Goals ({run_dir}): {met} of {len(goals)} met, this run (one seed)",
                "the files of the stages below (eval/goals.py says what each goal is)",
                [goals_table(goals)],
            )
            seconds = {stage: done["seconds"] for stage, done in state["stages"].items() if stage != "report"}
            chart = _bar_chart(seconds, "wall time per stage", "seconds", files / f"{run_dir.name}-wall-time.png")
            total = sum(seconds.values())
            rows = [*((stage, f"{value:.1f}") for stage, value in seconds.items())]
            rows.append(("**total**", f"**{total:.1f}** ({total / 60:.1f} min)"))
            wall = table(("stage", "seconds"), rows).splitlines()
            lines += _section(
                f"Wall time ({run_dir})", f"tinyllm demo --output {run_dir}", [*wall, "", f"![]({relative(chart)})"]
            )
        corpus = _read_json(run_dir / "corpus" / "stats.json")
        if corpus:
            splits = [
                (split, f"{corpus[split]['documents']:,}", f"{corpus[split]['characters']:,}")
                for split in ("train", "validation")
            ]
            body = [
                table(("split", "documents", "characters"), splits),
                "",
                "Documents kept per source: "
                + ", ".join(f"{name} {count:,}" for name, count in corpus.get("per_source_documents", {}).items())
                + f"; exact duplicates dropped: {corpus.get('duplicates_dropped', 0):,}.",
            ]  # fmt: skip
            for split in ("train", "validation"):
                manifest = _read_json(run_dir / "data" / f"{split}.bin.json")
                if manifest:
                    body.append(
                        f"- {split}.bin: {manifest['num_tokens']:,} tokens, {manifest['num_documents']:,} documents"
                    )
            lines += _section("Data", f"tinyllm data demo --output {run_dir / 'corpus'}", body)
        for report in sorted(run_dir.glob("**/prepare_report.json")):
            lines += _section(
                f"Data preparation ({report.parent})",
                "tinyllm data prepare ...",
                ["```json", json.dumps(_read_json(report), indent=1, ensure_ascii=False)[:3000], "```"],
            )

    for stage, folder, summary in _stage_runs(run_dirs):
        body = [f"- {fact}" for fact in _stage_facts(stage, summary)]
        if (folder / METRICS_FILE).is_file():
            try:
                chart = plot_curves(folder, files / f"{folder.parent.name}-{folder.name}-curves.png")
                body += ["", f"![{stage} curves]({relative(chart)})"]
            except ValueError as error:  # a run with no loss logged yet
                body.append(f"- (no curves: {error})")
        for extra in ("reward_eval.md", "dpo_eval.md"):
            if (folder / extra).is_file():
                body += ["", _embedded(folder / extra)]
        lines += _section(f"{stage} ({folder})", f"tinyllm {stage} --config {folder / 'config.yaml'}", body)

    for run_dir in run_dirs:
        tasks = _read_json(run_dir / "eval" / "tasks.json") or _read_json(run_dir / "tasks.json")
        if tasks:
            from tiny_llama2_zh.eval.tasks import markdown_table as tasks_table

            models = {Path(row["path"]).parent.name if row.get("path") else row["name"]: row for row in tasks["rows"]}
            accuracy = {
                name: 100 * row["tasks"]["sentiment"]["metrics"]["accuracy"]
                for name, row in models.items()
                if "sentiment" in row["tasks"]
            }
            chart = _bar_chart(accuracy, "held-out sentiment accuracy", "%", files / f"{run_dir.name}-sentiment.png")
            command = f"tinyllm eval tasks --data {tasks['data']} --limit {tasks['limit']} --model ..."
            lines += _section("Evaluation: demo tasks", command, [tasks_table(tasks), "", f"![]({relative(chart)})"])
        for name, title, command in (
            (
                "eval/policies.md",
                "Evaluation: the policies side by side (reward-model score, KL to SFT)",
                "tinyllm eval policies (see eval/policies.json's settings)",
            ),
            ("eval/mc.md", "Evaluation: multiple choice", _mc_command(run_dir / "eval" / "mc.json")),
            ("eval/eval.md", "Evaluation: all benchmarks", "tinyllm eval all (see eval.json's settings)"),
            ("quantize/quantize_report.md", "Quantisation", _quantize_command(run_dir / "quantize")),
            ("export/exports.md", "Exports", f"tinyllm export check --model {run_dir / 'sft' / 'final'} ..."),
        ):
            path = run_dir / name
            if path.is_file():
                lines += _section(title, command, [_embedded(path)])

    output.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for run_dir in run_dirs:
        if (run_dir / "demo_state.json").is_file():
            write_summary(run_dir)
    return output


# ------------------------------------------------------------------------------------------ summary.md
def demo_summary(run_dir: Path) -> dict:
    """The headline figures of a demo folder, read from the files its stages wrote (summary.json)."""
    read = lambda name: _read_json(run_dir / name) or {}  # noqa: E731
    state = read("demo_state.json").get("stages", {})
    summary: dict = {
        "output_dir": str(run_dir),
        "stage_seconds": {stage: done["seconds"] for stage, done in state.items()},
        "corpus": read("corpus/stats.json"),
        "tokens": {split: read(f"data/{split}.bin.json").get("num_tokens") for split in ("train", "validation")},
        "tasks": read("tasks/stats.json"),
    }
    for stage in TRAINING_STAGES:
        if stage_summary := read(f"{stage}/summary.json"):
            summary[stage] = stage_summary
    summary["eval"] = read("eval/tasks.json")
    summary["policies"] = read("eval/policies.json")
    summary["goals"] = goals_as_dicts(evaluate_goals(run_dir))
    return summary


def _task_rows(evaluation: dict) -> list[tuple]:
    rows = []
    for row in evaluation.get("rows", []):
        name = Path(row["path"]).parent.name if row.get("path") else row["name"]
        cells = []
        for task, result in row["tasks"].items():
            metric = result.get("headline") or next(iter(result["metrics"]))
            value = result["metrics"][metric]
            cells.append(f"{task} {metric} {100 * value:.1f} %" if isinstance(value, float) else f"{task} {value}")
        rows.append((name, "; ".join(cells)))
    return rows


def summary_markdown(summary: dict) -> str:
    """summary.md: one line per stage with the figure that says whether it did its job, then the held-out tasks."""
    lines = ["# tiny-llama2-zh demo: summary", "", f"Folder `{summary['output_dir']}`; the full card is report.md.", ""]
    if goals := summary.get("goals"):
        met = sum(goal["met"] is True for goal in goals)
        lines += [f"## Goals: {met} of {len(goals)} met (this run, one seed)", "", goals_table(goals), ""]
    facts = []
    if corpus := summary.get("corpus"):
        facts.append(("corpus", f"{corpus['train']['documents']:,} train / {corpus['validation']['documents']:,} "
                      "validation documents"))  # fmt: skip
    if all(summary.get("tokens", {}).values()):
        facts.append(
            ("tokens", f"{summary['tokens']['train']:,} train / {summary['tokens']['validation']:,} validation")
        )
    for stage in TRAINING_STAGES:
        if stage in summary:
            stage_facts = _stage_facts(stage, summary[stage])  # the first (steps, time) only if alone
            facts += [(stage, fact) for fact in stage_facts[1:] or stage_facts]
    if parameters := summary.get("pretrain", {}).get("parameters"):
        facts.insert(
            0, ("model", f"{parameters['total']:,} parameters ({parameters['non_embedding']:,} without embedding)")
        )
    lines += [table(("stage", "figure"), facts, left=2), ""]
    if summary.get("eval"):
        tasks = table(("model", "accuracy"), _task_rows(summary["eval"]), left=2)
        lines += ["## Held-out tasks (greedy replies)", "", tasks, ""]
    policies = Path(summary["output_dir"]) / "eval" / "policies.md"
    if policies.is_file():
        lines += ["## Policies on PPO's held-out prompts (sampled replies)", "", policies.read_text().strip(), ""]
    seconds = summary["stage_seconds"]
    lines.append("Wall time: " + ", ".join(f"{stage} {value:.0f} s" for stage, value in seconds.items())
                 + f"; total {sum(seconds.values()) / 60:.1f} min.")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_summary(run_dir: Path) -> Path:
    summary = demo_summary(run_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (run_dir / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")
    return run_dir / "summary.md"
