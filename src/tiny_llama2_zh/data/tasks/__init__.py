"""Demo tasks with real, checkable answers, built from installed packages: the data of SFT, reward modelling, DPO and
GRPO, and the held-out rows `tinyllm eval tasks` scores.

Each task is one module of this package and one `Task` (see base.py: prompt, examples, metrics, checkers, trivial
baseline), registered in `TASKS` below; the data writer, the evaluation (eval/tasks.py) and GRPO's rewards
(train/rewards.py) read only the registry. A new task is one module -- a generator, a checker, a baseline -- and
one entry in `TASKS`.

- sentiment (sentiment.py): a product review -> 正面 / 负面.
- segmentation (segmentation.py): a People's Daily 1998 sentence -> its words separated by spaces.
- pinyin (pinyin.py): a word -> its pinyin with tone marks.

`build_tasks` writes each task as SFT conversations (`sft-train.jsonl`, `sft-test.jsonl`: chat `messages`) and as
preference pairs (`preference-train.jsonl`, `preference-test.jsonl`: `prompt`, `chosen` = the right answer,
`rejected` = a wrong one), split by a hash of the prompt so that no test prompt is ever trained on.
"""

import json
from pathlib import Path

from tiny_llama2_zh.data.hashing import is_validation
from tiny_llama2_zh.data.tasks import pinyin, segmentation, sentiment
from tiny_llama2_zh.data.tasks.base import Task

TASKS: dict[str, Task] = {task.name: task for task in (sentiment.TASK, segmentation.TASK, pinyin.TASK)}


def build_tasks(output_dir: str | Path, test_per_mille: int = 50) -> dict[str, dict[str, int]]:
    """Write every task's SFT and preference splits under output_dir/<task>/; returns counts per task."""
    counts: dict[str, dict[str, int]] = {}
    for name, task in TASKS.items():
        folder = Path(output_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        files = {
            (kind, split): (folder / f"{kind}-{split}.jsonl").open("w", encoding="utf-8")
            for kind in ("sft", "preference")
            for split in ("train", "test")
        }
        task_counts = {"train": 0, "test": 0}
        try:
            for example in task.examples():
                split = "test" if is_validation(example.prompt, test_per_mille) else "train"
                conversation = {
                    "messages": [
                        {"role": "user", "content": example.prompt},
                        {"role": "assistant", "content": example.answer},
                    ]
                }
                pair = {"prompt": example.prompt, "chosen": example.answer, "rejected": example.wrong_answer}
                files["sft", split].write(json.dumps(conversation, ensure_ascii=False) + "\n")
                files["preference", split].write(json.dumps(pair, ensure_ascii=False) + "\n")
                task_counts[split] += 1
        finally:
            for handle in files.values():
                handle.close()
        counts[name] = task_counts
    (Path(output_dir) / "stats.json").write_text(json.dumps(counts, indent=2) + "\n")
    return counts
