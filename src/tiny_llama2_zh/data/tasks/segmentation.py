"""segmentation: a People's Daily 1998 sentence -> its words separated by spaces (the corpus's own segmentation).

- metrics: word-level `precision` / `recall` / `f1` over word spans by character offset, micro-averaged over all rows
  as the SIGHAN bakeoff scorer does (Sproat & Emerson 2003, "The First International Chinese Word Segmentation
  Bakeoff"; Emerson 2005, the Second Bakeoff); `exact` -- the same word sequence; `changed_characters` -- replies
  whose characters are not the sentence's.
- reward: the row's word F1, so a nearly right split earns nearly full reward; format: the sentence's own
  characters, split by spaces.
- trivial baseline: every character a word of its own.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tiny_llama2_zh.data.tasks.base import Example, Task, peoples_daily_paragraphs, pick, share

SEGMENTATION_PROMPT = "请对下面的句子分词，词与词之间用一个空格隔开。\n句子：{sentence}"
SENTENCE_ENDS = ("。", "！", "？", "；")


def _sentences(words: list[str]) -> Iterator[list[str]]:
    sentence: list[str] = []
    for word in words:
        sentence.append(word)
        if word in SENTENCE_ENDS:
            yield sentence
            sentence = []


def segmentation_examples(min_chars: int = 8, max_chars: int = 40) -> Iterator[Example]:
    seen: set[str] = set()
    for paragraph in peoples_daily_paragraphs():
        for words in _sentences(paragraph):
            words = [w for w in words if w not in SENTENCE_ENDS]
            sentence = "".join(words)
            if not (min_chars <= len(sentence) <= max_chars) or len(words) < 3 or sentence in seen:
                continue
            seen.add(sentence)
            answer = " ".join(words)
            yield Example(SEGMENTATION_PROMPT.format(sentence=sentence), answer, " ".join(wrong_segmentation(words)))


def wrong_segmentation(words: list[str]) -> list[str]:
    """A plausible wrong answer as long as the right one: one boundary between neighbouring words moved by one
    character (which one, by hash), so that the same characters and the same number of words remain and only a
    reader of words can tell (a merged pair, the old wrong answer, was one space shorter: the longer reply won 99.5 %
    of the pairs). Where no boundary can move (every word one character), two neighbours are merged instead."""
    sentence = "".join(words)
    movable = [i for i in range(len(words) - 1) if len(words[i]) > 1 or len(words[i + 1]) > 1]
    if not movable:
        at = pick(sentence, list(range(len(words) - 1)))
        return [*words[:at], words[at] + words[at + 1], *words[at + 2 :]]
    at = pick(sentence, movable)
    left, right = words[at], words[at + 1]
    if len(left) > 1 and (len(right) == 1 or pick(sentence + " side", [True, False])):
        left, right = left[:-1], left[-1] + right  # the left word's last character joins the right word
    else:
        left, right = left + right[0], right[1:]  # the right word's first character joins the left word
    return [*words[:at], left, right, *words[at + 2 :]]


def _word_spans(words: Sequence[str]) -> dict[tuple[int, int], str]:
    spans, start = {}, 0
    for word in words:
        spans[start, start + len(word)] = word
        start += len(word)
    return spans


@dataclass(frozen=True)
class SpanCounts:
    """One segmentation row: words right, words predicted, words in the reference."""

    correct: int
    predicted: int
    gold: int
    exact: bool
    same_characters: bool


def segmentation_counts(reference: str, reply: str) -> SpanCounts:
    """Word spans of a reply against the reference (both: words separated by any whitespace).

    SIGHAN bakeoff scoring: each word is the [start, end) span of its characters in the concatenated sentence, and a
    predicted word is right when a reference word has the same span. The bakeoff's `score` script aligns the two
    word sequences with `diff` when the characters differ; here a predicted word must also have the reference
    word's text, so a reply that adds, drops or changes characters gets no credit for the words whose text or
    offsets the change touches (stricter, and counted by `same_characters`)."""
    gold_words, predicted_words = reference.split(), reply.split()
    gold = _word_spans(gold_words)
    predicted = _word_spans(predicted_words)
    correct = sum(1 for span, word in predicted.items() if gold.get(span) == word)
    return SpanCounts(
        correct=correct,
        predicted=len(predicted_words),
        gold=len(gold_words),
        exact=predicted_words == gold_words,
        same_characters="".join(predicted_words) == "".join(gold_words),
    )


def precision_recall_f1(correct: int, predicted: int, gold: int) -> tuple[float, float, float]:
    """0 where a denominator is 0 (an empty reply has no precision to speak of, and earns nothing)."""
    precision, recall = share(correct, predicted), share(correct, gold)
    return precision, recall, share(2 * precision * recall, precision + recall)


def segmentation_f1(reference: str, reply: str) -> float:
    """F1 of one row (the task's score micro-averages counts over rows instead)."""
    counts = segmentation_counts(reference, reply)
    return precision_recall_f1(counts.correct, counts.predicted, counts.gold)[2]


def segmentation_metrics(references: Sequence[str], replies: Sequence[str]) -> dict[str, float | int]:
    counts = [segmentation_counts(ref, reply) for ref, reply in zip(references, replies)]
    precision, recall, f1 = precision_recall_f1(
        sum(c.correct for c in counts), sum(c.predicted for c in counts), sum(c.gold for c in counts)
    )
    return {
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "exact": share(sum(c.exact for c in counts), len(counts)),
        "changed_characters": sum(not c.same_characters for c in counts),
    }


def segmentation_correct(reference: str, reply: str) -> float:
    return segmentation_f1(reference, reply)


def segmentation_format(reference: str, reply: str) -> float:
    return float(segmentation_counts(reference, reply).same_characters and len(reply.split()) > 1)


def segmentation_baseline(
    references: Sequence[str], train_references: Sequence[str], prompts: Sequence[str] = ()
) -> tuple[list[str], str]:
    return [" ".join("".join(ref.split())) for ref in references], "every character a word of its own"


TASK = Task(
    name="segmentation",
    prompt=SEGMENTATION_PROMPT,
    examples=segmentation_examples,
    metrics=segmentation_metrics,
    columns=(("f1", "seg F1"), ("exact", "seg exact")),
    metric_notes="precision/recall/f1: a predicted word is correct when its [start, end) character span and its "
    "text match a reference word, micro-averaged over all rows (SIGHAN bakeoff scoring); exact: the same words",
    correct=segmentation_correct,
    well_formed=segmentation_format,
    baseline=segmentation_baseline,
)
