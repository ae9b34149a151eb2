"""pinyin: a word from People's Daily 1998 -> its pinyin with tone marks (pypinyin's dictionary).

- metrics: `exact` -- the same syllable sequence; `syllable_accuracy` -- position-wise matches over
  max(len(reference), len(reply)) syllables, summed over all rows; `wrong_length` -- replies with another number of
  syllables.
- reward: the fraction of syllables right by position (an exact answer earns 1); format: one tone-marked syllable
  per character.
- trivial baseline: the train split's most frequent syllable, once per character of the word.
"""

import re
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tiny_llama2_zh.data.han import HAN_WORD
from tiny_llama2_zh.data.tasks.base import Example, Task, peoples_daily_paragraphs, pick, share

PINYIN_PROMPT = "写出下面词语的拼音，带声调，音节之间用空格隔开。\n词语：{word}"
# A tone-marked pinyin syllable as pypinyin writes it (Style.TONE): letters, tone marks, ü.
PINYIN_SYLLABLE = re.compile(r"^[a-zāáǎàēéěèīíǐìōóǒòūúǔùüǖǘǚǜńňǹḿ]+$")


def pinyin_examples(max_words: int = 6000) -> Iterator[Example]:
    from pypinyin import Style, pinyin

    counts: Counter[str] = Counter()
    for paragraph in peoples_daily_paragraphs():
        counts.update(w for w in paragraph if 2 <= len(w) <= 4 and HAN_WORD.fullmatch(w))
    words = [word for word, _ in counts.most_common(max_words)]

    def spelled(word: str) -> str:
        return " ".join(syllable[0] for syllable in pinyin(word, style=Style.TONE))

    by_length: dict[int, list[str]] = {}
    for word in words:
        by_length.setdefault(len(word), []).append(word)
    for word in words:
        others = [w for w in by_length[len(word)] if w != word]  # the wrong answer: another word's pinyin
        yield Example(PINYIN_PROMPT.format(word=word), spelled(word), spelled(pick(word, others)))


def syllables(text: str) -> list[str]:
    # NFC: a tone mark typed as a combining character (a + U+0304) is the same syllable as the composed ā
    return unicodedata.normalize("NFC", text).split()


@dataclass(frozen=True)
class SyllableCounts:
    """One pinyin row: syllables matching by position, out of max(len(reference), len(reply))."""

    matched: int
    total: int
    exact: bool


def pinyin_counts(reference: str, reply: str) -> SyllableCounts:
    """Position-wise syllable matches; extra or missing syllables count as wrong, so the denominator is the longer
    of the two. No case folding or punctuation stripping: "zhōng guó。" misses its last syllable."""
    gold, predicted = syllables(reference), syllables(reply)
    matched = sum(g == p for g, p in zip(gold, predicted))
    return SyllableCounts(matched=matched, total=max(len(gold), len(predicted)), exact=gold == predicted)


def pinyin_metrics(references: Sequence[str], replies: Sequence[str]) -> dict[str, float | int]:
    counts = [pinyin_counts(ref, reply) for ref, reply in zip(references, replies)]
    return {
        "exact": share(sum(c.exact for c in counts), len(counts)),
        "syllable_accuracy": share(sum(c.matched for c in counts), sum(c.total for c in counts)),
        "wrong_length": sum(len(syllables(reply)) != len(syllables(ref)) for ref, reply in zip(references, replies)),
    }


def pinyin_correct(reference: str, reply: str) -> float:
    counts = pinyin_counts(reference, reply)
    return share(counts.matched, counts.total)


def pinyin_format(reference: str, reply: str) -> float:
    found = syllables(reply)
    return float(len(found) == len(reference.split()) and all(PINYIN_SYLLABLE.match(s) for s in found))


def pinyin_answer_problem(answer: str) -> str | None:
    if not pinyin_format(answer, answer):
        return f"pinyin answer {answer!r} is not tone-marked syllables"
    return None


def pinyin_baseline(
    references: Sequence[str], train_references: Sequence[str], prompts: Sequence[str] = ()
) -> tuple[list[str], str] | None:
    if not train_references:
        return None
    syllable, count = Counter(s for ref in train_references for s in syllables(ref)).most_common(1)[0]
    return (
        [" ".join([syllable] * len(syllables(ref))) for ref in references],
        f"the train split's most frequent syllable {syllable} ({count:,} times), once per character",
    )


TASK = Task(
    name="pinyin",
    prompt=PINYIN_PROMPT,
    examples=pinyin_examples,
    metrics=pinyin_metrics,
    columns=(("exact", "pinyin exact"), ("syllable_accuracy", "pinyin syllable acc")),
    metric_notes="exact: the same syllables; syllable_accuracy: position-wise matches over max(len(reference), "
    "len(reply)) syllables, summed over all rows",
    correct=pinyin_correct,
    well_formed=pinyin_format,
    baseline=pinyin_baseline,
    answer_problem=pinyin_answer_problem,
)
