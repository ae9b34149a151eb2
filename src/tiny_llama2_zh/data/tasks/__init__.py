"""Demo tasks with real, checkable answers, built from installed packages or generated with exact answers: the data of
SFT, reward modelling, DPO and GRPO, and the held-out rows `tinyllm eval tasks` scores.

Each task is one module of this package and one `Task` (see base.py: prompt, examples, metrics, checkers, trivial
baseline), registered in `TASKS` below; the data writer, the evaluation (eval/tasks.py) and GRPO's rewards
(train/rewards.py) read only the registry. A new task is one module -- a generator, a checker, a baseline -- and
one entry in `TASKS`.

- sentiment (sentiment.py): a product review -> 正面 / 负面.
- segmentation (segmentation.py): a People's Daily 1998 sentence -> its words separated by spaces.
- pinyin (pinyin.py): a word -> its pinyin with tone marks (too hard for the demo model: built when named).
- addition (addition.py): a+b of 2-digit numbers -> the sum, generated with exact answers, held out by value.
- column_addition (column_addition.py): a+b of 3-digit numbers worked column by column, then the sum (built when named).
- numerals (numerals.py): 305 -> 三百零五, generated with exact answers, held out by value (built when named).
- simplified (simplified.py): an idiom in traditional characters -> in simplified ones (一馬當先 -> 一马当先),
  held out by idiom (built when named).
- review (review.py): "write a product review" -> a review; the pairs prefer positive reviews (RLHF's classic).

`build_tasks` writes each task as SFT conversations (`sft-train.jsonl`, `sft-test.jsonl`: chat `messages`) and as
preference pairs (`preference-train.jsonl`, `preference-test.jsonl`: `prompt`, `chosen` = the right answer,
`rejected` = a wrong one), split by a hash of the prompt (of `Example.split_key` for a task held out by value) so
that no test prompt is ever trained on. A classification task's pairs (`Task.balanced_pairs`) are label-balanced:
the surplus of the more frequent label is dropped, by hash, from its preference files (the SFT files keep every
example) and counted in stats.json.
"""

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from tiny_llama2_zh.data.hashing import is_validation
from tiny_llama2_zh.data.tasks import (
    addition,
    column_addition,
    numerals,
    pinyin,
    review,
    segmentation,
    sentiment,
    simplified,
)
from tiny_llama2_zh.data.tasks.base import Example, Task
from tiny_llama2_zh.errors import UsageError

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        sentiment.TASK,
        segmentation.TASK,
        pinyin.TASK,
        addition.TASK,
        column_addition.TASK,
        numerals.TASK,
        simplified.TASK,
        review.TASK,
    )
}
# What `tinyllm data tasks` builds unless told (--tasks): the demo's tasks, the ones its 1.3M-parameter model can learn
DEFAULT_TASKS = ("sentiment", "addition", "review")  # the demo's; the others are built when named


def check_task_names(names: Sequence[str]) -> list[str]:
    """The names, each once, in the order given; an unknown or missing name is a usage error naming the known ones."""
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        problem = f"unknown task {', '.join(map(repr, unknown))}" if unknown else "no task named"
        raise UsageError(f"{problem}; the tasks are {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def balance_labels(pairs: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """As many pairs for each chosen label as the rarest label has: of a more frequent label, the pairs whose prompts
    have the smallest SHA-256 digests are kept (a choice that does not depend on file order; the split used SHA-1),
    in their original order. Returns the kept pairs and the number dropped per label."""
    by_label: dict[str, list[int]] = {}
    for index, pair in enumerate(pairs):
        by_label.setdefault(pair["chosen"], []).append(index)
    fewest = min((len(indices) for indices in by_label.values()), default=0)
    kept: set[int] = set()
    dropped: dict[str, int] = {}
    for label, indices in by_label.items():
        indices.sort(key=lambda i: hashlib.sha256(pairs[i]["prompt"].encode("utf-8")).digest())
        kept.update(indices[:fewest])
        if len(indices) > fewest:
            dropped[label] = len(indices) - fewest
    return [pair for index, pair in enumerate(pairs) if index in kept], dropped


def _conversation(example: Example) -> list[dict]:
    return [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.answer}]


def _answer_over_wrong_answer(examples: Sequence[Example]) -> list[dict]:
    return [{"prompt": e.prompt, "chosen": e.answer, "rejected": e.wrong_answer} for e in examples]


def build_tasks(
    output_dir: str | Path, test_per_mille: int = 50, names: Sequence[str] = DEFAULT_TASKS
) -> dict[str, dict]:
    """Write the named tasks' SFT and preference splits under output_dir/<task>/; returns counts per task (also
    written to output_dir/stats.json): SFT examples per split (`train`, `test`), preference pairs per split
    (`preference`) and, for a label-balanced task, the pairs dropped per split and label (`dropped_for_balance`)."""
    counts: dict[str, dict] = {}
    for name in check_task_names(names):
        task = TASKS[name]
        folder = Path(output_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        examples: dict[str, list[Example]] = {"train": [], "test": []}
        for example in task.examples():
            key = example.prompt if example.split_key is None else example.split_key
            examples["test" if is_validation(key, test_per_mille) else "train"].append(example)
        sft = {split: [{"messages": _conversation(example)} for example in rows] for split, rows in examples.items()}
        pairs = {split: (task.pairs or _answer_over_wrong_answer)(rows) for split, rows in examples.items()}
        task_counts: dict = {split: len(rows) for split, rows in sft.items()}
        if task.balanced_pairs:
            dropped = {}
            for split in pairs:
                pairs[split], dropped[split] = balance_labels(pairs[split])
            task_counts["dropped_for_balance"] = dropped
        task_counts["preference"] = {split: len(rows) for split, rows in pairs.items()}
        for kind, rows_by_split in (("sft", sft), ("preference", pairs)):
            for split, rows in rows_by_split.items():
                lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
                (folder / f"{kind}-{split}.jsonl").write_text(lines, encoding="utf-8")
        counts[name] = task_counts
    (Path(output_dir) / "stats.json").write_text(json.dumps(counts, indent=2, ensure_ascii=False) + "\n", "utf-8")
    return counts
