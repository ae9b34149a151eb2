"""`tinyllm data prepare`: corpus files -> cleaned, deduplicated text -> sharded `.bin` training files.

Pretraining sources go through two stages, each restartable:

1. clean: records from every source, in the order given, through one `Cleaner` (so duplicates are found across
   sources), split into train/validation by a hash of the text, written as `cleaned/{train,validation}.jsonl`
   with `cleaned/report.json`. Written under temporary names and renamed when complete; a finished stage whose
   options match is not run again.
2. tokenize: the cleaned text in shards of `docs_per_shard` documents, each encoded in batches and streamed to
   `train-00000.bin` + manifest, every document framed as bos + tokens + eos: by SentencePiece's threaded C++
   batch encoder in this process when the tokenizer folder carries its SentencePiece model, else by worker
   processes running the `tokenizers` library (`multiprocessing.Pool.imap` keeps the order). Memory is bounded
   by one shard's lines and the batches in flight. A shard is
   written to a temporary name and renamed when complete; on restart, finished shards are verified against
   their manifest (size, SHA-256, tokenizer, and the hash of the inputs and options that made them) and kept;
   a shard made from other inputs is rebuilt, and shards beyond this run's count are removed, each with a
   printed message. Shard contents depend only on the document order, so the output is byte-identical for any
   number of workers.

SFT and preference sources are normalised (chat `messages`; `prompt`/`chosen`/`rejected`) and written as JSONL
splits after exact deduplication, split by prompt so that no test prompt is trained on. Never pickle: loading a
pickle runs arbitrary code. A run that stops (strict mode, bad input, Ctrl-C) leaves no temporary files.
"""

import hashlib
import json
import multiprocessing
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from tiny_llama2_zh.data.cleaning import Cleaner, CleaningOptions
from tiny_llama2_zh.data.hashing import ExactDuplicates, file_sha256, is_validation
from tiny_llama2_zh.data.pretokenized import (
    MANIFEST_FORMAT,
    Manifest,
    batched,
    framing_tokens,
    manifest_path,
    publish_token_file,
    token_dtype,
)
from tiny_llama2_zh.data.sources import BadRecords, get_source, read_records
from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.tokenizer import load_tokenizer, tokenizer_fingerprint

if TYPE_CHECKING:
    from sentencepiece import SentencePieceProcessor


@dataclass
class PrepareOptions:
    output_dir: str
    sources: list[tuple[str, list[str]]]  # (source name, files)
    tokenizer: str | None = None  # needed for pretraining sources
    workers: int = 2
    docs_per_shard: int = 100_000
    # documents per encode call: with 512, SentencePiece's threads reached ~75 % of its batch speed, with 4096 ~all
    batch_size: int = 4096
    validation_per_mille: int = 5
    strict: bool = False
    text_field: str = "text"  # the field the generic `jsonl` source reads
    cleaning: CleaningOptions = field(default_factory=CleaningOptions)


@dataclass
class PrepareResult:
    kind: str
    output_dir: str
    documents: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    shards: dict[str, int] = field(default_factory=dict)
    records_per_source: dict[str, int] = field(default_factory=dict)  # read, before cleaning
    bad_records: dict[str, int] = field(default_factory=dict)
    bad_examples: list[str] = field(default_factory=list)
    repaired: dict[str, int] = field(default_factory=dict)  # kept records changed on the way in, by what was done
    cleaning: dict | None = None
    seconds: float = 0.0


def prepare(options: PrepareOptions) -> PrepareResult:
    kinds = {get_source(name).kind for name, _ in options.sources}
    if len(kinds) != 1:
        raise UsageError(f"one call prepares one kind of data; these sources mix {sorted(kinds)}")
    kind = kinds.pop()
    output_dir = Path(options.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bad = BadRecords(strict=options.strict)
    if kind == "pretrain":
        if options.tokenizer is None:
            raise UsageError("pretraining sources need --tokenizer")
        result = _prepare_pretrain(options, output_dir, bad)
    else:
        result = _prepare_records(options, output_dir, kind, bad)
    result.bad_records = dict(bad.counts)
    result.bad_examples = bad.examples
    result.repaired = dict(bad.repaired)
    result.seconds = round(time.perf_counter() - started, 2)
    (output_dir / "prepare_report.json").write_text(json.dumps(asdict(result), indent=2, ensure_ascii=False) + "\n")
    return result


def _records(options: PrepareOptions, bad: BadRecords, per_source: dict[str, int]) -> Iterator[dict]:
    for name, paths in options.sources:
        per_source.setdefault(name, 0)
        for record in read_records(get_source(name), paths, bad, options.text_field):
            per_source[name] += 1
            yield record


def _file_identity(path: str | Path | None) -> list | None:
    """[path, size, mtime] of a file: a changed or replaced input file changes the hashes below. (Not a content
    hash: reading a 100 GB corpus again on every restart to decide whether to keep its shards costs too much.)"""
    if path is None:
        return None
    try:
        stat = Path(path).stat()
    except OSError:
        return [str(path), None, None]
    return [str(path), stat.st_size, stat.st_mtime_ns]


def _options_hash(options: PrepareOptions) -> str:
    """What the cleaned text depends on: sources and their files, cleaning options, the split."""
    described = {
        "sources": [[name, [_file_identity(path) for path in paths]] for name, paths in options.sources],
        "text_field": options.text_field,
        "cleaning": asdict(options.cleaning),
        "ad_patterns_file": _file_identity(options.cleaning.extra_ad_patterns_file),
        "split": options.validation_per_mille,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def _shard_inputs_hash(options: PrepareOptions, cleaned: Path, split: str, fingerprint: str, tokenizer) -> str:
    """What a split's shards depend on: everything the cleaned text does, the cleaned file itself, the split,
    docs_per_shard, the tokenizer and the framing. Not the batch size or the number of workers: they do not
    change a byte."""
    bos, eos = framing_tokens(tokenizer)
    identity = _file_identity(cleaned)
    described = {
        "format": MANIFEST_FORMAT,
        "clean": _options_hash(options),
        "cleaned": identity[1:],  # size and mtime: a re-run clean stage rewrites it
        "split": split,
        "docs_per_shard": options.docs_per_shard,
        "tokenizer": fingerprint,
        "framing": [bos, eos],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- pretraining
def _prepare_pretrain(options: PrepareOptions, output_dir: Path, bad: BadRecords) -> PrepareResult:
    result = PrepareResult(kind="pretrain", output_dir=str(output_dir))
    tokenizer = load_tokenizer(options.tokenizer)
    framing_tokens(tokenizer)  # a tokenizer without bos or eos is refused before hours of cleaning, not after
    cleaned_dir = output_dir / "cleaned"
    done_marker = cleaned_dir / "report.json"
    options_hash = _options_hash(options)
    finished = json.loads(done_marker.read_text()) if done_marker.is_file() else {}
    if finished.get("options_hash") == options_hash:
        print(f"{cleaned_dir}: cleaned text is complete for these options; keeping it")
        result.cleaning = finished["report"]
    else:
        result.cleaning = _clean(options, cleaned_dir, options_hash, bad, result.records_per_source)
    for split in ("train", "validation"):
        documents, tokens, shards = tokenize_to_shards(
            options, cleaned_dir / f"{split}.jsonl", output_dir, split, tokenizer
        )
        result.documents[split], result.tokens[split], result.shards[split] = documents, tokens, shards
    return result


def _clean(
    options: PrepareOptions, cleaned_dir: Path, options_hash: str, bad: BadRecords, per_source: dict[str, int]
) -> dict:
    cleaned_dir.mkdir(parents=True, exist_ok=True)
    # the done-marker of an earlier run must not vouch for text this run is about to replace
    (cleaned_dir / "report.json").unlink(missing_ok=True)
    cleaner = Cleaner(options.cleaning)
    temporary = {split: cleaned_dir / f"{split}.jsonl.tmp" for split in ("train", "validation")}
    try:
        with (
            temporary["train"].open("w", encoding="utf-8") as train,
            temporary["validation"].open("w", encoding="utf-8") as validation,
            tqdm(desc="clean", unit="doc") as progress,
        ):
            for record in _records(options, bad, per_source):
                progress.update()
                text = cleaner.clean(record["text"])
                if text is None:
                    continue
                out = validation if is_validation(text, options.validation_per_mille) else train
                out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    except BaseException:
        _remove(temporary.values())  # a stopped run (strict mode, bad input, Ctrl-C) leaves nothing half-made
        raise
    for split, path in temporary.items():
        path.replace(cleaned_dir / f"{split}.jsonl")
    report = asdict(cleaner.report)
    print(cleaner.report.summary())
    (cleaned_dir / "report.json").write_text(
        json.dumps({"options_hash": options_hash, "report": report}, indent=2, ensure_ascii=False) + "\n"
    )
    return report


def _remove(paths) -> None:
    for path in paths:
        Path(path).unlink(missing_ok=True)


_worker_tokenizer = None  # the `tokenizers` library's Tokenizer, in each worker process
_worker_bos = 1
_worker_eos = 2


def _init_worker(tokenizer_dir: str, threads_per_worker: bool) -> None:
    global _worker_tokenizer, _worker_bos, _worker_eos
    if not threads_per_worker:
        # the processes already fill the cores; Rust threads inside each would only contend for them
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = load_tokenizer(tokenizer_dir)
    _worker_bos, _worker_eos = framing_tokens(tokenizer)
    _worker_tokenizer = tokenizer.backend_tokenizer


def sentencepiece_processor(tokenizer_dir: Path, tokenizer) -> "SentencePieceProcessor | None":
    """SentencePiece's own processor when the folder carries the SentencePiece model it was converted from
    (`tinyllm tokenizer convert-chatglm3` keeps it as tokenizer.model), else None.

    For ChatGLM3's model it is about 5x faster per core than the `tokenizers` library (benchmarks/
    tokenize_throughput.py), and its ids are the fast tokenizer's by construction (tests compare them on the
    corpus), except where a text contains a special token's string ("<|user|>"): SentencePiece never matches
    control symbols in text and spells it out. A folder whose model disagrees with its tokenizer.json on a probe
    text is not trusted.
    """
    model_file = tokenizer_dir / "tokenizer.model"
    if not model_file.is_file():
        return None
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(model_file))
    probe = ["床前明月光，疑是地上霜。", "Hello  world\n\t 😀", " 混合 English 2024年"]
    if processor.encode(probe) != [tokenizer.encode(text, add_special_tokens=False) for text in probe]:
        return None
    return processor


def _framed(encoded: list, bos: int, eos: int) -> np.ndarray:
    """bos + ids + eos for every document of a batch (as `write_token_file` frames them), as one int64 array."""
    bos_array = np.array([bos], dtype=np.int64)
    eos_array = np.array([eos], dtype=np.int64)
    pieces = []
    for ids in encoded:
        pieces.append(bos_array)
        pieces.append(np.asarray(ids, dtype=np.int64))
        pieces.append(eos_array)
    return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)


def _encode_batch(lines: list[str]) -> np.ndarray:
    """Token ids of a batch of JSONL lines ({"text": ...}), each document framed as bos + ids + eos, as one int64
    array. The worker parses the JSON and encodes: the main process only moves lines."""
    texts = [json.loads(line)["text"] for line in lines]
    encoded = [e.ids for e in _worker_tokenizer.encode_batch(texts, add_special_tokens=False)]
    return _framed(encoded, _worker_bos, _worker_eos)


class SentencePieceBatches:
    """Framed token ids of batches of JSONL lines, in order, encoded in this process by SentencePiece's C++ batch
    encoder on `threads` threads of one persistent `sentencepiece.ThreadPool`.

    Why not worker processes: with SentencePiece the encoder is ~4x faster than the `tokenizers` library, and the
    process pipeline's own costs (pickling lines out and int64 arrays back, a Python list of ints per document,
    a main process competing with the workers for the cores) held it to 43 % of SentencePiece's batch speed
    (README, benchmarks/tokenize_throughput.py). Here the encoder hands back one int32 buffer per document
    (`return_type="numpy"`) with bos/eos added in C++ (`add_bos`/`add_eos`, when the model's own ids are the
    framing ids), and the C++ threads run without the GIL (sentencepiece_pybind.cc releases it) on a background
    thread, so that the main thread parses the next batch's JSON and writes the previous one meanwhile. At most
    `in_flight` batches are queued, so memory stays bounded by a few batches beyond the shard's lines.
    """

    def __init__(self, processor: "SentencePieceProcessor", bos: int, eos: int, threads: int, in_flight: int = 3):
        import sentencepiece as spm

        self.processor, self.bos, self.eos, self.in_flight = processor, bos, eos, in_flight
        self.native_framing = processor.bos_id() == bos and processor.eos_id() == eos
        self.thread_pool = spm.ThreadPool(max(1, threads))
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sentencepiece")

    def encode(self, texts: list[str]) -> np.ndarray:
        """bos + ids + eos of every text, concatenated (int32, or int64 when framed in Python)."""
        arrays = self.processor.encode(
            texts,
            return_type="numpy",
            add_bos=self.native_framing,
            add_eos=self.native_framing,
            thread_pool=self.thread_pool,
        )
        if not self.native_framing:
            return _framed(arrays, self.bos, self.eos)
        return np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int32)

    def __call__(self, line_batches: Iterable[list[str]]) -> Iterator[np.ndarray]:
        pending: deque[Future] = deque()
        for lines in line_batches:
            pending.append(self.executor.submit(self.encode, [json.loads(line)["text"] for line in lines]))
            if len(pending) >= self.in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


@contextmanager
def _batch_encoder(options: PrepareOptions, tokenizer) -> Iterator[Callable[[Iterable[list[str]]], Iterator]]:
    """A function from batches of JSONL lines to their framed ids, in order: SentencePiece in this process when
    the folder carries its model (`SentencePieceBatches`), else `options.workers` processes running the
    `tokenizers` library (where that library's own batch speed is what this pipeline reaches)."""
    processor = sentencepiece_processor(Path(options.tokenizer), tokenizer)
    if processor is not None:
        batches = SentencePieceBatches(processor, *framing_tokens(tokenizer), threads=options.workers)
        try:
            yield batches
        finally:
            batches.close()
        return
    # fork: workers inherit the imported libraries instead of importing torch and transformers again (seconds
    # each); they only run the tokenizer, and the tokenizers library turns its own threads off after a fork.
    start_method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(start_method).Pool(
        options.workers, _init_worker, (options.tokenizer, options.workers == 1)
    )
    try:
        yield lambda batches: pool.imap(_encode_batch, batches)
    finally:
        pool.close()
        pool.join()


def _read_lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as lines:
        yield from (line for line in lines if line.strip())


def _finished_shard(bin_path: Path, fingerprint: str, inputs_hash: str) -> tuple[Manifest | None, str | None]:
    """(manifest, None) for a complete shard made from these inputs; else (None, why it is not reusable), where
    the reason is None when there is simply nothing there yet."""
    if not bin_path.is_file() and not manifest_path(bin_path).is_file():
        return None, None
    try:
        manifest = Manifest.read(bin_path)
    except (FileNotFoundError, ValueError, TypeError) as error:
        return None, f"unusable manifest ({error})"
    if not bin_path.is_file():
        return None, "the .bin is missing"
    expected_size = manifest.num_tokens * np.dtype(manifest.dtype).itemsize
    if bin_path.stat().st_size != expected_size:
        return None, f"{bin_path.stat().st_size} bytes where its manifest says {expected_size} (interrupted?)"
    if manifest.tokenizer_fingerprint != fingerprint:
        return None, f"tokenized with tokenizer {manifest.tokenizer_fingerprint}, not this one ({fingerprint})"
    if manifest.inputs_hash != inputs_hash:
        return None, (
            f"made from other inputs or options (inputs hash {manifest.inputs_hash}, now {inputs_hash}: sources, "
            "their files, cleaning options, split or docs_per_shard changed)"
        )
    if manifest.sha256 != file_sha256(bin_path):
        return None, "its bytes do not match the SHA-256 in its manifest (corrupted)"
    return manifest, None


def tokenize_to_shards(options: PrepareOptions, cleaned: Path, output_dir: Path, split: str, tokenizer):
    """Tokenize a JSONL of {"text"} into `{split}-NNNNN.bin` shards (see the module docstring); resumable."""
    output_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = tokenizer_fingerprint(tokenizer)
    inputs_hash = _shard_inputs_hash(options, cleaned, split, fingerprint, tokenizer)
    dtype = token_dtype(len(tokenizer))
    documents = tokens = shards = 0
    with _batch_encoder(options, tokenizer) as encode, tqdm(desc=f"tokenize {split}", unit="doc") as progress:
        for index, shard in enumerate(batched(_read_lines(cleaned), options.docs_per_shard)):
            bin_path = output_dir / f"{split}-{index:05d}.bin"
            manifest, reason = _finished_shard(bin_path, fingerprint, inputs_hash)
            if manifest is None:
                if reason is not None:
                    progress.write(f"{bin_path}: rebuilding: {reason}")
                manifest = _write_shard(
                    encode, shard, bin_path, options, tokenizer, fingerprint, inputs_hash, dtype, progress
                )
            else:
                progress.update(len(shard))
            documents += manifest.num_documents
            tokens += manifest.num_tokens
            shards += 1
            elapsed = progress.format_dict["elapsed"] or 1e-9
            progress.set_postfix(tokens=f"{tokens:,}", tokens_per_s=f"{tokens / elapsed:,.0f}")
    _remove_surplus_shards(output_dir, split, shards)
    return documents, tokens, shards


def _remove_surplus_shards(output_dir: Path, split: str, count: int) -> None:
    """Shards of an earlier run beyond this run's `count` (fewer documents, a larger docs_per_shard) would still
    match `train-*.bin` and be trained on: remove them, their manifests, and any leftover temporary file."""
    pattern = re.compile(rf"{re.escape(split)}-(\d{{5,}})\.bin(\.json|\.tmp|\.json\.tmp)?")
    for path in sorted(output_dir.iterdir()):
        match = pattern.fullmatch(path.name)
        if match is None or not path.is_file():
            continue
        if match.group(2) in (".tmp", ".json.tmp"):
            path.unlink()
        elif int(match.group(1)) >= count:
            print(f"{path}: removed: a shard of an earlier run (this run writes {count} {split} shards)")
            path.unlink()


def _write_shard(
    encode, shard, bin_path: Path, options, tokenizer, fingerprint: str, inputs_hash: str, dtype, progress
) -> Manifest:
    batches = list(batched(shard, options.batch_size))
    temporary = bin_path.with_name(bin_path.name + ".tmp")
    digest = hashlib.sha256()
    num_tokens = 0
    try:
        with temporary.open("wb") as out:
            for batch, ids in zip(batches, encode(batches)):
                data = ids.astype(dtype).tobytes()
                out.write(data)
                digest.update(data)
                num_tokens += len(ids)
                progress.update(len(batch))
        manifest = Manifest(
            dtype=dtype.name,
            num_tokens=num_tokens,
            num_documents=len(shard),
            vocab_size=len(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
            tokenizer_fingerprint=fingerprint,
            sources=[name for name, _ in options.sources],
            sha256=digest.hexdigest(),
            bos_token_id=tokenizer.bos_token_id,
            inputs_hash=inputs_hash,
        )
        publish_token_file(temporary, bin_path, manifest)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return manifest


# ---------------------------------------------------------------------------------- SFT and preferences
def split_key(record: dict, kind: str) -> str:
    """The text a record's train/test split is decided by: its prompt, so that the answers to one prompt all
    land on one side (hashing the whole record put one prompt's answers in both). For SFT the first user
    message, as `data tasks` does; a conversation without one is keyed by all its non-assistant content."""
    if kind == "preference":
        return record["prompt"]
    messages = record["messages"]
    first_user = next((m["content"] for m in messages if m.get("role") == "user"), None)
    if first_user is not None:
        return first_user
    return "\n".join(m["content"] for m in messages if m.get("role") != "assistant")


def _prepare_records(options: PrepareOptions, output_dir: Path, kind: str, bad: BadRecords) -> PrepareResult:
    result = PrepareResult(kind=kind, output_dir=str(output_dir))
    exact = ExactDuplicates()
    duplicates = 0
    temporary = {split: output_dir / f"{kind}-{split}.jsonl.tmp" for split in ("train", "test")}
    counts = {"train": 0, "test": 0}
    try:
        with (
            temporary["train"].open("w", encoding="utf-8") as train,
            temporary["test"].open("w", encoding="utf-8") as test,
        ):
            records = _records(options, bad, result.records_per_source)
            for record in tqdm(records, desc=f"normalise {kind}", unit="record"):
                line = json.dumps(record, ensure_ascii=False)
                if exact.seen_before(line):
                    duplicates += 1
                    continue
                split = "test" if is_validation(split_key(record, kind), options.validation_per_mille) else "train"
                (test if split == "test" else train).write(line + "\n")
                counts[split] += 1
    except BaseException:
        _remove(temporary.values())  # a stopped run (strict mode, bad input, Ctrl-C) leaves nothing half-made
        raise
    for split, path in temporary.items():
        path.replace(output_dir / f"{kind}-{split}.jsonl")
    result.documents = counts
    result.cleaning = {"exact_duplicates_removed": duplicates}
    return result
