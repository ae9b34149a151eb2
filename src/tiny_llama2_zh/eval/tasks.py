"""`tinyllm eval tasks`: score saved models on the held-out demo tasks (`tinyllm data tasks`), beside trivial
baselines on the same rows.

For every task folder under --data (any task of the registry, `tiny_llama2_zh.data.tasks.TASKS`, that is present)
the rows of `sft-test.jsonl` are read (prompts never trained on: `build_tasks` splits by a hash of the prompt); the
conversation up to the final assistant message is the prompt and that message is the reference. Each model answers
with greedy decoding through the chat template (`greedy_replies`), and the replies are scored by the task's own
metrics (each task module's docstring says what they mean; the table shows each task's `columns`).

One "trivial baseline" row is scored on the same rows: each task's `baseline` (the majority label, one character
per word, the most frequent syllable), some of which need the task's `sft-train.jsonl`. For a classification task
(one whose train answers are a small set of labels, `label_set`: sentiment's 正面/负面) a second baseline row,
"bag-of-words (logistic regression)", is a scikit-learn logistic regression on the character 1-3-gram TF-IDF of the
item (the prompt template's one field: the review), trained on `sft-train.jsonl`: what a linear model of short
character sequences reaches, so a reader sees what the language model's size buys. `--baseline-model` adds
model rows marked as baselines (say, the pretrained-only model).

`--samples K` (K >= 1) also samples K replies per prompt at `--temperature` (pure sampling, as the RL stages
sample: `infer.generate.sample_replies`, seeded by `--seed` in a forked RNG state, so the greedy replies and everything
else stay as they are) and reports, per task, pass@1 -- the share of greedy replies the task's checker
(`Task.correct`) scores 1 -- and pass@K -- the share of prompts with at least one of the K replies scored 1: the
unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", eq. 1) with n = k = K
samples. Their gap is the headroom that sampling-based RL (GRPO) can turn into greedy accuracy.

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
import math
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from tiny_llama2_zh.data.jsonl import ReadReport, read_jsonl
from tiny_llama2_zh.data.tasks import TASKS
from tiny_llama2_zh.data.tasks.base import fit_bag_of_words, share
from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.eval.markdown import note, percent, table, write_result

TEST_FILE, TRAIN_FILE = "sft-test.jsonl", "sft-train.jsonl"
EXAMPLES_PER_TASK = 3
PROBLEMS_KEPT = 5
MAX_LABELS = 10  # at most this many distinct answers (each seen twice on average) make a task a classification
BAG_OF_WORDS = "bag-of-words (logistic regression)"

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


def prompt_order(prompt: str) -> bytes:
    """The key that orders prompts for `--limit`: the SHA-256 of the prompt (not the split's SHA-1, which picked the
    held-out rows). Shared by `eval mc --tasks-dir`, so that a limit there keeps the prompts it keeps here."""
    return hashlib.sha256(prompt.encode("utf-8")).digest()


def limit_rows(rows: list[TaskRow], limit: int | None) -> list[TaskRow]:
    """`limit` rows chosen by `prompt_order`, kept in file order; every row when limit is None."""
    if limit is None or limit >= len(rows):
        return rows
    chosen = sorted(rows, key=lambda row: prompt_order(row.prompt))[:limit]
    return sorted(chosen, key=lambda row: row.line)


def label_set(answers: Sequence[str], max_labels: int = MAX_LABELS) -> tuple[str, ...] | None:
    """The distinct answers, sorted, when they are a small label set -- 2 to `max_labels` of them, each appearing
    twice on average (sentiment's 正面/负面) -- else None (segmentations, pinyin, sums: nearly every answer new).
    What makes a task a classification for the bag-of-words baseline, and a preference source's replies labels for
    the reward model's per-label report, read from the data rather than declared by the task."""
    distinct = sorted(set(answers))
    if 2 <= len(distinct) <= max_labels and len(answers) >= 2 * len(distinct):
        return tuple(distinct)
    return None


def item_text(template: str, prompt: str) -> str:
    """The item a prompt was made from (the review of a sentiment prompt): the text where the template's one
    {field} is. The whole prompt when the template has another number of fields or the prompt does not match it."""
    pieces = list(string.Formatter().parse(template))
    fields = [index for index, (_, name, _, _) in enumerate(pieces) if name is not None]
    if len(fields) != 1:
        return prompt
    prefix = "".join(literal for literal, *_ in pieces[: fields[0] + 1])
    suffix = "".join(literal for literal, *_ in pieces[fields[0] + 1 :])
    if len(prompt) >= len(prefix) + len(suffix) and prompt.startswith(prefix) and prompt.endswith(suffix):
        return prompt[len(prefix) : len(prompt) - len(suffix)]
    return prompt


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
        if TASKS[name].open_ended:
            skipped[name] = "open-ended: judged on sampled replies by `tinyllm eval policies`, not on greedy ones"
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


def bag_of_words_baseline(name: str, task: TaskData) -> tuple[list[str], str] | None:
    """The labels a bag-of-words classifier (`fit_bag_of_words`: logistic regression on the character 1-3-gram
    TF-IDF of each item, `item_text`: the review) predicts for the evaluated rows, trained on the task's train
    split, and how they were made; None when the task is not a classification (its train answers are no
    `label_set`) or has no train split."""
    if task.train is None:
        return None
    references = [row.reference for row in task.train.rows]
    if label_set(references) is None:
        return None
    template = TASKS[name].prompt
    classifier = fit_bag_of_words([item_text(template, row.prompt) for row in task.train.rows], references)
    replies = [str(label) for label in classifier.predict([item_text(template, row.prompt) for row in task.rows])]
    fields = [field for _, field, _, _ in string.Formatter().parse(template) if field] or ["prompt"]
    n_grams = len(classifier[0].vocabulary_)
    return replies, (
        f"scikit-learn logistic regression on the TF-IDF of the {fields[0]}'s character 1-3-grams ({n_grams:,} "
        f"n-grams), trained on the {len(references):,} rows of {TRAIN_FILE}"
    )


def reply_budget(tokenizer, rows: Sequence[TaskRow], max_new_tokens: int | None, context: int) -> int:
    """max_new_tokens, or by default room for the longest reference plus a margin for the eos and a slightly longer
    reply (the references only size the budget, they never reach the model)."""
    if max_new_tokens is None:
        longest = max(len(tokenizer(row.reference, add_special_tokens=False)["input_ids"]) for row in rows)
        max_new_tokens = longest + max(8, longest // 4)
    if max_new_tokens >= context:
        raise UsageError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the context of {context}")
    return max_new_tokens


def fitting_prompts(tokenizer, rows: Sequence[TaskRow], max_new_tokens: int, context: int) -> dict[int, list[int]]:
    """Row index -> the prompt's ids through the chat template, for the rows whose prompt fits the context with the
    reply budget; the others are left out of generation and scored as wrong."""
    from tiny_llama2_zh.infer.generate import chat_prompt_ids

    prompts: dict[int, list[int]] = {}
    for index, row in enumerate(rows):
        with contextlib.suppress(ValueError):  # too long
            prompts[index] = chat_prompt_ids(tokenizer, row.conversation, context - max_new_tokens)[0]
    return prompts


def model_replies(
    model, tokenizer, rows: Sequence[TaskRow], max_new_tokens: int | None, batch_size: int, progress: tqdm
) -> tuple[list[str], int, int]:
    """Greedy replies to every row, (replies, max_new_tokens used, prompts too long for the context). A prompt
    that does not fit the context with the reply budget gets an empty reply (scored as wrong), so that every row of
    the table is scored on the same rows."""
    from tiny_llama2_zh.infer.generate import greedy_replies

    context = model.config.max_position_embeddings
    max_new_tokens = reply_budget(tokenizer, rows, max_new_tokens, context)
    lengths = {index: len(ids) for index, ids in fitting_prompts(tokenizer, rows, max_new_tokens, context).items()}
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


def sampled_replies(
    model,
    tokenizer,
    rows: Sequence[TaskRow],
    samples: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    progress: tqdm,
) -> list[list[str]]:
    """`samples` replies to each row, sampled at `temperature` as the RL stages sample (`infer.generate.sample_replies`:
    no top-k or top-p cut, the KV cache, each reply ended at its first end-of-turn token); [] for a prompt too long
    for the context. One generate call takes `batch_size` prompts, each repeated `samples` times. Seeded with
    `seed` in a forked RNG state: the caller's random stream is left as it was."""
    import torch

    from tiny_llama2_zh.infer.generate import left_pad, sample_replies, turn_end_ids

    prompts = fitting_prompts(tokenizer, rows, max_new_tokens, model.config.max_position_embeddings)
    replies: list[list[str]] = [[] for _ in rows]
    progress.update(len(rows) - len(prompts))
    order = sorted(prompts, key=lambda index: len(prompts[index]))
    end_ids, pad = turn_end_ids(tokenizer), tokenizer.pad_token_id
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask = left_pad([prompts[index] for index in chunk for _ in range(samples)], pad, model.device)
            sequences, _, _, _ = sample_replies(model, ids, mask, end_ids, pad, max_new_tokens, temperature)
            texts = tokenizer.batch_decode(sequences[:, ids.shape[1] :], skip_special_tokens=True)
            for offset, index in enumerate(chunk):
                replies[index] = [text.strip() for text in texts[offset * samples : (offset + 1) * samples]]
            progress.update(len(chunk))
    return replies


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """The unbiased estimator of pass@k from `samples` replies to one prompt, `correct` of them right (Chen et al.
    2021, "Evaluating Large Language Models Trained on Code", eq. 1): 1 - C(n - c, k) / C(n, k). With k = n it is 1
    when any reply is right and 0 otherwise; with k = 1 it is c / n."""
    if not 1 <= k <= samples or not 0 <= correct <= samples:
        raise ValueError(f"pass@{k} from {correct} right of {samples} replies")
    if samples - correct < k:
        return 1.0
    return 1.0 - math.comb(samples - correct, k) / math.comb(samples, k)


def solved(task: str, reference: str, reply: str) -> bool:
    """The task's checker (`Task.correct`, the GRPO reward) scores the reply fully right."""
    return TASKS[task].correct(reference, reply) >= 1.0


def sampling_score(
    task: str,
    rows: Sequence[TaskRow],
    greedy: Sequence[str],
    sampled: Sequence[Sequence[str]],
    samples: int,
    temperature: float,
    seed: int,
) -> dict:
    """pass@1 (greedy replies), pass@K (the K sampled replies of each row) and the sampled replies' own pass@1,
    with how many rows had 0, 1, ..., K right replies."""
    right = [sum(solved(task, row.reference, reply) for reply in replies) for row, replies in zip(rows, sampled)]
    n = len(rows)
    return {
        "samples": samples,
        "temperature": temperature,
        "seed": seed,
        "pass_at_1": share(sum(solved(task, row.reference, reply) for row, reply in zip(rows, greedy)), n),
        "pass_at_k": share(sum(pass_at_k(samples, c, samples) for c in right), n),
        "sampled_pass_at_1": share(sum(pass_at_k(samples, c, 1) for c in right), n),
        "rows_by_right_replies": [right.count(c) for c in range(samples + 1)],
        "examples": [
            {"prompt": row.prompt, "reference": row.reference, "replies": list(replies)}
            for row, replies in zip(rows[:EXAMPLES_PER_TASK], sampled)
        ],
    }


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
    samples: int = 0,
    temperature: float = 1.0,
    seed: int = 1337,
    sample_tasks: Sequence[str] | None = None,
    bag_of_words: bool = True,
    show_progress: bool = True,
    warn: Callable[[str], None] = _stderr,
) -> dict:
    """Score the trivial baselines, the bag-of-words baseline (classification tasks; unless `bag_of_words` is False,
    for a caller that reads only the models' rows), each baseline model and each model on the test rows of every
    task under data_dir; with `samples` K >= 1 also pass@1 and pass@K of each model on `sample_tasks` (default:
    every task). Returns a JSON-ready dict: `tasks` (file, rows evaluated, rows
    available, skipped lines), `skipped_tasks`, `sampling` (the settings, or None), and `rows` -- one per table row,
    each {name, kind, path, tasks: {task: {rows, metrics, examples, pass_at_k (when sampled), ...}}}."""
    from tiny_llama2_zh.loading import check_model_folder, load_model

    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if samples < 0:
        raise UsageError(f"--samples must be at least 0 (0: no sampling), got {samples}")
    if samples and not (math.isfinite(temperature) and temperature > 0):
        raise UsageError(f"--temperature must be a number above 0 to sample, got {temperature}")
    if sample_tasks and not samples:
        raise UsageError("--sample-task needs --samples K (K >= 1)")
    unknown = sorted(set(sample_tasks or ()) - set(TASKS))
    if unknown:
        raise UsageError(f"--sample-task {', '.join(unknown)}: no such task (tasks: {', '.join(TASKS)})")
    if not model_dirs and not baseline_model_dirs:
        raise UsageError("no model to evaluate: pass --model DIR")
    models = [("baseline-model", Path(d)) for d in baseline_model_dirs] + [("model", Path(d)) for d in model_dirs]
    for _, folder in models:  # before any slow step: a typo fails at once
        check_model_folder(folder)
    tasks, skipped = load_task_data(data_dir, limit, warn)
    sampled_tasks = [name for name in tasks if samples and (not sample_tasks or name in sample_tasks)]
    for name in sorted(set(sample_tasks or ()) - set(tasks)):
        warn(f"--sample-task {name}: {data_dir} holds no usable {name} task; nothing sampled for it")

    baseline: dict = {"name": "trivial baseline", "kind": "baseline", "path": None, "tasks": {}}
    classifier_row: dict = {"name": BAG_OF_WORDS, "kind": "baseline", "path": None, "tasks": {}}
    for name, task in tasks.items():
        train_references = [row.reference for row in task.train.rows] if task.train else []
        references, prompts = [row.reference for row in task.rows], [row.prompt for row in task.rows]
        trivial = TASKS[name].baseline(references, train_references, prompts)
        if trivial is None:
            warn(f"no trivial baseline for {name}: it needs {task.test.path.parent / TRAIN_FILE}")
        else:
            replies, method = trivial
            baseline["tasks"][name] = {**_score(name, task.rows, replies), "method": method}
        classified = bag_of_words_baseline(name, task) if bag_of_words else None
        if classified is not None:
            replies, method = classified
            classifier_row["tasks"][name] = {**_score(name, task.rows, replies), "method": method}
    result_rows = [baseline, *([classifier_row] if classifier_row["tasks"] else [])]

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
            if name in sampled_tasks:
                description = f"{folder} {name} x{samples} samples"
                with tqdm(total=len(task.rows), desc=description, disable=not show_progress) as progress:
                    sampled = sampled_replies(
                        model, tokenizer, task.rows, samples, temperature, budget, batch_size, seed, progress
                    )
                row["tasks"][name]["pass_at_k"] = sampling_score(
                    name, task.rows, replies, sampled, samples, temperature, seed
                )
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
        "sampling": (
            {"samples": samples, "temperature": temperature, "seed": seed, "tasks": sampled_tasks}
            if sampled_tasks
            else None
        ),
        "rows": result_rows,
    }


# ------------------------------------------------------------------------------------------------- output
def markdown_table(result: dict) -> str:
    """One line per baseline and model; columns: each task's headline metrics, then the rows scored per task."""
    columns = [column for column in TABLE_COLUMNS if column[0] in result["tasks"]]
    tasks = list(result["tasks"])
    sampling = result.get("sampling") or {"tasks": []}
    pass_columns = [
        (task, key, header)
        for task in sampling["tasks"]
        for key, header in (("pass_at_1", f"{task} pass@1"), ("pass_at_k", f"{task} pass@{sampling['samples']}"))
    ]
    headers = ["model", *(header for _, _, header in columns + pass_columns), f"rows ({'/'.join(tasks)})"]
    lines = []
    for row in result["rows"]:
        name = row["name"] if row["kind"] != "baseline-model" else f"{row['name']} (baseline)"
        cells = [name.replace("|", "\\|")]  # a pipe inside a cell would end it
        for task, metric, _ in columns:
            scored = row["tasks"].get(task)
            cells.append(percent(scored["metrics"][metric]) if scored else "—")
        for task, key, _ in pass_columns:
            sampled = row["tasks"].get(task, {}).get("pass_at_k")
            cells.append(percent(sampled[key]) if sampled else "—")
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
    if sampling := result.get("sampling"):
        k = sampling["samples"]
        parts.append(
            f"- **pass@1**: the share of greedy replies the task's checker scores fully right; **pass@{k}**: the share "
            f"of prompts with at least one fully right reply among {k} sampled at temperature "
            f"{sampling['temperature']:g} (seed {sampling['seed']}; Chen et al. 2021's estimator with n = k = {k})."
        )
    for row in result["rows"]:
        if row["kind"] == "baseline":
            parts += [f"- {row['name']}, {task}: {scored['method']}." for task, scored in row["tasks"].items()]
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
            for example in scored.get("pass_at_k", {}).get("examples", []):
                prompt, reference = _code(example["prompt"].splitlines()[-1]), _code(example["reference"])
                replies = ", ".join(_code(reply) for reply in example["replies"])
                parts.append(f"- {task}, sampled: {prompt} → {replies} (reference {reference})")
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
    parser.add_argument(
        "--samples",
        type=int,
        default=0,
        metavar="K",
        help="also sample K replies per prompt and report pass@1 (greedy) and pass@K (default: 0, no sampling)",
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for --samples (1.0)")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the sampled replies (default: 1337)")
    parser.add_argument(
        "--sample-task",
        action="append",
        default=[],
        metavar="TASK",
        help=f"sample only this task ({', '.join(TASKS)}); repeatable (default: every task)",
    )


def run(args: argparse.Namespace) -> None:
    result = evaluate_tasks(
        args.model,
        args.data,
        args.limit,
        baseline_model_dirs=args.baseline_model,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        samples=args.samples,
        temperature=args.temperature,
        seed=args.seed,
        sample_tasks=args.sample_task,
    )
    print(markdown_table(result))
    if args.output:
        json_path, md_path = write_outputs(result, args.output)
        print(f"wrote {json_path} and {md_path}")
    else:
        print("(pass --output DIR to keep tasks.json and tasks.md)")
