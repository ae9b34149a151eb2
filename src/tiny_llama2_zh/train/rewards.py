"""Verifiable rewards for GRPO: plain Python that checks a reply against a task's known answer.

Each checker takes (reference answer, reply) and returns a number in [0, 1]; `correctness_reward` and
`format_reward` are reward functions in TRL's signature (`prompts, completions, task, answer, **columns` -> one float
per completion), dispatching on each row's task. The scorers are the ones `tinyllm eval tasks` reports
(`eval/tasks.py`), so what GRPO optimises is what the evaluation measures.

- sentiment: 1 when the reply's label is the review's label (`sentiment_label`);
- segmentation: the row's word F1 (SIGHAN spans), so a nearly right split earns nearly full reward;
- pinyin: the fraction of syllables right by position (an exact answer earns 1);
- format (any task): the answer is where the template says, in the shape the task asks for: exactly one label;
  the sentence's own characters, split by spaces; one tone-marked syllable per character.

`guarded` wraps a reward function so that an exception on one completion is counted and reported with the prompt
it came from, and that completion gets no reward (None: TRL leaves it out of the sum) instead of the run dying
somewhere inside the trainer without saying where.
"""

import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from tiny_llama2_zh.eval.tasks import (
    SENTIMENT_LABELS,
    pinyin_counts,
    segmentation_counts,
    segmentation_f1,
    sentiment_exact,
    sentiment_label,
)

# A tone-marked pinyin syllable as pypinyin writes it (Style.TONE): letters, tone marks, ü.
PINYIN_SYLLABLE = re.compile(r"^[a-zāáǎàēéěèīíǐìōóǒòūúǔùüǖǘǚǜńňǹḿ]+$")
TASKS_WITH_CHECKERS = ("sentiment", "segmentation", "pinyin")


def reply_text(completion: object) -> str:
    """A completion as TRL passes it: a string, or conversational ([{"role": "assistant", "content": ...}])."""
    if isinstance(completion, list):
        return "".join(message.get("content", "") for message in completion if isinstance(message, dict))
    return str(completion)


def sentiment_correct(reference: str, reply: str) -> float:
    return float(sentiment_label(reply) == reference)


def segmentation_correct(reference: str, reply: str) -> float:
    return segmentation_f1(reference, reply)


def pinyin_correct(reference: str, reply: str) -> float:
    counts = pinyin_counts(reference, reply)
    return counts.matched / counts.total if counts.total else 0.0


def sentiment_format(reference: str, reply: str) -> float:
    return float(any(sentiment_exact(label, reply) for label in SENTIMENT_LABELS))


def segmentation_format(reference: str, reply: str) -> float:
    return float(segmentation_counts(reference, reply).same_characters and len(reply.split()) > 1)


def pinyin_format(reference: str, reply: str) -> float:
    syllables = unicodedata.normalize("NFC", reply).split()
    return float(len(syllables) == len(reference.split()) and all(PINYIN_SYLLABLE.match(s) for s in syllables))


CORRECTNESS = {"sentiment": sentiment_correct, "segmentation": segmentation_correct, "pinyin": pinyin_correct}
FORMAT = {"sentiment": sentiment_format, "segmentation": segmentation_format, "pinyin": pinyin_format}


def answer_problem(task: str, answer: object) -> str | None:
    """Why a row's reference answer cannot be checked (so the row cannot be a GRPO prompt), or None."""
    if task not in CORRECTNESS:
        return f"no checker for task {task!r} (known: {', '.join(TASKS_WITH_CHECKERS)})"
    if not isinstance(answer, str) or not answer.strip():
        return "no reference answer"
    if task == "sentiment" and answer not in SENTIMENT_LABELS:
        return f"sentiment answer {answer!r} is not one of {SENTIMENT_LABELS}"
    if task == "pinyin" and not pinyin_format(answer, answer):
        return f"pinyin answer {answer!r} is not tone-marked syllables"
    return None


def correctness_reward(prompts, completions, task, answer, **columns) -> list[float]:
    """TRL reward function: the task's checker on every completion."""
    return [CORRECTNESS[t](a, reply_text(c)) for c, t, a in zip(completions, task, answer, strict=True)]


def format_reward(prompts, completions, task, answer, **columns) -> list[float]:
    """TRL reward function: the reply has the task's answer shape (see the module docstring)."""
    return [FORMAT[t](a, reply_text(c)) for c, t, a in zip(completions, task, answer, strict=True)]


@dataclass
class RewardErrors:
    """Exceptions raised by reward functions: counted per function, the first few kept with their prompt."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def record(self, name: str, prompt: object, error: Exception) -> None:
        self.counts[name] += 1
        if len(self.examples) < 10:
            text = reply_text(prompt)[-200:]
            self.examples.append(f"{name} raised {type(error).__name__}: {error} on prompt {text!r}")


def guarded(function: Callable, errors: RewardErrors) -> Callable:
    """`function` applied one completion at a time; one that raises is recorded (with its prompt) and gets None."""
    name = function.__name__

    def reward(prompts, completions, **columns) -> list[float | None]:
        rewards: list[float | None] = []
        for index, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            row = {key: [values[index]] for key, values in columns.items() if isinstance(values, list)}
            try:
                rewards.append(function([prompt], [completion], **row)[0])
            except Exception as error:  # any failure of user code is reported, never fatal
                print(f"reward function {name} raised {type(error).__name__}: {error} on prompt {reply_text(prompt)!r}")
                errors.record(name, prompt, error)
                rewards.append(None)
        return rewards

    reward.__name__ = name
    return reward
