"""Cleaning before tokenization, every step counted.

Steps, in order (each removes characters, lines, sentences or whole documents, and the report counts what each
took, in characters of the text as it came in: `characters_in - sum(removed) == characters_out`):

- width folding: full-width Latin letters, digits and the ideographic space become ASCII. Not NFKC: NFKC also
  turns Chinese punctuation (，：；！？（）) into ASCII, which changes the text a model learns to write.
- control characters and HTML remnants.
- advertisements, as lines, and within long lines as sentences (never the whole document): the ad shapes of
  web-novel sites (`AD_PATTERNS`, extendable with a file of regular expressions), counted per pattern.
- minimum length, Chinese-character ratio, repeated lines, repeated characters, exact duplicates (content hash)
  and near-duplicates (MinHash-LSH from `datasketch`, Broder 1997; Leskovec et al., Mining of Massive Datasets
  ch. 3): these drop whole documents.
"""

import html
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from datasketch import MinHash, MinHashLSH

from tiny_llama2_zh.data.han import HAN_CHARACTER
from tiny_llama2_zh.data.hashing import ExactDuplicates
from tiny_llama2_zh.errors import UsageError

# Full-width A-Z, a-z, 0-9 and the ideographic space U+3000 -> ASCII, one character for one (so folding never
# changes a length). Everything else, CJK punctuation and full-width ％ included, is kept exactly.
_FOLD = {
    **{code: code - 0xFEE0 for code in range(0xFF10, 0xFF1A)},
    **{code: code - 0xFEE0 for code in range(0xFF21, 0xFF3B)},
    **{code: code - 0xFEE0 for code in range(0xFF41, 0xFF5B)},
    0x3000: 0x20,
}
_FOLDABLE = re.compile("[\uff10-\uff19\uff21-\uff3a\uff41-\uff5a\u3000]")

_TLD = r"(?:com|net|org|cc|la|info|cn|tw|me|vip|xyz|top|io|co|so|us|tv|wang|biz)"
_DOT = r"\s*[.．。]\s*"  # sites write their domain with full-width or ideographic dots to dodge filters
_CLAUSE = r"[^。！？!?\n]"  # a character within one sentence

# The shapes web-novel sites put around a chapter, one regular expression each, anchored on the phrasing of the
# ad rather than on a word that ordinary prose uses too (手机用户, 最新, 推荐, 收藏, 网站 appear in news every
# day). A line is counted under the first pattern that matches, so the phrase shapes come before the bare
# URLs and domains. Users add their own with `CleaningOptions.extra_ad_patterns_file`.
AD_PATTERNS: dict[str, str] = {
    "remember the site": (
        r"一秒记住|记住本站|收藏本站|本站(?:地址|网址|域名)|首发(?:域名|网址|地址)"
        r"|(?:记住|收藏)(?:本书)?(?:首发)?(?:域名|网址)[:：]"
    ),
    "read on the phone": (
        rf"手机(?:用户|读者|版|端)?请(?:浏览|访问|登录|到|输入|直接)|手机用户{_CLAUSE}{{0,20}}请(?:浏览|访问|登录|到)"
        r"|手机(?:版|端|站)(?:阅读)?(?:网址|地址)|手机阅读(?:网址|地址)"
    ),
    "latest chapter": (
        rf"(?:最新|最快)章节{_CLAUSE}{{0,20}}(?:请(?:到|上|去|访问)|尽在|首发)"
        r"|(?:看|阅读)(?:最新|最快)(?:章节)?(?:请|就)(?:到|上|去)"
        r"|(?:最新|最快)章节(?:无弹窗|免费阅读|全文阅读|列表)|章节更新最快|更新最快的?(?:小说|网)"
        rf"|最快更新{_CLAUSE}{{0,10}}请(?:访问|到|上)|(?:首发|尽在){_CLAUSE}{{0,10}}(?:小说网|中文网|文学网)"
    ),
    "votes": (
        r"求(?:推荐票|月票|红票|粉红票|票票|订阅|收藏(?!家|品|夹)|打赏)|(?:投|砸)(?:张|几张)?(?:推荐票|月票|粉红票)"
        rf"|(?:推荐票|月票|打赏){_CLAUSE}{{0,12}}(?:投给|拜谢|支持一下)"
    ),
    "next page": r"本章未完(?!成)|(?:点击|请点)下一页|未完待续[，,]?请",
    "search engine": (
        rf"百度(?:搜索|一下){_CLAUSE}{{0,20}}(?:小说网|中文网|文学网|书网|书屋|阅读网|最新章节|第一时间|即可阅读)"
    ),
    "site name": r"笔趣阁|顶点小说|八一中文网|书趣阁|飘天文学|69书吧|UU看书|无弹窗|欢迎广大书友",
    "reader notice": (
        rf"长时间阅读请注意眼睛|(?:退出|关闭)转码|转码页面|章节错误[,，]?点此举报|加入书签[，,]?方便"
        rf"|(?i:txt\s*(?:全集)?\s*下载)|关注公众号{_CLAUSE}{{0,12}}(?:看书|书友|领|抽)|看书福利"
        rf"|更多精彩{_CLAUSE}{{0,6}}请(?:访问|登录|关注)|QQ群和微博里的朋友推荐"
    ),
    "url": r"(?i:https?\s*[:：]\s*//\S+)",
    "site domain": (
        # (labels bounded: an unbounded repeat backtracks quadratically over a long run like "1.2.3.4.5...")
        rf"(?i:(?<![a-z0-9-])(?:www|wap|m){_DOT}[a-z0-9-]+(?:{_DOT}[a-z0-9-]+){{0,4}}{_DOT}{_TLD}(?![a-z])"
        rf"|(?<![a-z0-9-])[a-z0-9][a-z0-9-]{{1,30}}(?:[.．][a-z0-9-]+){{0,4}}[.．]{_TLD}(?![a-z0-9]))"
    ),
}

# A line longer than this is not removed whole for an ad inside it: it is split into sentences and only the
# sentences that match go (one matching line in a 2 MB single-line document must not take the document).
AD_LINE_MAX_CHARS = 200
_SENTENCE = re.compile(r"[^。！？!?]+(?:[。！？!?]+[”’」』）)]*)?|[。！？!?]+[”’」』）)]*")

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b-\u200f\ufeff]")
_HTML_TAG = re.compile(r"</?[a-zA-Z][^<>]{0,200}>")
_HAN = re.compile(HAN_CHARACTER)


@dataclass
class CleaningOptions:
    normalize: bool = True  # fold full-width Latin letters, digits and spaces to ASCII (not NFKC)
    min_chars: int = 20
    min_chinese_ratio: float = 0.3
    max_repeated_line_fraction: float = 0.3  # share of lines that repeat another line of the document
    max_char_run: int = 20  # longest run of one character, e.g. "哈哈哈哈…" or "======"
    remove_ads: bool = True
    extra_ad_patterns_file: str | None = None
    ad_line_max_chars: int = AD_LINE_MAX_CHARS
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
    characters_in: int = 0  # as read, before any step
    documents_out: int = 0
    characters_out: int = 0
    characters_folded: int = 0  # changed in place by width folding (not removed)
    removed: dict[str, StepCount] = field(default_factory=dict)
    ad_removals: dict[str, int] = field(default_factory=dict)  # lines or sentences removed, per ad pattern

    def count(self, step: str, characters: int, documents: int = 1) -> None:
        entry = self.removed.setdefault(step, StepCount())
        entry.documents += documents
        entry.characters += characters

    @property
    def characters_removed(self) -> int:
        return sum(entry.characters for entry in self.removed.values())

    def summary(self) -> str:
        lines = [
            f"{self.documents_in:,} documents ({self.characters_in:,} chars) in, "
            f"{self.documents_out:,} ({self.characters_out:,} chars) out, "
            f"{self.characters_folded:,} full-width characters folded to ASCII"
        ]
        for step, entry in self.removed.items():
            lines.append(f"  {step:<22} -{entry.documents:,} documents, -{entry.characters:,} characters")
        for pattern, count in self.ad_removals.items():
            lines.append(f"    ad pattern {pattern!r}: {count:,} lines or sentences")
        return "\n".join(lines)


def fold_width(text: str) -> tuple[str, int]:
    """(text with full-width letters, digits and U+3000 as ASCII, number of characters folded)."""
    folded = len(_FOLDABLE.findall(text))
    return (text.translate(_FOLD) if folded else text), folded


def load_ad_patterns(options: CleaningOptions) -> dict[str, re.Pattern]:
    """Name -> compiled pattern; a user's extra patterns are named by their line in the file."""
    patterns = dict(AD_PATTERNS)
    if options.extra_ad_patterns_file:
        path = Path(options.extra_ad_patterns_file)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip() and not line.startswith("#"):
                patterns[f"{path.name}:{number}"] = line
    compiled = {}
    for name, pattern in patterns.items():
        try:
            compiled[name] = re.compile(pattern)
        except re.error as error:
            raise UsageError(f"ad pattern {name} ({pattern!r}) is not a valid regular expression: {error}") from None
    return compiled


def split_sentences(line: str) -> list[str]:
    """The sentences of a line, each with its end punctuation and closing quotes; "".join(them) == line."""
    return _SENTENCE.findall(line)


class AdFilter:
    """Removes advertisement lines, and ad sentences inside long lines, counting each removal by pattern."""

    def __init__(self, patterns: dict[str, re.Pattern], line_max_chars: int = AD_LINE_MAX_CHARS):
        self.patterns = patterns
        self.line_max_chars = line_max_chars
        # one pass of a combined pattern finds the (rare) lines that need a closer look
        self.any = re.compile("|".join(f"(?:{p.pattern})" for p in patterns.values())) if patterns else None

    def match(self, text: str) -> str | None:
        """The name of the first pattern that matches text, or None."""
        if self.any is None or not self.any.search(text):
            return None
        return next((name for name, pattern in self.patterns.items() if pattern.search(text)), None)

    def filter(self, text: str, counts: dict[str, int]) -> str:
        """text without its ad lines and sentences; adds one to counts[pattern] per line or sentence removed."""
        if self.any is None or not self.any.search(text):
            return text
        kept = []
        for line in text.split("\n"):
            name = self.match(line)
            if name is None:
                kept.append(line)
                continue
            if len(line) <= self.line_max_chars:
                counts[name] = counts.get(name, 0) + 1
                continue
            sentences = []
            for sentence in split_sentences(line):
                sentence_ad = self.match(sentence)
                if sentence_ad is None:
                    sentences.append(sentence)
                else:
                    counts[sentence_ad] = counts.get(sentence_ad, 0) + 1
            if sentences:
                kept.append("".join(sentences))
        return "\n".join(kept)


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
        self.ads = AdFilter(load_ad_patterns(self.options), self.options.ad_line_max_chars)
        self.exact = ExactDuplicates()
        self.lsh = MinHashLSH(threshold=self.options.near_dedup_threshold, num_perm=self.options.num_perm)
        self._next_key = 0

    def clean(self, text: str) -> str | None:
        """The cleaned text, or None when the document is dropped (the report says why).

        Every step counts what it removed as the difference in length it made, so the characters of the report
        add up: characters_in - characters removed == characters_out."""
        if not isinstance(text, str):
            raise TypeError(f"a document must be a string, not {type(text).__name__}")
        options, report = self.options, self.report
        report.documents_in += 1
        report.characters_in += len(text)
        if options.normalize:
            text, folded = fold_width(text)
            report.characters_folded += folded
        stripped = _CONTROL.sub("", html.unescape(_HTML_TAG.sub("", text)))
        if len(stripped) != len(text):
            report.count("control/html", len(text) - len(stripped), documents=0)
            text = stripped
        if options.remove_ads:
            without_ads = self.ads.filter(text, report.ad_removals)
            if len(without_ads) != len(text):
                report.count("ads", len(text) - len(without_ads), documents=0)
                text = without_ads
        trimmed = text.strip()
        if len(trimmed) != len(text):
            report.count("surrounding whitespace", len(text) - len(trimmed), documents=0)
            text = trimmed
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
