"""What every export needs: the source model folder, its tokenizer's kind, the rotary permutation and a write
that never leaves a half-written file under the final name."""

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.loading import check_model_folder, load_model, refuse_quantized
from tiny_llama2_zh.tokenizer import QWEN2_PATTERN

BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")


def _pre_tokenizer_step(step: dict) -> tuple:
    """What of one tokenizer.json pre-tokenizer step decides the splits (so the ids): `trim_offsets` changes only
    the offsets transformers reports, never the ids, and is left out."""
    if step.get("type") == "ByteLevel":
        return ("ByteLevel", bool(step.get("add_prefix_space")), bool(step.get("use_regex", True)))
    if step.get("type") == "Split":
        return ("Split", json.dumps(step.get("pattern")), step.get("behavior"), bool(step.get("invert")))
    return (step.get("type"), json.dumps(step, sort_keys=True))


# The byte-level pre-tokenizers export knows, by the steps that decide their splits, with the name llama.cpp gives
# the same split (GGUF's `tokenizer.ggml.pre`; llama.cpp's src/llama-vocab.cpp implements each name's regex):
# - "gpt-2": ByteLevel with GPT-2's own regex, no prefix space (our tokenizers before digits were split);
# - "qwen2": Qwen2's tokenizer.json, a Split on QWEN2_PATTERN then ByteLevel without a regex
#   (tiny_llama2_zh.tokenizer.qwen2_pre_tokenizer, what `tinyllm tokenizer train` writes: one digit per token).
LLAMACPP_BYTE_LEVEL_PRE = {
    (("ByteLevel", False, True),): "gpt-2",
    (("Split", json.dumps({"Regex": QWEN2_PATTERN}), "Isolated", False), ("ByteLevel", False, False)): "qwen2",
}


def load_source(model_dir: str | Path):
    """Our model (float32, CPU, eval) and its tokenizer, refusing a folder that is not a causal LM of ours."""
    model_dir = check_model_folder(model_dir)
    refuse_quantized(model_dir, "export")  # the formats take float weights and quantise them their own way
    model_type = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type != "tiny_llama2":
        raise UsageError(f"{model_dir}/config.json: model_type is {model_type!r}; export reads tiny_llama2 folders")
    model, tokenizer = load_model(model_dir, device="cpu")
    model = model.float().eval()
    return model, tokenizer


def interleave_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder a q or k projection's output rows from transformers' "rotate half" rotary pairing (dimension i with
    i + head_dim/2) to the neighbouring-pair pairing (2i with 2i+1) that llama.cpp and llama2.c use.

    Within each head the rows [first half | second half] become [a0, b0, a1, b1, ...]; scores q.k are unchanged
    because q and k are permuted alike. `n_heads` is the number of heads of *this* projection, i.e. the kv heads
    for k under grouped-query attention (llama2.c's `export.py` permute_reverse, llama.cpp's
    `convert_hf_to_gguf.py` LlamaModel.permute, both of which take the kv head count for k).
    """
    rows, cols = weight.shape
    if rows % (2 * n_heads) != 0:
        raise UsageError(f"a projection with {rows} rows cannot hold {n_heads} heads of even size")
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


@dataclass
class VocabInfo:
    """A tokenizer as the export formats see it: every id's piece, and which kind of BPE it is."""

    kind: str  # "sentencepiece" (byte-fallback pieces, '▁' for space) or "byte_level" (GPT-2 byte alphabet)
    pieces: list[str]  # id -> token string, len == tokenizer size
    special_ids: set[int]  # added special tokens: control tokens in the exports
    merges: list[str]  # "a b" merge rules, in rank order (byte_level)
    scores: list[float] | None  # SentencePiece-style piece scores (sentencepiece; derived from the merges)
    piece_types: list[int] | None  # SentencePiece piece types: 1 normal, 2 unknown, 3 control, 6 byte
    add_dummy_prefix: bool
    llamacpp_pre: str  # llama.cpp's name for the pre-tokenizer (GGUF tokenizer.ggml.pre): gpt-2, qwen2 or default


def vocab_info(tokenizer, model_dir: Path) -> VocabInfo:
    """Classify the tokenizer by its tokenizer.json pipeline. Anything else is refused by name, so that no export
    writes a vocabulary its runtime would split differently."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UsageError(f"{model_dir}: the tokenizer model is {model.get('type')}; export handles BPE tokenizers")
    size = len(tokenizer)
    pieces = [""] * size
    for piece, index in model["vocab"].items():
        pieces[index] = piece
    special_ids = set()
    for added in spec.get("added_tokens", []):
        pieces[added["id"]] = added["content"]
        if added.get("special"):
            special_ids.add(added["id"])
    missing = [i for i, piece in enumerate(pieces) if not piece]
    if missing:
        raise UsageError(f"{model_dir}: token ids {missing[:5]} have no piece in tokenizer.json")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre else []
    pre_types = [p["type"] for p in steps]
    if "ByteLevel" in pre_types:
        if model.get("byte_fallback"):
            raise UsageError(f"{model_dir}: a byte-level BPE with byte fallback is not a pipeline export knows")
        llamacpp_pre = LLAMACPP_BYTE_LEVEL_PRE.get(tuple(_pre_tokenizer_step(step) for step in steps))
        if llamacpp_pre is None:
            raise UsageError(
                f"{model_dir}: unknown byte-level pre-tokenizer {json.dumps(pre, ensure_ascii=False)}; export knows "
                "Qwen2's (a Split on its regex, then ByteLevel without a regex: what `tinyllm tokenizer train` "
                "writes) and GPT-2's (ByteLevel with its regex, no prefix space), which llama.cpp runs as "
                "'qwen2' and 'gpt-2'; another split would give other ids in llama.cpp"
            )
        normalizer = (spec.get("normalizer") or {}).get("type")
        if normalizer not in (None, "NFC"):
            # llama.cpp applies no normalizer; NFC changes only text that is not NFC already (rare in practice)
            raise UsageError(f"{model_dir}: the tokenizer normalizes with {normalizer}, which llama.cpp would not do")
        return VocabInfo(
            "byte_level", pieces, special_ids, merges, None, None, add_dummy_prefix=False, llamacpp_pre=llamacpp_pre
        )
    if model.get("byte_fallback") and not pre_types:
        return _sentencepiece_vocab(spec, pieces, special_ids, merges, tokenizer, model_dir)
    raise UsageError(
        f"{model_dir}: unknown tokenizer pipeline (pre-tokenizer {pre_types}, byte_fallback "
        f"{model.get('byte_fallback')}); export handles our byte-level BPE and SentencePiece-style BPE with byte "
        "fallback (tinyllm tokenizer convert-chatglm3)"
    )


def _sentencepiece_vocab(spec, pieces, special_ids, merges, tokenizer, model_dir: Path) -> VocabInfo:
    """A SentencePiece-style BPE (ChatGLM3's, as `convert_chatglm3` writes it) in SentencePiece's own terms.

    llama.cpp's "llama" tokenizer and llama2.c's run.c both merge the adjacent pair whose result has the highest
    piece score, where transformers merges the pair of lowest merge rank. Scoring each piece by minus the rank of
    the first merge that makes it gives the same merge order, so the scores come from tokenizer.json, which defines
    our ids (a model folder keeps no tokenizer.model); pieces no merge makes (single characters) score below all.
    """
    vocab = spec["model"]["vocab"]
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing:
        raise UsageError(f"{model_dir}: byte fallback is on but byte pieces {missing[:3]} are missing")
    normalizer = spec.get("normalizer") or {}
    steps = normalizer.get("normalizers", [normalizer]) if normalizer else []
    described = [(n.get("type"), n.get("prepend"), json.dumps(n.get("pattern")), n.get("content")) for n in steps]
    space_to_bar = ("Replace", None, json.dumps({"String": " "}), "▁")
    if described == [("Prepend", "▁", "null", None), space_to_bar]:
        dummy_prefix = True
    elif described == [space_to_bar]:
        dummy_prefix = False
    else:
        raise UsageError(
            f"{model_dir}: the tokenizer normalizes text as {described}; export knows only SentencePiece's "
            "'▁' handling (an optional dummy prefix, then spaces as '▁')"
        )
    first_rank: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        first_rank.setdefault(merge.replace(" ", "", 1), rank)
    scores, types = [], []
    for index, piece in enumerate(pieces):
        if index == tokenizer.unk_token_id:
            types.append(2)
        elif index in special_ids:
            types.append(3)
        elif BYTE_PIECE.fullmatch(piece):
            types.append(6)
        else:
            types.append(1)
        rank = first_rank.get(piece)
        scores.append(-float(rank) if rank is not None and types[-1] == 1 else -float(len(merges) + index))
    return VocabInfo("sentencepiece", pieces, special_ids, merges, scores, types, dummy_prefix, "default")


def strip_generation_tags(template: str) -> str:
    """The chat template without transformers' `{% generation %}` markers (they only mark assistant tokens for
    training masks and render nothing); other Jinja engines (llama.cpp's) do not know the tag."""
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


def refuse_existing(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_path(output: str | Path, overwrite: bool = False, directory: bool = False) -> Iterator[Path]:
    """A temporary path beside `output` to write to; renamed to `output` only when the block finishes, so a crash
    or a refusal never leaves a half-written file under the final name."""
    output = Path(output)
    refuse_existing(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{output.name}.partial-"
    if directory:
        temp = Path(tempfile.mkdtemp(prefix=prefix, dir=output.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=prefix, dir=output.parent)
        os.close(handle)
        temp = Path(name)
        umask = os.umask(0)
        os.umask(umask)
        temp.chmod(0o666 & ~umask)  # mkstemp's 0600 would make the export unreadable to other users
    try:
        yield temp
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True) if directory else temp.unlink(missing_ok=True)
        raise
    if directory and output.exists():
        shutil.rmtree(output)
    os.replace(temp, output)
