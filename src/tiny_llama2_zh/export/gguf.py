"""Export to GGUF, the file llama.cpp (and Ollama, LM Studio, node-llama-cpp, ...) runs.

Written with the `gguf` package's `GGUFWriter` (ggml-org/llama.cpp's gguf-py), laid out as llama.cpp's own
converter (`convert_hf_to_gguf.py`, LlamaModel) lays out a Llama: architecture "llama", tensor names
`token_embd`, `blk.N.attn_q`, ..., `output_norm`, no `output` tensor when the head is tied to the embedding
(llama.cpp then reuses `token_embd`), q and k rows permuted to llama.cpp's neighbouring-pair rotary (k with the
kv head count: grouped-query attention), 1-D norm weights kept in float32 whatever the file type.

The tokenizer travels inside:
- ChatGLM3's SentencePiece (converted by `convert_chatglm3`) as `tokenizer.ggml.model = "llama"`: pieces, the
  .model's scores and piece types (byte pieces BYTE, <unk> UNKNOWN, <s> </s> and the 9 ChatGLM3 specials
  CONTROL), with the .model's dummy prefix as `add_space_prefix`;
- our byte-level BPE as `"gpt2"` with its merges and `tokenizer.ggml.pre` naming the split llama.cpp must apply
  before the merges: "qwen2" for Qwen2's pre-tokenizer (one digit per token; what `tinyllm tokenizer train`
  writes), "gpt-2" for the GPT-2 regex of our older tokenizers (export/common.py tells them apart; llama.cpp does
  not NFC-normalize; our NFC step changes only text that is not already NFC).
The chat template goes in as `tokenizer.chat_template`, without transformers' `{% generation %}` markers.
"""

from pathlib import Path

import numpy as np

from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.export.common import (
    BYTE_PIECE,
    VocabInfo,
    atomic_path,
    interleave_rotary_rows,
    load_source,
    strip_generation_tags,
    vocab_info,
)

GGUF_TYPES = ("f32", "f16", "q8_0")
Q8_0_BLOCK = 32


def export_gguf(model_dir: str | Path, output: str | Path, out_type: str = "f16", overwrite: bool = False) -> Path:
    import gguf

    if out_type not in GGUF_TYPES:
        raise UsageError(f"unknown GGUF type {out_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    model_dir = Path(model_dir)
    model, tokenizer = load_source(model_dir)
    config = model.config
    vocab = vocab_info(tokenizer, model_dir)
    if out_type == "q8_0":
        widths = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size}
        bad = {name: width for name, width in widths.items() if width % Q8_0_BLOCK}
        if bad:
            raise UsageError(f"q8_0 quantizes rows in blocks of {Q8_0_BLOCK}; {bad} is not a multiple of it")
    tensors = _llama_tensors(model)
    chat_template = tokenizer.chat_template
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[out_type]

    with atomic_path(output, overwrite) as temp:
        writer = gguf.GGUFWriter(temp, arch="llama")
        writer.add_name(model_dir.resolve().name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(float(config.rope_theta))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(file_type)
        _add_tokenizer(writer, vocab, tokenizer, config.vocab_size)
        if chat_template:
            writer.add_chat_template(strip_generation_tags(chat_template))
        for name, tensor in tensors.items():
            data = tensor.detach().float().numpy()
            if data.ndim == 1 or out_type == "f32":
                writer.add_tensor(name, data.astype(np.float32))
            elif out_type == "f16":
                writer.add_tensor(name, data.astype(np.float16))
            else:
                quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
                writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(output)


def _llama_tensors(model) -> dict:
    """Our (= transformers Llama) parameters under llama.cpp's names, q/k rows permuted for its rotary."""
    config = model.config
    state = model.state_dict()
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"]}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        block = f"blk.{layer}."
        tensors[block + "attn_norm.weight"] = state[prefix + "input_layernorm.weight"]
        tensors[block + "attn_q.weight"] = interleave_rotary_rows(
            state[prefix + "self_attn.q_proj.weight"], config.num_attention_heads
        )
        tensors[block + "attn_k.weight"] = interleave_rotary_rows(
            state[prefix + "self_attn.k_proj.weight"], config.num_key_value_heads
        )
        tensors[block + "attn_v.weight"] = state[prefix + "self_attn.v_proj.weight"]
        tensors[block + "attn_output.weight"] = state[prefix + "self_attn.o_proj.weight"]
        tensors[block + "ffn_norm.weight"] = state[prefix + "post_attention_layernorm.weight"]
        tensors[block + "ffn_gate.weight"] = state[prefix + "mlp.gate_proj.weight"]
        tensors[block + "ffn_up.weight"] = state[prefix + "mlp.up_proj.weight"]
        tensors[block + "ffn_down.weight"] = state[prefix + "mlp.down_proj.weight"]
    tensors["output_norm.weight"] = state["model.norm.weight"]
    if not config.tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    return tensors


def _add_tokenizer(writer, vocab: VocabInfo, tokenizer, vocab_size: int) -> None:
    import gguf

    token_type = gguf.TokenType
    pieces = list(vocab.pieces)
    padding = vocab_size - len(pieces)  # embedding rows past the tokenizer: never produced by it
    if vocab.kind == "sentencepiece":
        types = []
        for index, piece in enumerate(pieces):
            kind = vocab.piece_types[index]
            if index in vocab.special_ids or kind == 3:
                types.append(token_type.UNKNOWN if index == tokenizer.unk_token_id else token_type.CONTROL)
            elif kind == 6 or BYTE_PIECE.fullmatch(piece):
                types.append(token_type.BYTE)
            elif kind == 2:
                types.append(token_type.UNKNOWN)
            else:
                types.append(token_type.NORMAL)
        scores = list(vocab.scores)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre(vocab.llamacpp_pre)
        writer.add_token_list([*pieces, *(f"[PAD{i}]" for i in range(padding))])
        writer.add_token_scores([*scores, *([-1000.0] * padding)])
        writer.add_token_types([*types, *([token_type.UNUSED] * padding)])
        writer.add_add_space_prefix(vocab.add_dummy_prefix)
    else:
        types = [token_type.CONTROL if i in vocab.special_ids else token_type.NORMAL for i in range(len(pieces))]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab.llamacpp_pre)
        writer.add_token_list([*pieces, *(f"[PAD{i}]" for i in range(padding))])
        writer.add_token_types([*types, *([token_type.UNUSED] * padding)])
        writer.add_token_merges(vocab.merges)
    for add, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    # our tokenizers start every text with <s> (tokenizer.py's post-processor); the GGUF says so to llama.cpp
    starts_with_bos = tokenizer("字")["input_ids"][:1] == [tokenizer.bos_token_id]
    writer.add_add_bos_token(starts_with_bos)
    writer.add_add_eos_token(False)
