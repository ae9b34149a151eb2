"""Export to karpathy/llama2.c: a model file for `run.c` (version 0, "legacy", float32) or `runq.c` (version 2,
int8 weights in groups, Q8_0-style), plus the `tokenizer.bin` both read.

Formats as llama2.c's `export.py` writes them (legacy_export, version2_export) and its `tokenizer.py` writes the
tokenizer; the code here is our own. Differences from upstream's Hugging Face importer, on purpose:
- grouped-query attention is kept: the header's n_kv_heads is the model's, and k's rows are permuted per kv head
  (upstream's importer sets n_kv_heads = n_heads, which would be wrong for a GQA model);
- anything run.c/runq.c would run wrongly is refused before a byte is written: run.c hard-codes BOS 1, EOS 2, byte
  fallback at id byte + 3, rope theta 10000 and RMSNorm eps 1e-5, and its tokenizer is SentencePiece-style (a
  dummy-prefix space, '▁' as space, <0xNN> byte pieces), so our byte-level BPE vocabulary cannot be exported.
"""

import struct
from pathlib import Path

import numpy as np
import torch

from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.export.common import (
    BYTE_PIECE,
    VocabInfo,
    atomic_path,
    interleave_rotary_rows,
    load_source,
    refuse_existing,
)
from tiny_llama2_zh.export.common import vocab_info as read_vocab

LLAMA2C_VERSIONS = (0, 2)
MAGIC = 0x616B3432  # "ak42"
NEVER_MERGED = -1e10  # run.c merges a pair only into a piece scoring above -1e10


def check_llama2c_model(config, tokenizer, vocab: VocabInfo, model_dir: Path) -> None:
    """Refuse, naming the reason, a model that run.c/runq.c cannot run as it was trained."""
    problems = []
    if vocab.kind != "sentencepiece":
        problems.append(
            "its tokenizer is a byte-level BPE: run.c's tokenizer needs SentencePiece-style pieces with byte "
            "fallback (<0x00>..<0xFF> at ids 3..258, '▁' for space), e.g. a ChatGLM3-vocabulary model"
        )
    else:
        byte_ids = [vocab.pieces.index(f"<0x{b:02X}>") if f"<0x{b:02X}>" in vocab.pieces else -1 for b in (0, 255)]
        if byte_ids != [3, 258]:
            problems.append(f"byte-fallback pieces <0x00>/<0xFF> are at ids {byte_ids}; run.c reads them at 3/258")
        if not vocab.add_dummy_prefix:
            problems.append("the tokenizer adds no dummy-prefix space, and run.c always adds one")
        if any(" " in piece for piece in vocab.pieces):
            problems.append("some pieces hold a real space, which run.c's '▁'-as-space vocabulary cannot tell apart")
    if (tokenizer.bos_token_id, tokenizer.eos_token_id) != (1, 2):
        problems.append(f"BOS/EOS are {tokenizer.bos_token_id}/{tokenizer.eos_token_id}; run.c hard-codes 1/2")
    if float(config.rope_theta) != 10000.0:
        problems.append(f"rope_theta is {config.rope_theta}; run.c uses 10000")
    if abs(float(config.rms_norm_eps) - 1e-5) > 1e-12:
        problems.append(f"rms_norm_eps is {config.rms_norm_eps}; run.c uses 1e-5")
    if problems:
        raise UsageError(f"{model_dir} cannot be exported to llama2.c: " + "; ".join(problems))


def llama2c_token_strings(vocab: VocabInfo, tokenizer, vocab_size: int) -> tuple[list[bytes], list[float]]:
    """tokenizer.bin's strings and scores, per llama2.c's tokenizer.py: '▁' written as a space, BOS/EOS as
    "\\n<s>\\n"/"\\n</s>\\n". Control, unknown and byte pieces get a score run.c never merges into (it looks bytes up
    by id), so that text like "sop" is never turned into ChatGLM3's special `sop`."""
    strings, scores = [], []
    for index, piece in enumerate(vocab.pieces):
        kind = vocab.piece_types[index]
        if index == tokenizer.bos_token_id:
            text = "\n<s>\n"
        elif index == tokenizer.eos_token_id:
            text = "\n</s>\n"
        else:
            text = piece.replace("▁", " ")
        normal = kind == 1 and index not in vocab.special_ids and not BYTE_PIECE.fullmatch(piece)
        strings.append(text.encode("utf-8"))
        scores.append(float(vocab.scores[index]) if normal else NEVER_MERGED)
    for index in range(len(strings), vocab_size):  # embedding rows the tokenizer never produces
        strings.append(f"<unused{index}>".encode())
        scores.append(NEVER_MERGED)
    duplicates = len(strings) - len(set(strings))
    if duplicates:
        raise UsageError(
            f"{duplicates} pieces become the same string in tokenizer.bin; run.c could not tell them apart"
        )
    return strings, scores


def tokenizer_bin_bytes(strings: list[bytes], scores: list[float]) -> bytes:
    """llama2.c's tokenizer.bin: int max_token_length, then per token float score, int length, bytes."""
    parts = [struct.pack("<i", max(len(s) for s in strings))]
    for text, score in zip(strings, scores):
        parts.append(struct.pack("<fi", score, len(text)))
        parts.append(text)
    return b"".join(parts)


def _layers(model) -> dict[str, list[torch.Tensor]]:
    """Per-layer weights in llama2.c's names and layout (w1 gate, w2 down, w3 up), q/k in its rotary pairing."""
    config = model.config
    state = {name: tensor.detach().float() for name, tensor in model.state_dict().items()}
    names = {
        "attention_norm": "input_layernorm",
        "wq": "self_attn.q_proj",
        "wk": "self_attn.k_proj",
        "wv": "self_attn.v_proj",
        "wo": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "w1": "mlp.gate_proj",
        "w2": "mlp.down_proj",
        "w3": "mlp.up_proj",
    }
    layers: dict[str, list[torch.Tensor]] = {}
    for ours, theirs in names.items():
        tensors = [state[f"model.layers.{i}.{theirs}.weight"] for i in range(config.num_hidden_layers)]
        if ours == "wq":
            tensors = [interleave_rotary_rows(t, config.num_attention_heads) for t in tensors]
        elif ours == "wk":
            tensors = [interleave_rotary_rows(t, config.num_key_value_heads) for t in tensors]
        layers[ours] = tensors
    layers["tok_embeddings"] = [state["model.embed_tokens.weight"]]
    layers["norm"] = [state["model.norm.weight"]]
    layers["output"] = [state["lm_head.weight"]]
    return layers


def _write_f32(out, tensor: torch.Tensor) -> None:
    out.write(tensor.contiguous().numpy().astype("<f4").tobytes())


def _header_ints(config, shared: bool) -> list[int]:
    vocab = config.vocab_size if shared else -config.vocab_size  # negative: a separate classifier follows (v0)
    return [
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        vocab,
        config.max_position_embeddings,
    ]


def _write_v0(out, model, layers) -> None:
    config = model.config
    shared = bool(config.tie_word_embeddings)
    out.write(struct.pack("<7i", *_header_ints(config, shared)))
    _write_f32(out, layers["tok_embeddings"][0])
    for name in ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3"):
        for tensor in layers[name]:
            _write_f32(out, tensor)
    _write_f32(out, layers["norm"][0])
    # the rotary tables the legacy format still carries (run.c skips them and computes its own)
    head_dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(config.max_position_embeddings).float(), inv_freq)
    _write_f32(out, torch.cos(angles))
    _write_f32(out, torch.sin(angles))
    if not shared:
        _write_f32(out, layers["output"][0])


def group_size_for(config) -> int:
    """The largest group (64 down to 2) dividing both widths runq.c quantizes activations over."""
    for size in (64, 32, 16, 8, 4, 2):
        if config.hidden_size % size == 0 and config.intermediate_size % size == 0:
            return size
    raise UsageError(
        f"hidden_size {config.hidden_size} and intermediate_size {config.intermediate_size} share no even group "
        "size for runq.c's int8 groups"
    )


def quantize_q80(tensor: torch.Tensor, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per group of `group_size` consecutive weights, scale = max|w| / 127 (llama2.c's
    version2_export); an all-zero group gets scale 0 and zeros."""
    groups = tensor.reshape(-1, group_size)
    scale = groups.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    values = torch.round(groups / safe[:, None]).clamp(-127, 127).to(torch.int8)
    return values.numpy().reshape(-1), scale.numpy().astype("<f4")


def _write_v2(out, model, layers, group_size: int) -> None:
    config = model.config
    shared = bool(config.tie_word_embeddings)
    header = struct.pack("<Ii", MAGIC, 2) + struct.pack("<7i", *_header_ints(config, True))
    header += struct.pack("<Bi", int(shared), group_size)
    out.write(header + b"\0" * (256 - len(header)))
    for name in ("attention_norm", "ffn_norm", "norm"):
        for tensor in layers[name]:
            _write_f32(out, tensor)
    quantized = ["tok_embeddings", "wq", "wk", "wv", "wo", "w1", "w2", "w3"] + ([] if shared else ["output"])
    for name in quantized:
        for tensor in layers[name]:
            values, scales = quantize_q80(tensor, group_size)
            out.write(values.tobytes())
            out.write(scales.tobytes())


def export_llama2c(
    model_dir: str | Path,
    output: str | Path,
    version: int = 0,
    tokenizer_output: str | Path | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write the model file (`version` 0 for run.c, 2 for runq.c) and tokenizer.bin (default: beside it)."""
    if version not in LLAMA2C_VERSIONS:
        raise UsageError(f"llama2.c version {version} is not written here; choose 0 (run.c) or 2 (runq.c)")
    model_dir = Path(model_dir)
    model, tokenizer = load_source(model_dir)
    vocab = read_vocab(tokenizer, model_dir)
    check_llama2c_model(model.config, tokenizer, vocab, model_dir)
    group_size = group_size_for(model.config) if version == 2 else 0
    strings, scores = llama2c_token_strings(vocab, tokenizer, model.config.vocab_size)
    layers = _layers(model)
    output = Path(output)
    tokenizer_output = Path(tokenizer_output) if tokenizer_output else output.parent / "tokenizer.bin"
    tokenizer_bytes = tokenizer_bin_bytes(strings, scores)
    # both versions of one model share a tokenizer.bin: an identical one already there is kept, not refused
    same_tokenizer = tokenizer_output.is_file() and tokenizer_output.read_bytes() == tokenizer_bytes
    refuse_existing(output, overwrite)
    if not same_tokenizer:
        refuse_existing(tokenizer_output, overwrite)
    with atomic_path(output, overwrite) as temp:
        with temp.open("wb") as out:
            if version == 0:
                _write_v0(out, model, layers)
            else:
                _write_v2(out, model, layers, group_size)
        if not same_tokenizer:
            with atomic_path(tokenizer_output, overwrite=True) as temp_tokenizer:
                temp_tokenizer.write_bytes(tokenizer_bytes)
    return output, tokenizer_output
