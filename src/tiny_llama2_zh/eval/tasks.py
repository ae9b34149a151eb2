"""`tinyllm eval tasks`: score saved models on the held-out demo tasks (`tinyllm data tasks`), beside trivial
baselines on the same rows.

For every task folder under --data (any task of the registry, `tiny_llama2_zh.data.tasks.TASKS`, that is present)
the rows of `sft-test.jsonl` are read (prompts never trained on: `build_tasks` splits by a hash of the prompt); the
conversation up to the final assistant message is the prompt and that message is the reference. Each model answers
with greedy decoding through the chat template (`greedy_replies`), and the replies are scored by the task's own
metrics (each task module's docstring says what they mean; the table shows each task's `columns`).

One "trivial baseline" row is scored on the same rows: each task's `baseline` (the majority label, one character
per word, the most frequent syllable), some of which need the task's `sft-train.jsonl`. `--baseline-model` adds
model rows marked as baselines (say, the pretrained-only model).

`--limit N` keeps N rows per task, chosen by a hash of the prompt (the N smallest SHA-256 digests), not the first N
lines: `build_tasks` writes every positive review before every negative one, so the first lines would be a
single-label sample. The choice is deterministic and a larger N keeps every row of a smaller one.

Output: a markdown table on stdout; with --output DIR also DIR/tasks.json (every number, per row of the table and
per task, a few example replies) and DIR/tasks.md. Without --output nothing is written: with several models there
is no folder the result obviously belongs to, and an evaluation should not write into model folders unasked.
"""

import argparse
import contextlib
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from tiny_llama2_zh.data.jsonl import ReadReport, read_jsonl
from tiny_llama2_zh.data.tasks import TASKS
from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.eval.markdown import note, percent, table, write_result

TEST_FILE, TRAIN_FILE = "sft-test.jsonl", "sft-train.jsonl"
EXAMPLES_PER_TASK = 3
PROBLEMS_KEPT = 5

# The table's columns: (task, metric key, header), each task's headline metric first.
TABLE_COLUMNS = tuple((name, metric, header) for name, task in TASKS.items() for metric, header in task.columns)


# -------------------------------------------------------------------------------------------- reading rows
@dataclass
class TaskRow:
    conversation: list[dict[str, str]]  # every message before the reference reply
    reference: str
    line: int

    @property
    def prompt(self) -> str:
        return next(m["content"] for m in reversed(self.conversation) if m["role"] == "user")


@dataclass
class TaskFile:
    """The usable rows of one file, and the lines skipped (counted, the first few kept with file and line)."""

    path: Path
    rows: list[TaskRow]
    report: ReadReport

    @property
    def skipped(self) -> int:
        return self.report.skipped_total

    @property
    def problems(self) -> list[str]:
        return self.report.examples[:PROBLEMS_KEPT]


def _row_problem(record: object, task: str) -> str | None:
    """Why a decoded line cannot be a row, or None."""
    # the checks every conversation gets (SFT's too); imported here: this module loads without transformers
    from tiny_llama2_zh.data.conversations import problem

    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        return "expected an object with a 'messages' list"
    messages = record["messages"]
    shared = problem(messages)
    if shared is not None:
        return shared
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        return "the last message must be the assistant's reference answer"
    if not any(m["role"] == "user" for m in messages[:-1]):
        return "no user message before the answer"
    reference = messages[-1]["content"].strip()
    if not reference:
        return "empty reference answer"
    return TASKS[task].answer_problem(reference)


def read_task_file(path: str | Path, task: str) -> TaskFile:
    """Every usable row of a task's SFT file, in file order; malformed lines are counted and skipped."""
    report = ReadReport(unit="rows")
    rows = []
    for line in read_jsonl([Path(path)], report):
        problem = _row_problem(line.value, task)
        if problem:
            report.skip(line.where, problem)
            continue
        messages = [{"role": m["role"], "content": m["content"]} for m in line.value["messages"]]
        rows.append(TaskRow(messages[:-1], messages[-1]["content"].strip(), line.line))
        report.kept += 1
    return TaskFile(Path(path), rows, report)


def limit_rows(rows: list[TaskRow], limit: int | None) -> list[TaskRow]:
    """`limit` rows chosen by the SHA-256 of the prompt (not the split's SHA-1, which picked these rows), kept in
    file order; every row when limit is None."""
    if limit is None or limit >= len(rows):
        return rows
    chosen = sorted(rows, key=lambda row: hashlib.sha256(row.prompt.encode("utf-8")).digest())[:limit]
    return sorted(chosen, key=lambda row: row.line)


# --------------------------------------------------------------------------------------------- evaluation
@dataclass
class TaskData:
    name: str
    test: TaskFile
    train: TaskFile | None
    rows: list[TaskRow]


def load_task_data(data_dir: str | Path, limit: int | None, warn: Callable[[str], None]) -> tuple[dict, dict]:
    """(task name -> TaskData, task name -> why it was skipped) for the task folders under data_dir."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data {data_dir} is not a folder; `tinyllm data tasks --output DIR` writes one")
    tasks, skipped = {}, {}
    for name in TASKS:
        folder = data_dir / name
        if not folder.is_dir():
            continue
        test_path = folder / TEST_FILE
        if not test_path.is_file():
            skipped[name] = f"{test_path} does not exist"
            warn(f"skipping task {name}: {skipped[name]}")
            continue
        test = read_task_file(test_path, name)
        train = read_task_file(folder / TRAIN_FILE, name) if (folder / TRAIN_FILE).is_file() else None
        for read in (test, train):
            if read is not None and read.skipped:
                shown = "; ".join(read.problems) + ("; ..." if read.skipped > len(read.problems) else "")
                warn(f"skipped {read.skipped} malformed lines of {read.path}: {shown}")
        if not test.rows:
            skipped[name] = f"{test_path} holds no usable row ({test.skipped} malformed lines)"
            warn(f"skipping task {name}: {skipped[name]}")
            continue
        tasks[name] = TaskData(name, test, train, limit_rows(test.rows, limit))
    if not tasks:
        found = ", ".join(f"{name} ({reason})" for name, reason in skipped.items()) or "none"
        raise UsageError(
            f"--data {data_dir} holds no usable task: expected {'/, '.join(TASKS)}/ folders with {TEST_FILE} "
            f"(from `tinyllm data tasks`); skipped: {found}"
        )
    return tasks, skipped


def _examples(rows: Sequence[TaskRow], replies: Sequence[str]) -> list[dict[str, str]]:
    return [
        {"prompt": row.prompt, "reference": row.reference, "reply": reply}
        for row, reply in zip(rows[:EXAMPLES_PER_TASK], replies)
    ]


def _score(task: str, rows: Sequence[TaskRow], replies: Sequence[str]) -> dict:
    return {
        "rows": len(rows),
        "metrics": TASKS[task].metrics([row.reference for row in rows], replies),
        "examples": _examples(rows, replies),
    }


def model_replies(
    model, tokenizer, rows: Sequence[TaskRow], max_new_tokens: int | None, batch_size: int, progress: tqdm
) -> tuple[list[str], int, int]:
    """Greedy replies to every row, (replies, max_new_tokens used, prompts too long for the context). A prompt
    that does not fit the context with the reply budget gets an empty reply (scored as wrong), so that every row of
    the table is scored on the same rows."""
    from tiny_llama2_zh.infer.generate import chat_prompt_ids, greedy_replies

    if max_new_tokens is None:
        # room for the longest reference plus a margin for the eos and a slightly longer reply; the references only
        # size the budget, they never reach the model
        longest = max(len(tokenizer(row.reference, add_special_tokens=False)["input_ids"]) for row in rows)
        max_new_tokens = longest + max(8, longest // 4)
    context = model.config.max_position_embeddings
    if max_new_tokens >= context:
        raise UsageError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the context of {context}")
    lengths: dict[int, int] = {}
    for index, row in enumerate(rows):
        with contextlib.suppress(ValueError):  # too long: left out of generation, replied to with ""
            lengths[index] = len(chat_prompt_ids(tokenizer, row.conversation, context - max_new_tokens)[0])
    replies = [""] * len(rows)
    progress.update(len(rows) - len(lengths))
    order = sorted(lengths, key=lengths.__getitem__)  # similar lengths together: less left padding per batch
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        answers = greedy_replies(model, tokenizer, [rows[i].conversation for i in chunk], max_new_tokens, batch_size)
        for index, answer in zip(chunk, answers):
            replies[index] = answer
        progress.update(len(chunk))
    return replies, max_new_tokens, len(rows) - len(lengths)


def _stderr(message: str) -> None:
    note("eval tasks", message)


def evaluate_tasks(
    model_dirs: Sequence[str | Path],
    data_dir: str | Path,
    limit: int | None = None,
    *,
    baseline_model_dirs: Sequence[str | Path] = (),
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    show_progress: bool = True,
    warn: Callable[[str], None] = _stderr,
) -> dict:
    """Score the trivial baselines, each baseline model and each model on the test rows of every task under
    data_dir. Returns a JSON-ready dict: `tasks` (file, rows evaluated, rows available, skipped lines), `skipped_tasks`,
    and `rows` -- one per table row, each {name, kind, path, tasks: {task: {rows, metrics, examples, ...}}}."""
    from tiny_llama2_zh.loading import check_model_folder, load_model

    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not model_dirs and not baseline_model_dirs:
        raise UsageError("no model to evaluate: pass --model DIR")
    models = [("baseline-model", Path(d)) for d in baseline_model_dirs] + [("model", Path(d)) for d in model_dirs]
    for _, folder in models:  # before any slow step: a typo fails at once
        check_model_folder(folder)
    tasks, skipped = load_task_data(data_dir, limit, warn)

    baseline: dict = {"name": "trivial baseline", "kind": "baseline", "path": None, "tasks": {}}
    for name, task in tasks.items():
        train_references = [row.reference for row in task.train.rows] if task.train else []
        trivial = TASKS[name].baseline([row.reference for row in task.rows], train_references)
        if trivial is None:
            warn(f"no trivial baseline for {name}: it needs {task.test.path.parent / TRAIN_FILE}")
            continue
        replies, method = trivial
        baseline["tasks"][name] = {**_score(name, task.rows, replies), "method": method}
    result_rows = [baseline]

    for kind, folder in models:
        model, tokenizer = load_model(folder)
        row: dict = {"name": str(folder), "kind": kind, "path": str(folder.resolve()), "tasks": {}}
        for name, task in tasks.items():
            with tqdm(total=len(task.rows), desc=f"{folder} {name}", disable=not show_progress) as progress:
                replies, budget, too_long = model_replies(
                    model, tokenizer, task.rows, max_new_tokens, batch_size, progress
                )
            if too_long:
                warn(f"{folder}: {too_long} {name} prompts do not fit the context with {budget} new tokens (scored 0)")
            row["tasks"][name] = {
                **_score(name, task.rows, replies),
                "max_new_tokens": budget,
                "prompts_too_long": too_long,
            }
        del model
        result_rows.append(row)

    return {
        "data": str(data_dir),
        "limit": limit,
        "tasks": {
            name: {
                "file": str(task.test.path),
                "rows": len(task.rows),
                "available_rows": len(task.test.rows),
                "skipped_lines": task.test.skipped,
                "problems": task.test.problems,
                "train_skipped_lines": task.train.skipped if task.train else None,
                "metrics": TASKS[name].metric_notes,
            }
            for name, task in tasks.items()
        },
        "skipped_tasks": skipped,
        "rows": result_rows,
    }


# ------------------------------------------------------------------------------------------------- output
def markdown_table(result: dict) -> str:
    """One line per baseline and model; columns: each task's headline metrics, then the rows scored per task."""
    columns = [column for column in TABLE_COLUMNS if column[0] in result["tasks"]]
    tasks = list(result["tasks"])
    headers = ["model", *(header for _, _, header in columns), f"rows ({'/'.join(tasks)})"]
    lines = []
    for row in result["rows"]:
        name = row["name"] if row["kind"] != "baseline-model" else f"{row['name']} (baseline)"
        cells = [name.replace("|", "\\|")]  # a pipe inside a cell would end it
        for task, metric, _ in columns:
            scored = row["tasks"].get(task)
            cells.append(percent(scored["metrics"][metric]) if scored else "—")
        cells.append("/".join(str(row["tasks"][t]["rows"]) if t in row["tasks"] else "—" for t in tasks))
        lines.append(cells)
    return table(headers, lines)


def _code(text: str) -> str:
    """Text as one markdown code span: a random model's reply may hold newlines, control bytes or backticks."""
    text = "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
    fence = "``" if "`" in text else "`"
    return f"{fence} {text} {fence}" if fence == "``" else f"`{text}`"


def markdown_report(result: dict) -> str:
    """tasks.md: the table, what each number means, the baselines' methods and a few replies of each model."""
    parts = ["# Task evaluation", "", f"Test rows from `{result['data']}`"]
    parts[-1] += f", {result['limit']} per task (chosen by prompt hash)." if result["limit"] else ", all of them."
    parts += ["", markdown_table(result), ""]
    parts += [f"- **{task}**: {info['metrics']}." for task, info in result["tasks"].items()]
    baseline = next((row for row in result["rows"] if row["kind"] == "baseline"), None)
    if baseline:
        parts += [f"- trivial baseline, {task}: {scored['method']}." for task, scored in baseline["tasks"].items()]
    parts += [f"- skipped task {task}: {reason}." for task, reason in result["skipped_tasks"].items()]
    for row in result["rows"]:
        if row["kind"] == "baseline":
            continue
        parts += ["", f"## Example replies: {row['name']}"]
        for task, scored in row["tasks"].items():
            for example in scored["examples"]:
                prompt = example["prompt"].splitlines()[-1]  # the item itself, without the instruction
                reply, reference = _code(example["reply"]), _code(example["reference"])
                parts.append(f"- {task}: {_code(prompt)} → {reply} (reference {reference})")
    return "\n".join(parts) + "\n"


def write_outputs(result: dict, output_dir: str | Path) -> tuple[Path, Path]:
    return write_result(result, markdown_report(result), output_dir, "tasks")


# ---------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", action="append", required=True, metavar="DIR", help="saved model folder; repeat for several"
    )
    parser.add_argument("--data", required=True, help="task folder from `tinyllm data tasks` (<task>/sft-test.jsonl)")
    parser.add_argument("--output", help="folder for tasks.json and tasks.md (default: print the table only)")
    parser.add_argument(
        "--limit", type=int, default=None, help="evaluate N rows per task, chosen by prompt hash (default: all)"
    )
    parser.add_argument(
        "--baseline-model",
        action="append",
        default=[],
        metavar="DIR",
        help="a model folder listed as a baseline, e.g. the pretrained-only model; repeatable",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generate call (default: 32)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="reply budget (default: per task, the longest reference in tokens plus a quarter, at least 8)",
    )


def run(args: argparse.Namespace) -> None:
    result = evaluate_tasks(
        args.model,
        args.data,
        args.limit,
        baseline_model_dirs=args.baseline_model,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    print(markdown_table(result))
    if args.output:
        json_path, md_path = write_outputs(result, args.output)
        print(f"wrote {json_path} and {md_path}")
    else:
        print("(pass --output DIR to keep tasks.json and tasks.md)")
