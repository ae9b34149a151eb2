"""What the advertisement filter removes: from People's Daily 1998 (news, no ads: should be ~0) and from the
labelled web-novel fixture of tests/test_data_cleaning.py (recall on ad lines, false positives on ordinary lines).

    python benchmarks/ad_filter.py

For comparison it also runs the seed's filter (one unanchored alternation, whole lines, after NFKC).
Light: one pass over 19k paragraphs, a few seconds.
"""

import re
import sys
import unicodedata
from pathlib import Path

from tiny_llama2_zh.data.cleaning import AdFilter, CleaningOptions, fold_width, load_ad_patterns
from tiny_llama2_zh.data.demo_corpus import iter_source

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_data_cleaning import AD_LINES, ORDINARY_LINES

SEED_PATTERNS = re.compile(
    "|".join(
        f"(?:{p})"
        for p in (
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
    )
)


def main() -> None:
    ads = AdFilter(load_ad_patterns(CleaningOptions()))

    paragraphs = lines = characters = removed_chars = 0
    counts: dict[str, int] = {}
    examples: list[str] = []
    seed_lines = seed_chars = 0
    for text in iter_source("peoples_daily_1998"):
        paragraphs += 1
        for line in text.split("\n"):
            lines += 1
            characters += len(line)
            if SEED_PATTERNS.search(unicodedata.normalize("NFKC", line)):
                seed_lines += 1
                seed_chars += len(line)
            folded = fold_width(line)[0]  # as the cleaner does before the ad step
            before = sum(counts.values())
            kept = ads.filter(folded, counts)
            if sum(counts.values()) != before:
                removed_chars += len(folded) - len(kept)
                if len(examples) < 10:
                    examples.append(folded[:120])
    print(f"People's Daily 1998: {paragraphs:,} paragraphs, {lines:,} lines, {characters:,} characters")
    print(
        f"  ours: {sum(counts.values()):,} lines/sentences removed ({removed_chars:,} characters, "
        f"{removed_chars / characters:.5%}); per pattern {counts}"
    )
    for example in examples:
        print(f"    removed from: {example}")
    print(f"  seed: {seed_lines:,} lines removed ({seed_chars:,} characters, {seed_chars / characters:.3%})")

    def caught(line: str, seed: bool) -> bool:
        if seed:
            return bool(SEED_PATTERNS.search(unicodedata.normalize("NFKC", line)))
        return ads.match(fold_width(line)[0]) is not None

    for name, seed in (("ours", False), ("seed", True)):
        hits = sum(caught(line, seed) for line in AD_LINES)
        false_positives = sum(caught(line, seed) for line in ORDINARY_LINES)
        print(
            f"fixture, {name}: recall {hits}/{len(AD_LINES)} = {hits / len(AD_LINES):.3f} on ad lines, "
            f"{false_positives}/{len(ORDINARY_LINES)} false positives on ordinary lines"
        )


if __name__ == "__main__":
    main()
