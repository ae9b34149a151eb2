"""Pretraining data on disk: token ids, every document framed as `<s>` + tokens + `</s>` (bos before, eos after,
as llama2.c does), concatenated into one flat binary file, with a JSON manifest beside it (`train.bin` +
`train.bin.json`).

uint16 when every id fits (vocabulary <= 65,536 ids: ChatGLM3's 64,798 does), else uint32. The dataset
memory-maps the file, so a corpus of any size costs no RAM and no per-step copies beyond one block.
"""

import glob
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.tokenizer import tokenizer_fingerprint

# v2: every document starts with bos (v1 files have eos only, and a model trained on them never sees the bos
# that generation starts from); v1 files are refused rather than silently mixed with v2 ones.
MANIFEST_FORMAT = "tiny-llama2-zh/pretokenized-v2"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class Manifest:
    dtype: str
    num_tokens: int
    num_documents: int
    vocab_size: int
    eos_token_id: int
    tokenizer_fingerprint: str
    sources: list[str] = field(default_factory=list)
    sha256: str | None = None  # of the .bin, so a restarted `data prepare` can verify a finished shard
    bos_token_id: int | None = None  # before every document; None only in manifests written by hand
    inputs_hash: str | None = None  # `data prepare`: the inputs, options and tokenizer that made this shard
    format: str = MANIFEST_FORMAT

    @classmethod
    def read(cls, bin_path: str | Path) -> "Manifest":
        path = manifest_path(bin_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {bin_path} was not written by `tinyllm data tokenize`")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise UsageError(f"{path} is not a manifest (malformed JSON: {error})") from None
        if not isinstance(values, dict) or values.get("format") != MANIFEST_FORMAT:
            found = values.get("format") if isinstance(values, dict) else None
            raise UsageError(
                f"{path}: format {found!r} is not {MANIFEST_FORMAT!r}: files written before v2 have no bos token "
                "before each document; re-run `tinyllm data prepare` (shards) or `tinyllm data tokenize` (a .bin)"
            )
        return cls(**values)


def manifest_path(bin_path: str | Path) -> Path:
    return Path(f"{bin_path}.json")


def _fsync(path: Path) -> None:
    with path.open("rb") as file:
        os.fsync(file.fileno())


def publish_token_file(temporary: Path, bin_path: Path, manifest: Manifest) -> None:
    """Move a completely written `temporary` into place as `bin_path`, then write its manifest beside it.

    The steps are ordered so that a crash between any two never leaves a manifest describing a missing, partial
    or different `.bin`: the earlier manifest (of an earlier file) is removed first, so an old `.bin` left alone is
    refused rather than read with another file's counts; the `.bin` appears by an atomic rename of synced bytes;
    the manifest is written under a temporary name, synced and renamed over (POSIX rename is atomic), so it is
    either absent or complete -- the usual write-temp-then-rename recipe (e.g. SQLite's and git's lock files)."""
    _fsync(temporary)
    manifest_file = manifest_path(bin_path)
    manifest_file.unlink(missing_ok=True)
    temporary.replace(bin_path)
    manifest_temporary = manifest_file.with_name(manifest_file.name + ".tmp")
    try:
        manifest_temporary.write_text(json.dumps(asdict(manifest), indent=2) + "\n")
        _fsync(manifest_temporary)
        manifest_temporary.replace(manifest_file)
    except BaseException:
        manifest_temporary.unlink(missing_ok=True)
        raise


def write_token_file(
    texts: Iterable[str],
    tokenizer: PreTrainedTokenizerFast,
    bin_path: str | Path,
    sources: list[str] | None = None,
    batch_size: int = 1024,
    total: int | None = None,
) -> Manifest:
    """Tokenize texts in batches with the fast tokenizer and stream the ids to bin_path, each document framed
    as bos + tokens + eos.

    Memory is bounded by one batch. The file is written under a temporary name and published with its manifest
    at the end (`publish_token_file`), so a crash never leaves a `.bin` that looks complete, nor a manifest that
    describes another file (and the temporary file is removed).
    """
    bos, eos = framing_tokens(tokenizer)
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    bin_path = Path(bin_path)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = bin_path.with_name(bin_path.name + ".tmp")
    num_tokens = num_documents = 0
    try:
        with (
            temporary.open("wb") as out,
            tqdm(total=total, desc=f"tokenize {bin_path.name}", unit="doc") as progress,
        ):
            for batch in batched(texts, batch_size):
                encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
                ids = np.fromiter((token for document in encoded for token in (bos, *document, eos)), dtype=np.int64)
                out.write(ids.astype(dtype).tobytes())
                num_tokens += len(ids)
                num_documents += len(batch)
                progress.update(len(batch))
        manifest = Manifest(
            dtype=dtype.name,
            num_tokens=num_tokens,
            num_documents=num_documents,
            vocab_size=vocab_size,
            eos_token_id=eos,
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            sources=sources or [],
            bos_token_id=bos,
        )
        publish_token_file(temporary, bin_path, manifest)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return manifest


def framing_tokens(tokenizer: PreTrainedTokenizerFast) -> tuple[int, int]:
    """(bos, eos) ids that frame every document; a tokenizer without either cannot write pretraining data."""
    if tokenizer.bos_token_id is None:
        raise UsageError(
            "the tokenizer has no bos token; every pretraining document starts with one (the llama2.c convention): "
            "give it one (e.g. <s>) or use a folder from `tinyllm tokenizer train` / `convert-chatglm3`"
        )
    if tokenizer.eos_token_id is None:
        raise UsageError("the tokenizer has no eos token; documents could not be separated")
    return tokenizer.bos_token_id, tokenizer.eos_token_id


def batched(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    """Lists of `size` items (the last may be shorter); itertools.batched arrives only in Python 3.12."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def read_tokens(bin_path: str | Path) -> np.memmap:
    manifest = Manifest.read(bin_path)
    tokens = np.memmap(bin_path, dtype=np.dtype(manifest.dtype), mode="r")
    if len(tokens) != manifest.num_tokens:
        raise UsageError(f"{bin_path} holds {len(tokens)} tokens but its manifest says {manifest.num_tokens}")
    return tokens


def expand_token_files(pattern: str | Path) -> list[Path]:
    """A .bin path, or a glob such as `data/pretrain/train-*.bin` for the shards of `tinyllm data prepare`."""
    pattern = str(pattern)
    if any(char in pattern for char in "*?["):
        paths = sorted(Path(p) for p in glob.glob(pattern))
        if not paths:
            raise FileNotFoundError(f"no .bin files match {pattern}")
        return paths
    return [Path(pattern)]


class PretrainDataset(Dataset):
    """Fixed-length blocks of `seq_len` tokens from one `.bin` or a glob of shards, as {"input_ids", "labels"}
    (labels == input_ids; the model shifts them, so X = block[:-1] predicts Y = block[1:] as in the seed).

    Within a file, consecutive blocks overlap by one token, so every adjacent token pair is a training target
    exactly once. Block i of a file starts at token i * (seq_len - 1). Files are memory-mapped lazily (each
    dataloader worker maps its own) and never copied beyond one block.
    """

    def __init__(self, path: str | Path, seq_len: int, expected_fingerprint: str | None = None):
        if seq_len < 2:
            raise UsageError(f"seq_len must be at least 2, got {seq_len}")
        self.seq_len = seq_len
        self.stride = seq_len - 1
        self.files = expand_token_files(path)
        self.manifests = [Manifest.read(file) for file in self.files]
        for file, manifest in zip(self.files, self.manifests):
            if expected_fingerprint is not None and expected_fingerprint != manifest.tokenizer_fingerprint:
                raise UsageError(
                    f"{file} was tokenized with tokenizer {manifest.tokenizer_fingerprint}, "
                    f"not with the one given ({expected_fingerprint}); re-run `tinyllm data tokenize`"
                )
        self.manifest = self.manifests[0]
        blocks = [max(0, (m.num_tokens - 1) // self.stride) for m in self.manifests]
        self.offsets = np.cumsum([0, *blocks])  # first block index of each file
        self.num_blocks = int(self.offsets[-1])
        if self.num_blocks == 0:
            raise UsageError(f"{path} has too few tokens for one block of {seq_len}")
        self._tokens: list[np.memmap | None] = [None] * len(self.files)

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_blocks:
            raise IndexError(index)
        file_index = int(np.searchsorted(self.offsets, index, side="right")) - 1
        if self._tokens[file_index] is None:
            self._tokens[file_index] = read_tokens(self.files[file_index])
        start = (index - int(self.offsets[file_index])) * self.stride
        block = torch.from_numpy(self._tokens[file_index][start : start + self.seq_len].astype(np.int64))
        return {"input_ids": block, "labels": block}


class MixedPretrainDataset(Dataset):
    """Several prepared sources drawn with mixing weights (the seed's `data_path_list`, weighted).

    Sample i comes from source k with probability weights[k] (a seeded draw fixed at construction, so the
    sequence is reproducible and resumable); within a source, blocks are taken in a seeded permutation and
    start over when exhausted. Length: the total number of blocks of all sources, unless given.
    """

    def __init__(
        self, datasets: list[PretrainDataset], weights: list[float], seed: int = 1337, length: int | None = None
    ):
        if len(datasets) != len(weights) or not datasets:
            raise UsageError(f"{len(datasets)} sources but {len(weights)} weights")
        if any(weight < 0 for weight in weights) or sum(weights) <= 0:
            raise UsageError(f"mixing weights must be non-negative and not all zero, got {weights}")
        self.datasets = datasets
        self.length = length or sum(len(d) for d in datasets)
        rng = np.random.default_rng(seed)
        probabilities = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.source_of = rng.choice(len(datasets), size=self.length, p=probabilities).astype(np.int32)
        # position of each sample among the samples of its source
        self.rank_in_source = np.zeros(self.length, dtype=np.int64)
        for k in range(len(datasets)):
            where = np.flatnonzero(self.source_of == k)
            self.rank_in_source[where] = np.arange(len(where))
        self.permutations = [rng.permutation(len(d)) for d in datasets]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        source = int(self.source_of[index])
        permutation = self.permutations[source]
        return self.datasets[source][int(permutation[self.rank_in_source[index] % len(permutation)])]
