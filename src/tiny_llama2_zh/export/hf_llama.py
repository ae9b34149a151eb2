"""Export to other runtimes. Our parameter names are transformers' Llama names, so the weights load into
`LlamaForCausalLM` with a strict state-dict load and no renaming; the rotary pairing is the same too."""

import json
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.model import TinyLlama2Config, TinyLlama2ForCausalLM


def to_hf_llama_config(config: TinyLlama2Config) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )


def to_hf_llama(model: TinyLlama2ForCausalLM) -> LlamaForCausalLM:
    """A `transformers.LlamaForCausalLM` holding the same weights (strict load: every tensor must match)."""
    llama = LlamaForCausalLM(to_hf_llama_config(model.config)).to(model.dtype)
    llama.load_state_dict(model.state_dict(), strict=True)
    return llama.eval() if not model.training else llama


def export_hf_llama(model_dir: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Write a plain `LlamaForCausalLM` folder (config, safetensors, generation config, tokenizer, chat template)
    that transformers, vLLM and other Llama loaders read with no remote code."""
    from tiny_llama2_zh.export.common import atomic_path, load_source

    model, tokenizer = load_source(model_dir)
    llama = to_hf_llama(model).eval()
    llama.generation_config = model.generation_config
    with atomic_path(output, overwrite, directory=True) as temp:
        llama.save_pretrained(str(temp))
        tokenizer.save_pretrained(str(temp))
        leftovers = [p.name for p in temp.iterdir() if p.suffix == ".py"]
        config = json.loads((temp / "config.json").read_text(encoding="utf-8"))
        if leftovers or "auto_map" in config or config.get("model_type") != "llama":
            raise UsageError(f"the Llama folder would need remote code ({leftovers}, {config.get('auto_map')})")
    return Path(output)
