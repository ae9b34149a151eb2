"""The tiny-llama2-zh model: karpathy/llama2.c's Llama 2, written as a Hugging Face transformers model.

Read top to bottom: config -> RMSNorm -> rotary embeddings -> attention (GQA) -> SwiGLU MLP -> decoder
layer -> backbone -> causal-LM head -> sequence-classification head.

Architecture (Touvron et al. 2023, "Llama 2"; layout after karpathy/llama2.c `model.py`):
RMSNorm pre-norm, rotary position embeddings, grouped-query attention, SwiGLU feed-forward with llama2.c's
hidden-size rule, no biases, input and output embeddings tied.

Attention masks (padding, KV cache, packed sequences) come from transformers' `create_causal_mask`, and attention
runs through transformers' attention functions ("sdpa" by default, or "eager"), as in transformers' Llama.

Parameter names follow transformers' Llama (`model.layers.N.self_attn.q_proj`, `mlp.gate_proj`, ...), so PEFT
and TRL target them by name and the weights load into `transformers.LlamaForCausalLM` unchanged. The rotary
embedding uses the "rotate half" pairing of transformers' Llama; llama2.c pairs neighbouring dimensions
instead, which is the same model up to a fixed permutation of the q/k output rows (llama2.c's `export.py`).

This file must import nothing from the `tiny_llama2_zh` package: `save_pretrained` copies it next to the
weights so that `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works without us.
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.configuration_utils import PreTrainedConfig
from transformers.generation import GenerationConfig, GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils.generic import can_return_tuple

# Keys that PreTrainedConfig itself consumes from **kwargs (see its __post_init__) or that transformers writes
# into config.json. Anything else passed to TinyLlama2Config is a typo and is rejected.
_BASE_CONFIG_KWARGS = frozenset(
    {
        "auto_map",
        "model_type",
        "torch_dtype",
        "num_labels",
        "quantization_config",  # transformers' quantizers (torchao) store their recipe here
        "name_or_path",
        "_commit_hash",
        "output_attentions",
        "attn_implementation",
        "experts_implementation",
        "_attn_implementation_internal",
        "_experts_implementation_internal",
    }
)


def llama2c_hidden_dim(dim: int, multiple_of: int) -> int:
    """SwiGLU hidden size as llama2.c computes it: 2/3 of 4*dim, rounded up to a multiple of `multiple_of`."""
    hidden_dim = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


@strict
class TinyLlama2Config(PreTrainedConfig):
    """Configuration of a tiny-llama2-zh model.

    Field names are transformers' Llama names; llama2.c's names are readable aliases (`config.dim` is
    `config.hidden_size`, `n_layers`, `n_heads`, `n_kv_heads`, `max_seq_len`, `norm_eps`).
    `intermediate_size=None` derives the SwiGLU width from `hidden_size` and `multiple_of` as llama2.c does.
    """

    model_type = "tiny_llama2"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "dim": "hidden_size",
        "n_layers": "num_hidden_layers",
        "n_heads": "num_attention_heads",
        "n_kv_heads": "num_key_value_heads",
        "max_seq_len": "max_position_embeddings",
        "norm_eps": "rms_norm_eps",
    }

    vocab_size: int = 32000
    hidden_size: int = 288
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    num_key_value_heads: int | None = None
    multiple_of: int = 32
    intermediate_size: int | None = None
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    dropout: float = 0.0
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        unknown = sorted(set(kwargs) - _BASE_CONFIG_KWARGS - set(GenerationConfig._get_default_generation_params()))
        if unknown:
            fields = sorted(TinyLlama2Config.__annotations__)
            raise TypeError(f"TinyLlama2Config got unknown argument(s) {unknown}; valid fields are {fields}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = llama2c_hidden_dim(self.hidden_size, self.multiple_of)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Called by `@strict` validation."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_key_value_heads} (grouped-query attention shares each kv head)"
            )
        if (self.hidden_size // self.num_attention_heads) % 2 != 0:
            raise ValueError("the head dimension must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class TinyLlama2RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019), computed in float32 as llama2.c does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


class TinyLlama2RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021, RoFormer): cos/sin tables for the given positions.

    The sin table comes with the sign of transformers' `rotate_half` folded in, (-sin, sin) over the two halves,
    so that `apply_rotary` swaps the halves without negating one: one elementwise op less per q/k, per layer, in
    the forward and the backward pass, for the same numbers.
    """

    def __init__(self, config: TinyLlama2Config):
        super().__init__()
        head_dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)  # (head_dim/2,)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # (B, T, head_dim/2)
        cos = freqs.cos()
        sin = freqs.sin()
        return torch.cat((cos, cos), dim=-1).to(x.dtype), torch.cat((-sin, sin), dim=-1).to(x.dtype)


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, head_dim); cos, signed_sin: (B, T, head_dim) from TinyLlama2RotaryEmbedding.
    transformers' Llama: x * cos + rotate_half(x) * sin, with rotate_half(x) = (-second, first)."""
    return x * cos[:, None] + swap_halves(x) * signed_sin[:, None]


def plain_linears(*modules: nn.Module) -> bool:
    """True when every module is an nn.Linear that nothing wraps or intercepts, so that its weight may join one
    concatenated matmul. PEFT adapters (LoRA) and parametrized layers replace the module with another class,
    torchao's quantisation keeps the nn.Linear but makes its weight a tensor subclass, and hooks (DeepSpeed ZeRO-3
    gathering, accelerate offloading) must see the call: those run one by one."""
    return all(
        type(module) is nn.Linear
        and type(module.weight) is nn.Parameter  # torchao swaps in a quantised tensor subclass
        and not (module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"))
        for module in modules
    )


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,  # (B, H, T, hd)
    key: torch.Tensor,  # (B, KV, T_kv, hd)
    value: torch.Tensor,  # (B, KV, T_kv, hd)
    attention_mask: torch.Tensor | None,  # (B, 1, T, T_kv)
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scaling + mask) v written out, for `attn_implementation="eager"`; returns (B, T, H, hd) and
    the attention weights. The mask is create_causal_mask's eager one: additive floats, 0 or the dtype's minimum.
    Same contract as transformers' Llama `eager_attention_forward`; the default implementation is "sdpa"."""
    key = key.repeat_interleave(module.num_key_value_groups, dim=1)
    value = value.repeat_interleave(module.num_key_value_groups, dim=1)
    scores = (query @ key.transpose(-2, -1)) * scaling  # (B, H, T, T_kv)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights


class TinyLlama2Attention(nn.Module):
    """Causal self-attention with grouped-query attention (Ainslie et al. 2023): n_kv_heads <= n_heads."""

    def __init__(self, config: TinyLlama2Config, layer_idx: int):
        super().__init__()
        # config, layer_idx, num_key_value_groups, scaling and is_causal are what transformers' attention functions
        # (ALL_ATTENTION_FUNCTIONS: sdpa, eager, ...) read from the module they are given.
        self.config = config
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.n_heads // self.n_kv_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, dim)
        rotary: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | None,  # (B, 1, T, T_kv) from create_causal_mask; None = plain causal (is_causal)
        past_key_values: Cache | None,
    ) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        heads = (self.n_heads, self.n_kv_heads, self.n_kv_heads)
        if plain_linears(self.q_proj, self.k_proj, self.v_proj):
            # One matmul for q, k and v instead of three (fewer, larger GEMMs and kernel launches; the same sums),
            # and one rotary pass over q and k together.
            weight = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))  # ((H+2KV)*hd, dim)
            qkv = F.linear(x, weight).view(batch, seq_len, sum(heads), self.head_dim).transpose(1, 2)
            qk, v = qkv.split((self.n_heads + self.n_kv_heads, self.n_kv_heads), dim=1)
        else:
            q, k, v = (
                proj(x).view(batch, seq_len, n, self.head_dim)
                for proj, n in zip((self.q_proj, self.k_proj, self.v_proj), heads, strict=True)
            )
            qk, v = torch.cat((q, k), dim=2).transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(qk, *rotary).split(heads[:2], dim=1)  # (B, H, T, hd), (B, KV, T, hd)
        if past_key_values is not None:
            # transformers 5.x caches track their own positions: Llama passes no cache_position/cache_kwargs either.
            k, v = past_key_values.update(k, v, self.layer_idx)  # (B, KV, T_kv, hd)
        # Dispatch as transformers' LlamaAttention does; "sdpa" (the default) is transformers' sdpa_attention_forward,
        # which sets SDPA's is_causal (its fused kernels) when the mask is None and uses enable_gqa when it can.
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, _ = attention(
            self, q, k, v, attn_mask, dropout=self.dropout if self.training else 0.0, scaling=self.scaling
        )  # (B, T, H, hd)
        out = out.reshape(batch, seq_len, self.n_heads * self.head_dim)
        return self.resid_dropout(self.o_proj(out))


class TinyLlama2MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x)). llama2.c calls these w1, w3, w2."""

    def __init__(self, config: TinyLlama2Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if plain_linears(self.gate_proj, self.up_proj):  # one matmul for both, as q/k/v in TinyLlama2Attention
            weight = torch.cat((self.gate_proj.weight, self.up_proj.weight))  # (2 * hidden, dim)
            gate, up = F.linear(x, weight).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.dropout(self.down_proj(F.silu(gate) * up))


class TinyLlama2DecoderLayer(GradientCheckpointingLayer):
    """x + attention(norm(x)), then x + mlp(norm(x)). GradientCheckpointingLayer adds activation checkpointing."""

    def __init__(self, config: TinyLlama2Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = TinyLlama2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = TinyLlama2Attention(config, layer_idx)
        self.post_attention_layernorm = TinyLlama2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = TinyLlama2MLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), rotary, attn_mask, past_key_values
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class TinyLlama2PreTrainedModel(PreTrainedModel):
    config_class = TinyLlama2Config
    config: TinyLlama2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TinyLlama2DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    def compile_layers(self, **compile_kwargs) -> "TinyLlama2PreTrainedModel":
        """torch.compile every decoder layer in place and return the model: call it before training.

        Regional compilation (PyTorch's recipe for repeated blocks): the layers share one compiled graph, so it
        compiles faster than the whole model, and create_causal_mask, the KV cache and the fused loss's chunk loop
        stay eager. Inductor fuses RMSNorm, rotary, SwiGLU and the residual adds, which on a CPU also saves the
        thread synchronisation of many small ops. Parameter names do not change (unlike `torch.compile(model)`,
        which wraps them in `_orig_mod.`), so checkpoints and `save_pretrained` are unaffected. Forwards without
        grad mode (evaluation, generation) run the layers eagerly (`TinyLlama2Model._layer_compile_stance`).
        compile_kwargs go to `nn.Module.compile` (e.g. mode="max-autotune-no-cudagraphs", dynamic=False).
        `train.torch_compile: true` calls this (train/runner.py, `compile_decoder_layers`)."""
        for layer in self.base_model.layers:
            layer.compile(**compile_kwargs)
        return self

    def _init_weights(self, module: nn.Module) -> None:
        """llama2.c's init: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 * n_layers)
        (GPT-2, Radford et al. 2019). llama2.c scales `w3`; we scale the projections that write into the residual
        stream, `o_proj` and `down_proj` (`wo`, `w2`), as GPT-2 does."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, TinyLlama2RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, TinyLlama2RotaryEmbedding):
            head_dim = self.config.head_dim
            exponent = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
            init.copy_(module.inv_freq, 1.0 / (self.config.rope_theta**exponent))
        if isinstance(module, (TinyLlama2Attention, TinyLlama2MLP)):
            out_proj = module.o_proj if isinstance(module, TinyLlama2Attention) else module.down_proj
            init.normal_(out_proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))


class TinyLlama2Model(TinyLlama2PreTrainedModel):
    """The backbone: token embedding, n_layers decoder layers, final RMSNorm."""

    def __init__(self, config: TinyLlama2Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(TinyLlama2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = TinyLlama2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = TinyLlama2RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @staticmethod
    def _layer_compile_stance() -> contextlib.AbstractContextManager:
        """Layers compiled by `compile_layers()` serve training: a forward without grad mode (evaluation, sampling,
        generation) runs them eagerly. Generation would otherwise recompile at every new KV-cache layout (cache
        layers initialised one by one, growing key strides) until dynamo's recompile limit (8) turned compilation
        off for the layers altogether, training included; measured at the end of a compiled SFT run (torch 2.13).
        Inside a whole-model torch.compile the stance cannot change (and need not)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return contextlib.nullcontext()
        return torch.compiler.set_stance("force_eager")

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T_past + T)
        position_ids: torch.LongTensor | None = None,  # (B, T)
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,  # (B, T, dim)
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # a cache would keep every layer's activations alive
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if not use_cache:
            past_key_values = None
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        query_len = inputs_embeds.shape[1]

        given_position_ids = position_ids
        if position_ids is None:
            if attention_mask is not None:
                # Left padding: count positions from each row's first real token, as generate() does.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -query_len:]
            else:
                position_ids = torch.arange(past_len, past_len + query_len, device=inputs_embeds.device)[None]
        # transformers' mask builder, as in LlamaModel: causal + padding + packed sequences, on inputs_embeds' device,
        # in the format of config._attn_implementation, and None when SDPA's is_causal alone is exact (no padding,
        # query and keys aligned, or one query) so that the fused kernels run. It recognises packed rows (TRL's
        # padding_free: several examples in one row, position_ids restarting at 0, no attention_mask) and makes their
        # attention block-diagonal, but only without a cache. An empty DynamicCache says nothing that no cache would
        # not (offset 0, keys = queries), so it is left out; a fixed-size cache (StaticCache) is kept for its length.
        # Positions we made up ourselves cannot be packed, so they are not passed: that skips the packing check (a
        # device sync, and .item(), which the meta device cannot do).
        empty_dynamic = isinstance(past_key_values, DynamicCache) and past_len == 0
        attn_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=None if empty_dynamic else past_key_values,
            position_ids=given_position_ids,
        )

        hidden_states = self.dropout(inputs_embeds)  # (B, T, dim)
        rotary = self.rotary_emb(hidden_states, position_ids)
        all_hidden_states: list[torch.Tensor] = []
        with self._layer_compile_stance():
            for layer in self.layers:
                if output_hidden_states:
                    all_hidden_states.append(hidden_states)
                hidden_states = layer(hidden_states, rotary, attn_mask, past_key_values)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
        )


class LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, labels) / normalizer), computed in row chunks. `normalizer` is a scalar
    (the mean over labelled rows: their count) or one divisor per row (per-token weights: `TinyLlama2ForCausalLM`'s
    `loss_weights`).

    The plain path materialises the (tokens, vocab) logits, their log-softmax and that log-softmax's gradient: three
    tensors of tokens x vocab floats (4 GB for a 64,798-token vocabulary at 16 x 1024 tokens), and on a CPU a
    quarter of the step time. Here each chunk's log-probabilities become their own gradient in place
    (softmax - one_hot) and are discarded, so gradients for `hidden` and `weight` are computed during the forward
    pass and only they are kept. The idea is Liger-Kernel's fused linear cross entropy (Hsu et al. 2024); Liger
    ships it as Triton kernels for GPUs only, so this is the same algorithm in plain PyTorch, for every device.
    Rows labelled -100 are ignored; autocast (bf16/fp16) applies to the matmuls, the softmax runs in float32.

    Per chunk the (n, V) tensors are touched as few times as eager PyTorch allows: the logits matmul writes into a
    reused buffer, one log_softmax kernel writes a second reused buffer, exp_ turns it into probabilities, and the
    per-row factor valid/normalizer is applied to the small (n, d) operands of the two gradient matmuls instead of
    to the (n, V) probabilities. Reusing the buffers matters on a CPU: a fresh tensor of hundreds of MB is a fresh
    mmap whose pages fault in again on every chunk. In float32 the weight gradient accumulates inside the matmul
    (addmm_), without a (V, d) temporary per chunk.

    Each gradient is built only for an input that needs it: LoRA fine-tuning freezes the head (and the tied
    embedding), and its (V, d) float32 weight gradient would be as large as the head itself, for nothing; a frozen
    body under a trainable head needs no (N, d) hidden-state gradient. `compute_grad` must be False under
    torch.no_grad()/inference_mode() (evaluation): `ctx.needs_input_grad` follows requires_grad, not grad mode,
    and inside `forward` grad mode is always off, so only the caller can tell.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, normalizer, chunk_rows: int, compute_grad: bool = True):
        # hidden: (N, d), weight: (V, d), labels: (N,), normalizer: scalar or (N,) tensor
        device_type = hidden.device.type
        compute_dtype = (
            torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        )
        needs_hidden_grad = compute_grad and ctx.needs_input_grad[0]
        needs_weight_grad = compute_grad and ctx.needs_input_grad[1]
        needs_grad = needs_hidden_grad or needs_weight_grad
        n_rows, vocab_size = hidden.shape[0], weight.shape[0]
        buffer_rows = min(chunk_rows, n_rows)
        with torch.autocast(device_type, enabled=False):
            weight_c = weight.to(compute_dtype)
            grad_hidden = torch.empty_like(hidden) if needs_hidden_grad else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_weight_grad else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            logits_buffer = hidden.new_empty((buffer_rows, vocab_size), dtype=compute_dtype)
            log_probs_buffer = hidden.new_empty((buffer_rows, vocab_size), dtype=torch.float32)
            for start in range(0, n_rows, chunk_rows):
                rows = hidden[start : start + chunk_rows].to(compute_dtype)  # (n, d)
                n = rows.shape[0]
                targets = labels[start : start + chunk_rows]  # (n,)
                divisor = normalizer if normalizer.dim() == 0 else normalizer[start : start + n]
                row_scale = ((targets != -100) / divisor)[:, None]  # (n, 1): 0 for ignored rows
                safe_targets = targets.clamp(min=0)[:, None]  # (n, 1)
                logits = torch.mm(rows, weight_c.T, out=logits_buffer[:n])  # (n, V)
                log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32, out=log_probs_buffer[:n])
                total -= (log_probs.gather(1, safe_targets) * row_scale).sum()
                if needs_grad:
                    # d(loss)/d(logits) = (softmax - one_hot(target)) * row_scale
                    probs = log_probs.exp_()
                    probs.scatter_add_(1, safe_targets, torch.full_like(safe_targets, -1, dtype=probs.dtype))
                    grad_logits = probs.to(compute_dtype)  # (n, V) unscaled; a no-op in float32
                    if grad_hidden is not None:
                        grad_hidden[start : start + n] = (grad_logits @ weight_c) * row_scale
                    if grad_weight is not None:
                        scaled_rows = (rows * row_scale).to(compute_dtype)  # (n, d)
                        if grad_logits.dtype == torch.float32:
                            grad_weight.addmm_(grad_logits.T, scaled_rows)
                        else:  # addmm_ cannot mix a float32 accumulator with bf16/fp16 operands
                            grad_weight += (grad_logits.T @ scaled_rows).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


class TinyLlama2ForCausalLM(TinyLlama2PreTrainedModel, GenerationMixin):
    """Backbone + language-model head (tied to the input embedding by default).

    Set `fused_loss_chunk_rows` (e.g. 256) to compute the training loss with `LinearCrossEntropy`: the same
    loss without the full logits tensor. Forward then returns `logits=None` whenever labels are given, so leave it
    unset for trainers that read logits alongside the loss (TRL's SFT token accuracy does). On a 2-core CPU at
    the 24m shape (vocab 64,798), chunks of 128 to 512 rows measured alike and 5-9% faster per training step than
    1024. `compile_layers()` adds torch.compile to training.
    """

    fused_loss_chunk_rows: int | None = None

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TinyLlama2Config):
        super().__init__(config)
        self.model = TinyLlama2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,  # (B, T); shifted inside, -100 is ignored
        # (B, T) beside labels: the loss becomes sum(weight * token loss), normalised by the caller (SFT's
        # per-conversation mean: 1 / (reply tokens x conversations)); None: the mean over labelled tokens
        loss_weights: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,  # >0: only the last n positions get logits (generation needs one)
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        if labels is not None and self.fused_loss_chunk_rows and not logits_to_keep:
            return CausalLMOutputWithPast(
                loss=self._fused_loss(hidden_states, labels, kwargs.get("num_items_in_batch"), loss_weights),
                past_key_values=outputs.past_key_values,
                hidden_states=outputs.hidden_states,
            )
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)  # (B, T, vocab)
        loss = None
        if labels is not None and loss_weights is not None:
            token_losses = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="none"
            )  # (B*(T-1),)
            loss = (token_losses * loss_weights[:, 1:].flatten()).sum()
        elif labels is not None:
            # transformers' shared causal-LM loss: shifts labels, ignores -100, and honours num_items_in_batch
            # so that gradient accumulation averages over tokens, not micro-batches.
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
        )

    def _fused_loss(
        self, hidden_states: torch.Tensor, labels: torch.Tensor, num_items_in_batch, loss_weights: torch.Tensor | None
    ) -> torch.Tensor:
        """The loss transformers' ForCausalLMLoss computes (shifted labels, -100 ignored, sum over
        num_items_in_batch when the Trainer passes it, else the mean), or with loss_weights sum(weight * token
        loss), through LinearCrossEntropy."""
        hidden = hidden_states[:, :-1].reshape(-1, hidden_states.shape[-1])  # (B*(T-1), dim)
        targets = labels[:, 1:].reshape(-1).to(hidden.device)  # (B*(T-1),)
        if loss_weights is not None:
            weights = loss_weights[:, 1:].reshape(-1).to(hidden.device, torch.float32)  # (B*(T-1),)
            targets = targets.masked_fill(weights == 0, -100)
            normalizer = 1 / weights.masked_fill(weights == 0, 1)  # a divisor per row
        elif num_items_in_batch is None:
            normalizer = (targets != -100).sum().clamp(min=1).float()
        else:
            normalizer = torch.as_tensor(num_items_in_batch, device=hidden.device, dtype=torch.float32)
        # Grad mode is read here, not in LinearCrossEntropy.forward, where autograd has always switched it off.
        compute_grad = torch.is_grad_enabled()
        return LinearCrossEntropy.apply(
            hidden, self.lm_head.weight, targets, normalizer, self.fused_loss_chunk_rows, compute_grad
        )


class TinyLlama2ForSequenceClassification(TinyLlama2PreTrainedModel):
    """Backbone + linear `score` head read at the last real token: the reward and value model of RLHF."""

    def __init__(self, config: TinyLlama2Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = TinyLlama2Model(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        logits = self.score(outputs.last_hidden_state)  # (B, T, num_labels)
        batch, seq_len = logits.shape[:2]
        positions = torch.arange(seq_len, device=logits.device)
        if attention_mask is not None:
            # Rightmost real token: works for left and right padding, even when pad == eos.
            last_token = (positions * attention_mask.to(logits.device).bool()).argmax(-1)
        elif input_ids is not None and self.config.pad_token_id is not None:
            last_token = (positions * (input_ids != self.config.pad_token_id).to(logits.device)).argmax(-1)
        else:
            last_token = torch.full((batch,), seq_len - 1, device=logits.device)
        pooled_logits = logits[torch.arange(batch, device=logits.device), last_token]  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled_logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
        )


# Importing this file registers the model with transformers' Auto classes, so that
# `AutoModelForCausalLM.from_pretrained(folder)` works in this process without `trust_remote_code`.
AutoConfig.register(TinyLlama2Config.model_type, TinyLlama2Config, exist_ok=True)
AutoModel.register(TinyLlama2Config, TinyLlama2Model, exist_ok=True)
AutoModelForCausalLM.register(TinyLlama2Config, TinyLlama2ForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(TinyLlama2Config, TinyLlama2ForSequenceClassification, exist_ok=True)
# save_pretrained() copies this file beside the weights and writes `auto_map` into config.json, so a folder also
# loads in a process that has never imported this package (trust_remote_code=True).
TinyLlama2Config.register_for_auto_class()
TinyLlama2Model.register_for_auto_class("AutoModel")
TinyLlama2ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
TinyLlama2ForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "TinyLlama2Config",
    "TinyLlama2ForCausalLM",
    "TinyLlama2ForSequenceClassification",
    "TinyLlama2Model",
    "TinyLlama2PreTrainedModel",
]
