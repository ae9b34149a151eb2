"""Model size presets: the seed project's table, in llama2.c's terms.

The labels are the seed's; the real parameter count depends on the vocabulary (the embedding is vocab x dim
and is shared with the output head). `tinyllm sizes --tokenizer DIR` prints the true counts.
"""

from dataclasses import dataclass

from huggingface_hub.errors import StrictDataclassError

from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.model import TinyLlama2Config


@dataclass(frozen=True)
class SizePreset:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    max_seq_len: int
    multiple_of: int = 32


PRESETS: dict[str, SizePreset] = {
    "9m": SizePreset(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, max_seq_len=512),
    "24m": SizePreset(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, max_seq_len=512),
    "58m": SizePreset(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, max_seq_len=512),
    "134m": SizePreset(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, max_seq_len=512),
    "256m": SizePreset(dim=1024, n_layers=16, n_heads=16, n_kv_heads=16, max_seq_len=1024),
}


def preset_config(name: str, vocab_size: int, **overrides) -> TinyLlama2Config:
    """A TinyLlama2Config for a preset; keyword overrides use the config's (transformers') field names."""
    if name not in PRESETS:
        raise UsageError(f"unknown size preset {name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    fields = {
        "vocab_size": vocab_size,
        "hidden_size": preset.dim,
        "num_hidden_layers": preset.n_layers,
        "num_attention_heads": preset.n_heads,
        "num_key_value_heads": preset.n_kv_heads,
        "max_position_embeddings": preset.max_seq_len,
        "multiple_of": preset.multiple_of,
    }
    fields_given = {key: value for key, value in overrides.items() if value is not None}
    fields.update(fields_given)
    try:
        return TinyLlama2Config(**fields)
    except StrictDataclassError as error:  # the config's own checks (heads divide the width, ...)
        raise UsageError(f"model options {name} + {fields_given}: {str(error).splitlines()[-1].strip()}") from error


def count_parameters(config: TinyLlama2Config) -> dict[str, int]:
    """Exact parameter counts computed from the shapes (no model is built), tied embedding counted once."""
    dim, hidden, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv_dim = config.num_key_value_heads * config.head_dim
    attention = dim * dim * 2 + dim * kv_dim * 2  # q, o + k, v
    mlp = 3 * dim * hidden
    norms = 2 * dim
    embedding = config.vocab_size * dim
    body = layers * (attention + mlp + norms) + dim  # + final norm
    head = 0 if config.tie_word_embeddings else embedding
    return {"embedding": embedding, "non_embedding": body, "total": embedding + body + head}


def flops_per_token(config: TinyLlama2Config, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the forward and backward pass through every weight (the tied output
    head included) plus 12·L·d·T for attention scores and values (Chowdhery et al. 2022, PaLM, appendix B;
    nanoGPT's `estimate_mfu`)."""
    total = count_parameters(config)["total"]
    return 6 * total + 12 * config.num_hidden_layers * config.hidden_size * seq_len
