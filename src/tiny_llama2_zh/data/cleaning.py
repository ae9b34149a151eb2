"""Cleaning before tokenization, every step counted.

Steps, in order (each removes whole documents or lines, and the report says how many documents and characters
each one took): Unicode NFKC normalisation, control characters and HTML remnants, advertisement lines (the
seed's web-novel clean-up; `AD_PATTERNS`, extendable with a file of regular expressions), minimum length,
Chinese-character ratio, repeated lines, repeated characters, exact duplicates (content hash) and
near-duplicates (MinHash-LSH from `datasketch`, Broder 1997; Leskovec et al., Mining of Massive Datasets ch. 3).
"""

import html
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from datasketch import MinHash, MinHashLSH

from tiny_llama2_zh.data.hashing import ExactDuplicates

# Lines that advertise a site rather than tell a story: site names, URLs, "bookmark / read on your phone"
# requests, chapter-update notices. Users add their own with `CleaningOptions.extra_ad_patterns_file`.
AD_PATTERNS = (
    r"https?://\S+",
    r"www\.[\w-]+\.\w+",
    r"[\w-]+\.(com|net|org|cc|cn|la|info)\b",
    r"请?(收藏|记住)本站",
    r"手机(阅读|用户|版)",
    r"(最新|最快)章节",
    r"(求|投)(推荐|月)票",
    r"本章未完",
    r"(笔趣阁|顶点小说|起点中文网|纵横中文网|17k小说网)",
    r"天才一秒记住",
    r"百度搜索",
)

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b-\u200f\ufeff]")
_HTML_TAG = re.compile(r"</?[a-zA-Z][^<>]{0,200}>")
_HAN = re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf]")


@dataclass
class CleaningOptions:
    normalize: bool = True
    min_chars: int = 20
    min_chinese_ratio: float = 0.3
    max_repeated_line_fraction: float = 0.3  # share of lines that repeat another line of the document
    max_char_run: int = 20  # longest run of one character, e.g. "哈哈哈哈…" or "======"
    remove_ads: bool = True
    extra_ad_patterns_file: str | None = None
    exact_dedup: bool = True
    near_dedup: bool = True
    near_dedup_threshold: float = 0.8  # estimated Jaccard similarity of character 5-grams
    num_perm: int = 128


@dataclass
class StepCount:
    documents: int = 0
    characters: int = 0


@dataclass
class CleaningReport:
    documents_in: int = 0
    characters_in: int = 0
    documents_out: int = 0
    characters_out: int = 0
    removed: dict[str, StepCount] = field(default_factory=dict)

    def count(self, step: str, characters: int, documents: int = 1) -> None:
        entry = self.removed.setdefault(step, StepCount())
        entry.documents += documents
        entry.characters += characters

    def summary(self) -> str:
        lines = [
            f"{self.documents_in:,} documents ({self.characters_in:,} chars) in, "
            f"{self.documents_out:,} ({self.characters_out:,} chars) out"
        ]
        for step, entry in self.removed.items():
            lines.append(f"  {step:<22} -{entry.documents:,} documents, -{entry.characters:,} characters")
        return "\n".join(lines)


def load_ad_patterns(options: CleaningOptions) -> re.Pattern:
    patterns = list(AD_PATTERNS)
    if options.extra_ad_patterns_file:
        lines = Path(options.extra_ad_patterns_file).read_text(encoding="utf-8").splitlines()
        patterns += [line for line in lines if line.strip() and not line.startswith("#")]
    return re.compile("|".join(f"(?:{pattern})" for pattern in patterns))


def chinese_ratio(text: str) -> float:
    visible = sum(1 for char in text if not char.isspace())
    return len(_HAN.findall(text)) / visible if visible else 0.0


def longest_char_run(text: str) -> int:
    longest = run = 0
    previous = None
    for char in text:
        run = run + 1 if char == previous else 1
        previous = char
        longest = max(longest, run)
    return longest


def shingles(text: str, size: int = 5) -> set[str]:
    return {text[i : i + size] for i in range(max(1, len(text) - size + 1))}


class Cleaner:
    """Stateful (it remembers what it has seen, for deduplication): one Cleaner per output."""

    def __init__(self, options: CleaningOptions | None = None):
        self.options = options or CleaningOptions()
        self.report = CleaningReport()
        self.ads = load_ad_patterns(self.options)
        self.exact = ExactDuplicates()
        self.lsh = MinHashLSH(threshold=self.options.near_dedup_threshold, num_perm=self.options.num_perm)
        self._next_key = 0

    def clean(self, text: str) -> str | None:
        """The cleaned text, or None when the document is dropped (the report says why)."""
        options, report = self.options, self.report
        report.documents_in += 1
        report.characters_in += len(text)
        if options.normalize:
            text = unicodedata.normalize("NFKC", text)
        stripped = _CONTROL.sub("", html.unescape(_HTML_TAG.sub("", text)))
        if len(stripped) != len(text):
            report.count("control/html", len(text) - len(stripped), documents=0)
            text = stripped
        if options.remove_ads:
            lines = text.split("\n")
            kept = [line for line in lines if not self.ads.search(line)]
            if len(kept) != len(lines):
                removed = sum(len(line) + 1 for line in lines if self.ads.search(line))
                report.count("ad lines", removed, documents=0)
                text = "\n".join(kept)
        text = text.strip()
        reason = self._rejection(text)
        if reason is None:
            reason = self._duplicate(text)
        if reason is not None:
            report.count(reason, len(text))
            return None
        report.documents_out += 1
        report.characters_out += len(text)
        return text

    def _rejection(self, text: str) -> str | None:
        options = self.options
        if len(text) < options.min_chars:
            return "too short"
        if chinese_ratio(text) < options.min_chinese_ratio:
            return "low chinese ratio"
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        if len(lines) > 1:
            repeated = sum(count - 1 for count in Counter(lines).values())
            if repeated / len(lines) > options.max_repeated_line_fraction:
                return "repeated lines"
        if longest_char_run(text) > options.max_char_run:
            return "repeated characters"
        return None

    def _duplicate(self, text: str) -> str | None:
        if self.options.exact_dedup and self.exact.seen_before(text):
            return "exact duplicate"
        if self.options.near_dedup:
            signature = MinHash(num_perm=self.options.num_perm)
            signature.update_batch([shingle.encode("utf-8") for shingle in shingles(text)])
            if self.lsh.query(signature):
                return "near duplicate"
            self.lsh.insert(str(self._next_key), signature)
            self._next_key += 1
        return None

    def clean_all(self, texts: Iterable[str]) -> Iterator[str]:
        for text in texts:
            cleaned = self.clean(text)
            if cleaned is not None:
                yield cleaned
