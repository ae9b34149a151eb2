"""A lean decode loop for serving: a static KV cache and a plain forward over the model's own weights.

`model.generate` spends much of a decode step on bookkeeping rather than arithmetic (logits processors, stopping
criteria, the dynamic cache's concatenations, mask building, output dataclasses): for the demo model (dim 128,
vocabulary 4,096) nearly all of it. This module runs the same maths with nothing else: per layer one matmul for
q/k/v, rotary from a precomputed table, the new key/value written into a preallocated cache (vLLM's and
llama.cpp's static cache, without paging), attention over the cached prefix, one matmul for SwiGLU's gate and up;
then the tied head on the last position only. What it cannot remove is memory traffic: with ChatGLM3's 64,798-token
vocabulary the float32 head is 75 MB, read once per step, which bounds a batch-1 step at the 24m shape; a batch
of running requests shares that read (benchmarks/decode_speed.py).

The decoder holds `max_batch` cache rows. Rows 0..n-1 are the running batch; each row has its own length, so
sequences with different prompt lengths decode together (per-row positions, masked attention), a new sequence
joins between two steps by `prefill` into a free row, and a finished one leaves by `release`, which moves the
last row into its place so the running rows stay a prefix (their cache slices are views, never gathered).

The arithmetic is model.py's, read from the model's modules (RMSNorm in float32, "rotate half" rotary with the
sign folded into the sin table, grouped-query attention, SwiGLU, tied lm_head): greedy decoding gives the same
tokens as `model.generate` (tests/test_decode.py). The weights are read when the decoder is built (q/k/v and
gate/up concatenated once); a model changed afterwards needs a new decoder.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from tiny_llama2_zh.errors import UsageError


@dataclass(frozen=True)
class LayerWeights:
    input_norm: torch.Tensor  # (dim,)
    qkv: torch.Tensor  # ((H + 2 KV) * hd, dim)
    o: torch.Tensor  # (dim, H * hd)
    post_norm: torch.Tensor  # (dim,)
    gate_up: torch.Tensor  # (2 * hidden, dim)
    down: torch.Tensor  # (dim, hidden)


def _plain_weight(module: nn.Module, name: str) -> torch.Tensor:
    """A plain nn.Linear's weight; an adapter (LoRA) or quantised layer would be silently wrong to read this way."""
    if type(module) is not nn.Linear or module.bias is not None or type(module.weight) is not nn.Parameter:
        raise UsageError(
            f"{name} is a {type(module).__name__} with a {type(module.weight).__name__} weight, not a plain "
            "bias-free float nn.Linear: the lean decoder reads float weights directly (merge a LoRA adapter first "
            "with tinyllm lora merge; a quantised folder runs in tinyllm generate, chat and eval, not in serve)"
        )
    return module.weight.detach()


class LeanDecoder:
    """Batched incremental decoding of a TinyLlama2ForCausalLM with a static KV cache.

    Use: `prefill(row, ids)` for a new sequence in row `n` (the current batch size), then `step(tokens)` feeds one
    token per running row and returns their next-token logits; `release(row)` frees a row.
    """

    def __init__(self, model: PreTrainedModel, max_batch: int = 8, max_len: int | None = None) -> None:
        config = model.config
        self.config = config
        self.max_len = max_len or config.max_position_embeddings
        if self.max_len > config.max_position_embeddings:
            raise ValueError(f"max_len {self.max_len} exceeds the model's context {config.max_position_embeddings}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.groups = self.n_heads // self.n_kv_heads
        self.head_dim = config.hidden_size // self.n_heads
        self.scale = self.head_dim**-0.5
        self.eps = config.rms_norm_eps
        backbone = model.model
        self.embed = backbone.embed_tokens.weight.detach()
        self.dtype, self.device = self.embed.dtype, self.embed.device
        self.final_norm = backbone.norm.weight.detach()
        self.head = _plain_weight(model.lm_head, "lm_head")
        self.layers: list[LayerWeights] = []
        for index, layer in enumerate(backbone.layers):
            attn, mlp = layer.self_attn, layer.mlp
            prefix = f"model.layers.{index}"
            projections = [_plain_weight(getattr(attn, f"{p}_proj"), f"{prefix}.self_attn.{p}_proj") for p in "qkvo"]
            gate = _plain_weight(mlp.gate_proj, f"{prefix}.mlp.gate_proj")
            up = _plain_weight(mlp.up_proj, f"{prefix}.mlp.up_proj")
            self.layers.append(
                LayerWeights(
                    input_norm=layer.input_layernorm.weight.detach(),
                    qkv=torch.cat(projections[:3]).contiguous(),
                    o=projections[3],
                    post_norm=layer.post_attention_layernorm.weight.detach(),
                    gate_up=torch.cat((gate, up)).contiguous(),
                    down=_plain_weight(mlp.down_proj, f"{prefix}.mlp.down_proj"),
                )
            )
        # Rotary tables for every position, computed as TinyLlama2RotaryEmbedding does (same float32 products).
        inv_freq = backbone.rotary_emb.inv_freq.to(self.device)
        freqs = torch.arange(self.max_len, device=self.device).float()[:, None] * inv_freq  # (T, hd/2)
        self.cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1).to(self.dtype)  # (T, hd)
        self.sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1).to(self.dtype)  # sign of rotate_half folded in
        shape = (max_batch, self.n_kv_heads, self.max_len, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.lengths: list[int] = [0] * max_batch  # tokens in each row's cache
        self.rows = 0  # rows 0..rows-1 are running
        self._row_index = torch.arange(max_batch, device=self.device)
        self._positions = torch.arange(self.max_len, device=self.device)

    # ------------------------------------------------------------------------------------------- the maths
    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # torch's fused kernel: bit-identical to the written-out float32 formula
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # rolling the last dimension by half swaps its halves, as model.swap_halves does, in one op
        return x * cos + torch.roll(x, self.head_dim // 2, dims=-1) * sin

    def _mlp(self, x: torch.Tensor, layer: LayerWeights) -> torch.Tensor:
        gate, up = F.linear(self._norm(x, layer.post_norm), layer.gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, layer.down)

    # ----------------------------------------------------------------------------------------- the cache
    @torch.inference_mode()
    def prefill(self, row: int, ids: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        """Run a prompt through the model into cache row `row` (which must be `self.rows`: the batch grows by one)
        and return the next-token logits (vocab,), or every position's logits (T, vocab) with `all_logits`."""
        if row != self.rows or row >= self.max_batch:
            raise ValueError(f"prefill goes into row {self.rows} (the next free one of {self.max_batch}), not {row}")
        length = len(ids)
        if not 0 < length <= self.max_len:
            raise ValueError(f"a prompt of {length} tokens does not fit a context of {self.max_len}")
        heads = (self.n_heads, self.n_kv_heads, self.n_kv_heads)
        x = self.embed[torch.as_tensor(ids, device=self.device)]  # (T, dim)
        cos, sin = self.cos[:length, None], self.sin[:length, None]  # (T, 1, hd)
        for index, layer in enumerate(self.layers):
            qkv = F.linear(self._norm(x, layer.input_norm), layer.qkv).view(length, sum(heads), self.head_dim)
            qk = self._rotate(qkv[:, : heads[0] + heads[1]], cos, sin)
            q, k = qk.split(heads[:2], dim=1)  # (T, H, hd), (T, KV, hd)
            v = qkv[:, heads[0] + heads[1] :]
            self.keys[index][row, :, :length] = k.transpose(0, 1)
            self.values[index][row, :, :length] = v.transpose(0, 1)
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],
                k.transpose(0, 1)[None],
                v.transpose(0, 1)[None],
                is_causal=True,
                scale=self.scale,
                enable_gqa=self.groups > 1,
            )  # (1, H, T, hd)
            x = x + F.linear(out[0].transpose(0, 1).reshape(length, -1), layer.o)
            x = self._mlp(x, layer)
        self.lengths[row] = length
        self.rows += 1
        hidden = x if all_logits else x[-1]
        return F.linear(self._norm(hidden, self.final_norm), self.head)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token to each running row (`tokens`: (rows,) ids) and return the next-token logits
        (rows, vocab). Each row's token goes at that row's own position."""
        batch = self.rows
        if tokens.shape != (batch,):
            raise ValueError(f"step needs one token per running row ({batch}), got shape {tuple(tokens.shape)}")
        lengths = self.lengths[:batch]
        if max(lengths) >= self.max_len:
            raise ValueError(f"a row is full: the cache holds {self.max_len} positions")
        span = max(lengths) + 1  # keys to attend over: the longest row's cache plus its new token
        same_length = min(lengths) == max(lengths)
        if same_length:  # one position for every row: slices instead of gathers and index_put
            position = lengths[0]
            cos, sin = self.cos[position : position + 1], self.sin[position : position + 1]  # (1, hd)
            mask = None
        else:
            positions = torch.as_tensor(lengths, device=self.device)  # (B,)
            rows = self._row_index[:batch]
            cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (B, 1, hd)
            # rows shorter than the longest must not see the stale cache entries beyond their own length
            mask = (self._positions[:span][None] <= positions[:, None])[:, None, None]  # (B, 1, 1, span): attend
        heads = (self.n_heads, self.n_kv_heads, self.n_kv_heads)
        x = self.embed[tokens]  # (B, dim)
        for index, layer in enumerate(self.layers):
            qkv = F.linear(self._norm(x, layer.input_norm), layer.qkv).view(batch, sum(heads), self.head_dim)
            qk = self._rotate(qkv[:, : heads[0] + heads[1]], cos, sin)
            keys, values = self.keys[index], self.values[index]
            if same_length:
                keys[:batch, :, position] = qk[:, heads[0] :]
                values[:batch, :, position] = qkv[:, heads[0] + heads[1] :]
            else:
                keys[rows, :, positions] = qk[:, heads[0] :]  # (B, KV, hd) at each row's position
                values[rows, :, positions] = qkv[:, heads[0] + heads[1] :]
            # one query per row against the cached prefix; GQA without repeating the cache (enable_gqa)
            out = F.scaled_dot_product_attention(
                qk[:, : heads[0], None],  # (B, H, 1, hd)
                keys[:batch, :, :span],
                values[:batch, :, :span],
                attn_mask=mask,
                scale=self.scale,
                enable_gqa=self.groups > 1,
            )  # (B, H, 1, hd)
            x = x + F.linear(out.reshape(batch, -1), layer.o)
            x = self._mlp(x, layer)
        for row in range(batch):
            self.lengths[row] += 1
        return F.linear(self._norm(x, self.final_norm), self.head)

    def release(self, row: int) -> None:
        """Free `row`: the last running row moves into its place (cache and length), so rows stay a prefix.
        Callers that track rows must make the same move (see `engine.Engine`)."""
        last = self.rows - 1
        if not 0 <= row <= last:
            raise ValueError(f"row {row} is not running (rows 0..{last})")
        if row != last:
            length = self.lengths[last]
            for cache in (*self.keys, *self.values):
                cache[row, :, :length] = cache[last, :, :length]
            self.lengths[row] = length
        self.lengths[last] = 0
        self.rows = last

    def reset(self) -> None:
        """Forget every row (after an error, say); the cache memory stays allocated."""
        self.lengths = [0] * self.max_batch
        self.rows = 0


# ------------------------------------------------------------------------------------------- sampling
def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from (vocab,) logits: argmax at temperature 0, else softmax(logits / T) cut to the smallest set
    of tokens whose probability reaches `top_p` (nucleus sampling, Holtzman et al. 2020), drawn with the request's
    own generator so that a seed reproduces a reply whatever else the server is doing."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep a token while the probability before it is below top_p (the first token is always kept)
        keep = (sorted_probs.cumsum(0) - sorted_probs) < top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def greedy_generate(
    decoder: LeanDecoder, prompts: list[list[int]], max_new_tokens: int, stop_ids: Sequence[int] = ()
) -> list[list[int]]:
    """Greedy continuations of several prompts decoded as one batch (each up to and including its stop token):
    the decoder's counterpart of `model.generate(do_sample=False)`, for tests and benchmarks."""
    if decoder.rows:
        raise ValueError("greedy_generate needs an empty decoder")
    stop = set(stop_ids)
    outputs: list[list[int]] = [[] for _ in prompts]
    running = list(range(len(prompts)))  # prompt index of each decoder row
    next_tokens = []
    for row, ids in enumerate(prompts):
        next_tokens.append(int(decoder.prefill(row, ids).argmax()))
    try:
        while running:
            for row in reversed(range(len(running))):
                index = running[row]
                outputs[index].append(next_tokens[row])
                if next_tokens[row] in stop or len(outputs[index]) >= max_new_tokens:
                    decoder.release(row)
                    running[row], next_tokens[row] = running[-1], next_tokens[-1]
                    running.pop(), next_tokens.pop()
            if running:
                logits = decoder.step(torch.tensor(next_tokens, device=decoder.device))
                next_tokens = logits.argmax(-1).tolist()
    finally:
        decoder.reset()
    return outputs
