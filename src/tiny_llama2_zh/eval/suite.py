"""`tinyllm eval all`: every evaluation that applies, for each model, in one table (eval.json + eval.md).

For each --model: perplexity on held-out token shards (--data; `tiny_llama2_zh.eval.perplexity`), the demo tasks'
held-out prompts (--tasks; `tiny_llama2_zh.eval.tasks`, greedy chat replies) and the multiple-choice benchmarks
(--ceval-dir, --cmmlu-dir, --idioms; `tiny_llama2_zh.eval.multiple_choice`). Whatever is not given is left out.

eval.json (read by the report card):

    {
      "settings": {"data": str|null, "tasks": str|null, "ceval_dir": str|null, "cmmlu_dir": str|null,
                   "idioms": bool, "shots": int, "limit": int|null, "task_rows": int|null, "max_blocks": int|null},
      "columns": [{"key": "ppl"|"tasks.<task>.<metric>"|"mc.<benchmark>.<subject or 'average'>", "header": str}],
      "models": [{
          "name": str, "path": str,
          "perplexity": {"loss": float, "perplexity": float, "tokens": int, "blocks": int} | null,
          "tasks": {"<task>": {"rows": int, "metrics": {...}, "max_new_tokens": int, ...}} | null,
          "mc": {"shots": int, "subjects": [{benchmark, subject, name, split, questions, correct, acc, acc_norm,
                 chance, predictions}], "averages": {"<benchmark>": {subjects, questions, acc, acc_norm,
                 acc_pooled, chance}}} | null,
          "row": {"<column key>": float|null}        (the table's numbers, fractions; perplexity as is)
      }],
      "baseline": {"row": {"<column key>": float|null}, "tasks": {...trivial baseline...}|null},
      "tasks_info": {...eval tasks' per-task info...}|null, "mc_tasks": [{benchmark, subject, split, questions,
      source}]|null, "questions_digest": str|null
    }

`row` holds one number per column so a reader needs no knowledge of each evaluation: accuracy-like values are
fractions in [0, 1], `ppl` is a perplexity (lower is better). The baseline row holds the trivial baselines of the
demo tasks and the chance level of each multiple-choice column.
"""

import argparse
import glob
from pathlib import Path

from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.eval import multiple_choice as mc
from tiny_llama2_zh.eval.markdown import note, percent, table, write_result


def _stderr(message: str) -> None:
    note("eval all", message)


def resolve_data(data: str | Path) -> str:
    """A .bin, a glob, or a folder: a folder stands for its validation*.bin shards (`tinyllm data prepare` writes
    validation-*.bin; the demo writes validation.bin)."""
    path = Path(data)
    if path.is_dir():
        pattern = str(path / "validation*.bin")
        if not glob.glob(pattern):
            raise FileNotFoundError(f"--data {path} holds no validation*.bin")
        return pattern
    if not glob.glob(str(data)):
        raise FileNotFoundError(f"--data {data} matches no file")
    return str(data)


def _columns(task_result: dict | None, mc_tasks: list[mc.MCTask]) -> list[tuple[str, str]]:
    from tiny_llama2_zh.eval.tasks import TABLE_COLUMNS

    columns = []
    if task_result is not None:
        columns += [
            (f"tasks.{task}.{metric}", header) for task, metric, header in TABLE_COLUMNS if task in task_result["tasks"]
        ]
    for benchmark in dict.fromkeys(task.benchmark for task in mc_tasks):
        subjects = [task for task in mc_tasks if task.benchmark == benchmark]
        if benchmark == "idioms":  # two different tasks: a column each
            columns += [(f"mc.{benchmark}.{task.subject}", f"{task.subject} acc") for task in subjects]
        else:
            columns.append((f"mc.{benchmark}.average", f"{benchmark} acc"))
    return columns


def _mc_value(mc_result: dict | None, benchmark: str, subject: str, key: str = "acc") -> float | None:
    if mc_result is None:
        return None
    if subject == "average":
        average = mc_result["averages"].get(benchmark)
        return average[key] if average else None
    found = next((s for s in mc_result["subjects"] if s["benchmark"] == benchmark and s["subject"] == subject), None)
    return found[key] if found else None


def _row(columns, perplexity: dict | None, tasks: dict | None, mc_result: dict | None, chance=False) -> dict:
    row: dict[str, float | None] = {}
    row["ppl"] = perplexity["perplexity"] if perplexity else None
    for key, _ in columns:
        kind, first, second = key.split(".", 2)
        if kind == "tasks":
            scored = (tasks or {}).get(first)
            row[key] = scored["metrics"][second] if scored else None
        else:
            row[key] = _mc_value(mc_result, first, second, "chance" if chance else "acc")
    return row


def evaluate_all(args: argparse.Namespace) -> dict:
    from dataclasses import asdict

    from tiny_llama2_zh.eval.perplexity import evaluate_perplexity
    from tiny_llama2_zh.eval.tasks import evaluate_tasks
    from tiny_llama2_zh.loading import check_model_folder

    if not args.model:
        raise UsageError("no model to evaluate: pass --model DIR")
    for folder in args.model:  # a typo fails before anything slow runs
        check_model_folder(folder)
    has_mc = bool(args.ceval_dir or args.cmmlu_dir or args.idioms)
    if not (args.data or args.tasks or has_mc):
        raise UsageError("nothing to evaluate: pass --data, --tasks, --ceval-dir, --cmmlu-dir and/or --idioms")
    data = resolve_data(args.data) if args.data else None
    mc_tasks = mc.load_tasks(args.ceval_dir, args.cmmlu_dir, args.idioms, args.limit) if has_mc else []

    task_result = None
    if args.tasks:
        task_result = evaluate_tasks(args.model, args.tasks, args.task_rows, batch_size=args.batch_size)
    mc_result = mc.evaluate_mc(args.model, mc_tasks, args.shots, args.limit, args.mc_batch_size) if has_mc else None
    columns = _columns(task_result, mc_tasks)

    models = []
    for index, folder in enumerate(args.model):
        perplexity = None
        if data:
            result = evaluate_perplexity(folder, data, None, args.batch_size, args.max_blocks)
            perplexity = {**asdict(result), "data": data}
        tasks = None
        if task_result is not None:
            tasks = [r for r in task_result["rows"] if r["kind"] == "model"][index]["tasks"]  # in --model order
        model_mc = mc_result["models"][index] if mc_result else None
        models.append(
            {
                "name": str(folder),
                "path": str(Path(folder).resolve()),
                "perplexity": perplexity,
                "tasks": tasks,
                "mc": model_mc,
                "row": _row(columns, perplexity, tasks, model_mc),
            }
        )
    baseline_tasks = task_result["rows"][0]["tasks"] if task_result else None
    chance_source = mc_result["models"][0] if mc_result else None
    return {
        "settings": {
            "data": data,
            "tasks": args.tasks,
            "ceval_dir": args.ceval_dir,
            "cmmlu_dir": args.cmmlu_dir,
            "idioms": bool(args.idioms),
            "shots": args.shots,
            "limit": args.limit,
            "task_rows": args.task_rows,
            "max_blocks": args.max_blocks,
        },
        "columns": ([{"key": "ppl", "header": "perplexity"}] if data else [])
        + [{"key": key, "header": header} for key, header in columns],
        "models": models,
        "baseline": {
            "row": _row(columns, None, baseline_tasks, chance_source, chance=True),
            "tasks": baseline_tasks,
        },
        "tasks_info": task_result["tasks"] if task_result else None,
        "mc_tasks": mc_result["tasks"] if mc_result else None,
        "questions_digest": mc.questions_digest(mc_tasks) if mc_tasks else None,
    }


def _cell(key: str, value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if key == "ppl" else percent(value)


def markdown_report(result: dict) -> str:
    """eval.md: one row per model, a baseline/chance row, then the multiple-choice subjects."""
    columns = result["columns"]
    named = [(model["name"], model["row"]) for model in result["models"]]
    named.append(("baseline / chance", result["baseline"]["row"]))
    rows = [(name, *(_cell(c["key"], row.get(c["key"])) for c in columns)) for name, row in named]
    lines = ["# Evaluation", "", table(("model", *(c["header"] for c in columns)), rows)]
    settings = result["settings"]
    lines += ["", "Sources:"]
    if settings["data"]:
        blocks = f", first {settings['max_blocks']} blocks" if settings["max_blocks"] else ""
        lines.append(f"- perplexity: `{settings['data']}`{blocks}")
    if settings["tasks"]:
        lines.append(f"- demo tasks: `{settings['tasks']}` (greedy chat replies; baseline = the trivial baselines)")
    if result["mc_tasks"]:
        lines.append(
            f"- multiple choice, {settings['shots']}-shot, log-likelihood of each choice (lm-eval's scoring); "
            "baseline = chance (25 %)"
            + (f"; first {settings['limit']} questions per subject" if settings["limit"] else "")
        )
        subjects = [
            (model["name"], f"{s['benchmark']}/{s['subject']} ({s['name']})", s["questions"], percent(s["acc"]),
             percent(s["acc_norm"]), percent(s["chance"]))
            for model in result["models"]
            for s in model["mc"]["subjects"]
        ]  # fmt: skip
        headers = ("model", "subject", "questions", "acc", "acc_norm", "chance")
        lines += ["", "## Multiple choice per subject", "", table(headers, subjects, left=2)]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", action="append", required=True, metavar="DIR", help="saved model folder; repeat for several"
    )
    parser.add_argument(
        "--data",
        help="held-out token shards for perplexity: a .bin, a quoted glob, or a folder (its validation*.bin), "
        "e.g. RUN/data",
    )
    parser.add_argument("--tasks", help="demo task folder from `tinyllm data tasks` (e.g. RUN/tasks)")
    mc.add_source_arguments(parser)
    parser.add_argument("--output", required=True, help="folder for eval.json and eval.md")
    parser.add_argument("--task-rows", type=int, default=None, help="demo-task rows per task (default: all)")
    parser.add_argument("--max-blocks", type=int, default=None, help="perplexity on the first N blocks only")
    parser.add_argument("--batch-size", type=int, default=8, help="blocks / prompts per batch (default: 8)")


def write_outputs(result: dict, output_dir: str | Path) -> tuple[Path, Path]:
    return write_result(result, markdown_report(result), output_dir, "eval")


def run(args: argparse.Namespace) -> None:
    result = evaluate_all(args)
    json_path, md_path = write_outputs(result, args.output)
    print(markdown_report(result).split("\nSources:")[0])
    print(f"wrote {json_path} and {md_path}")
