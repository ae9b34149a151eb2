"""A lean decode loop: a static KV cache and a plain forward over the model's own weights, in a layout made for
matrix-vector products. Every place a user decodes runs it: `tinyllm generate` and `chat` (`infer.generate`), the
server (`infer.engine`), evaluation's greedy replies.

`model.generate` spends much of a decode step on bookkeeping rather than arithmetic (logits processors, stopping
criteria, the dynamic cache's concatenations, mask building, output dataclasses): for the demo model (dim 128,
vocabulary 4,096) nearly all of it. This module runs the same maths with nothing else: per layer one matmul for
q/k/v, rotary from a precomputed table, the new key/value written into a preallocated cache (vLLM's and
llama.cpp's static cache, without paging), attention over the cached prefix, one matmul for SwiGLU's gate and up;
then the tied head on the last position only.

A step runs in C where it can (`infer/native.py`, `native_step.c`): the whole step, every layer and the head, in
one call and one OpenMP thread team, reading the weights and cache held here. In PyTorch a batch-1 step of a small
model is ~90 dispatched operations whose thread fork/join and bookkeeping cost more than their arithmetic; in C
what is left is reading the weights, so a step runs at the speed of memory: with ChatGLM3's 64,798-token
vocabulary the 24m float32 head is 75 MB read once per token (benchmarks/llamacpp_bench.py measures the step beside
llama.cpp's). The C library is built on first use with the system's C compiler; without one (or with
`TINY_LLAMA2_ZH_NATIVE=0`, or `LeanDecoder(native=False)`) the same step runs as PyTorch operations, correct and
slower.

Weights are kept as the model stores them, (out, in) rows (`FloatMatrix`: the C dot products stream them front
to back; in PyTorch one row's product is a `torch.bmm` over a blocked copy of the transposed weight made on first
use, as `F.linear`'s matrix-vector path on the stored layout was slow). Products of several rows in PyTorch (a
prompt's prefill) are bound by arithmetic, and run oneDNN's matmul on a packed copy made on first use.

Quantised folders (`tinyllm quantize`) decode here too, from their integer weights (`Int8Matrix`): int8 (or int4
held one per byte) values with a float32 scale per output channel or per group of inputs, as torchao and torch.ao
store them. The C step converts the values to float in registers, reading a quarter of float32's bytes (at the 24m
shape the int8 weights, 25 MB, fit the machine's 32 MB L3 cache, which float32's do not). Activations stay float32
(weight-only quantisation, as torchao's Int8WeightOnlyConfig computes). A prompt's prefill (many rows, bound by
arithmetic) multiplies a float copy made for that product; without the C library, decoding steps use a float
copy made once and kept (float32's speed, and its memory beside the integers).

The decoder holds `max_batch` cache rows. Rows 0..n-1 are the running batch; each row has its own length, so
sequences with different prompt lengths decode together (per-row positions, masked attention), a new sequence
joins between two steps by `prefill` into a free row, and a finished one leaves by `release`, which moves the
last row into its place so the running rows stay a prefix (their cache slices are views, never gathered).

The arithmetic is model.py's, read from the model's modules (RMSNorm in float32, "rotate half" rotary with the
sign folded into the sin table, grouped-query attention, SwiGLU, tied lm_head): greedy decoding of a float model
gives the same tokens as `model.generate`, in C and in PyTorch (tests/test_decode.py). The weights are read when
the decoder is built (q/k/v and gate/up concatenated once); a model changed afterwards needs a new decoder.
"""

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.infer.native import NativeStep, native_library, native_product, native_product_runs

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- weights
@functools.cache
def _onednn_available() -> bool:
    """Whether torch was built with oneDNN (x86-64 and aarch64 wheels are) for FloatMatrix's products of rows."""
    return torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()


class FloatMatrix:
    """y = x @ W.T for a float weight W (out, in), kept as stored, (out, in) rows: the layout the C library's
    products stream front to back (infer/native_step.c), which runs one-row products wherever it is built.

    In PyTorch alone, one row's product runs on a copy made on first use, transposed and cut by output columns
    into one block per thread, (blocks, in, out / blocks), each block contiguous: `torch.bmm` of the row against
    every block streams each block row by row (F.linear's call on the stored layout takes BLAS's slow
    matrix-vector path, about 3 GB/s) and runs the blocks on the threads in parallel (ATen's CPU bmm splits the
    batch across threads; torch.mm on the whole transposed matrix gets no such split: on this project's 2-core
    machine, 2 threads, the 24m head (64,798 x 288) took 4.2 ms with torch.mm and 2.6 ms as two blocks). The block
    count is the thread count when the matrix is built.

    Products of several float32 rows (a batch of sequences decoding together, a prompt's prefill) run oneDNN's
    matmul on a copy of the weight in oneDNN's own blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, the
    packing inductor's freezing pass applies to linear layers), made on the first such product. There the product
    is bound by arithmetic rather than memory, and MKL's sgemm, torch.mm's kernel, takes a slower code path on AMD
    CPUs: on this project's AMD EPYC (Zen 4) machine, one thread, the 24m head (64,798 x 288) took 5.4 ms for 8
    rows with oneDNN against 11.9 ms with torch.mm, 46 against 88 ms for 128 rows, the same for 2 rows (measured
    under load). One row stays off it: there oneDNN's product was slower (8.3 against 5.5 ms). The copy costs the
    weight's size again in memory once a prompt of more than one token has run (the C step runs batched decoding)."""

    PACKING_BATCH = 8  # the row count oneDNN chooses its blocked layout for (any count runs on it)

    def __init__(self, weight: torch.Tensor, blocks: int | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.rows = weight.detach().contiguous()  # (out, in): W itself, the C step's layout (no copy when stored so)
        threads = torch.get_num_threads() if weight.device.type == "cpu" else 1  # a GPU runs one product whole
        self.blocks = max(1, min(blocks or threads, self.out_features))
        self._weight_blocks: torch.Tensor | None = None  # the blocked copy, made on the first product that needs it
        self._packed: torch.Tensor | None = None  # oneDNN's layout, made on the first product of several rows
        self.native = True  # one-row products by the C library where it is built (infer/native.py)
        self._native = None  # the C library's view of it (native.matrix_struct), made on first use

    @property
    def weight_blocks(self) -> torch.Tensor:
        """W transposed and cut by output columns into `blocks` contiguous blocks, (blocks, in, out / blocks), the
        last padded with zero columns: made on first use (where the C step runs one-row products, never)."""
        if self._weight_blocks is None:
            per_block = -(-self.out_features // self.blocks)
            padded = F.pad(self.rows, (0, 0, 0, per_block * self.blocks - self.out_features))
            self._weight_blocks = padded.view(self.blocks, per_block, self.in_features).transpose(1, 2).contiguous()
        return self._weight_blocks

    def weight(self) -> torch.Tensor:
        """W itself, (out, in)."""
        return self.rows

    @staticmethod
    def _runs_onednn(x: torch.Tensor) -> bool:
        """Whether x's product runs oneDNN's (see the class docstring): several float32 rows, eagerly, on a CPU."""
        if x.shape[0] == 1 or x.dtype != torch.float32 or x.device.type != "cpu":
            return False
        return _onednn_available()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: (rows, in)
        if self._runs_onednn(x):
            if self._packed is None:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(self.rows, self.PACKING_BATCH)
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, None, "none", [], "")
        if native_product_runs(x, self):
            return native_product(self, x)
        return _blocked_product(x, self.weight_blocks, self.out_features)

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes


def _blocked_product(x: torch.Tensor, weight_blocks: torch.Tensor, out_features: int) -> torch.Tensor:
    """x (rows, in) times the blocks (blocks, in, per): one torch.bmm, the blocks on the threads in parallel."""
    blocks, in_features, _ = weight_blocks.shape
    y = torch.bmm(x.expand(blocks, x.shape[0], in_features), weight_blocks)  # (blocks, rows, per)
    y = y.transpose(0, 1).reshape(x.shape[0], -1)  # (rows, blocks * per): a view for one row
    return y if y.shape[1] == out_features else y[:, :out_features].contiguous()


class Int8Matrix:
    """y = x @ (values * scales).T for integer weights (out, in) held one per int8 (int8, or int4 in -8..7) with a
    float32 scale per output channel and group of inputs (out, groups), zero points 0 (symmetric quantisation, as
    every `tinyllm quantize` method stores). See the module docstring for the kernels."""

    SMALL_BATCH = 16  # rows up to which the C library multiplies the integers; beyond it, dequantise and matmul

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor) -> None:
        self.qdata = qdata.contiguous()  # (out, in) int8
        self.scale = scale.float().reshape(qdata.shape[0], -1).contiguous()  # (out, groups)
        self.out_features, self.in_features = qdata.shape
        if self.in_features % self.scale.shape[1]:
            raise ValueError(f"{self.scale.shape[1]} scale groups do not divide {self.in_features} inputs")
        self.native = True  # products of up to SMALL_BATCH rows by the C library where it is built
        self._native = None  # the C library's view of it (native.matrix_struct), made on first use
        self._float: FloatMatrix | None = None  # without the C library: the dequantised weight, made on first use

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (out, in) the integers stand for."""
        groups = self.scale.shape[1]
        values = self.qdata.float().view(self.out_features, groups, -1) * self.scale[..., None]
        return values.view(self.out_features, self.in_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Float rows `ids` of the weight: the embedding lookup of a tied, quantised embedding."""
        groups = self.scale.shape[1]
        values = self.qdata[ids].float().view(*ids.shape, groups, -1) * self.scale[ids][..., None]
        return values.view(*ids.shape, self.in_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: (rows, in)
        if x.shape[0] > self.SMALL_BATCH:  # a prompt's prefill: bound by arithmetic, on a float copy made for it
            return torch.mm(x, self.dequantized().t().to(x.dtype))
        if native_product_runs(x, self):
            return native_product(self, x)
        if self._float is None:  # PyTorch only: decode from a float copy, kept (float32's speed and memory)
            self._float = FloatMatrix(self.dequantized())
            self._float.native = False
        return self._float(x)

    @property
    def nbytes(self) -> int:
        return self.qdata.nbytes + self.scale.nbytes


Matrix = FloatMatrix | Int8Matrix


def _refuse(module: nn.Module, name: str) -> UsageError:
    weight = getattr(module, "weight", None)
    return UsageError(
        f"{name} is a {type(module).__name__} with a {type(weight).__name__} weight, not a bias-free nn.Linear "
        "with a float or `tinyllm quantize` weight: the lean decoder reads weights directly (merge a LoRA adapter "
        "first with tinyllm lora merge)"
    )


def _weight_of(module: nn.Module, name: str) -> torch.Tensor | Int8Matrix:
    """A linear layer's weight as the decoder stores it: the float tensor, or the integers and scales of a
    quantised one (torchao's tensor subclasses keep them as `qdata`, `scale`, `zero_point`; torch.ao's dynamic
    Linear as a per-channel qint8 tensor). A layer with nonzero zero points is dequantised (none of our methods
    makes one). Anything else (a LoRA adapter, a bias) is refused: reading its weight alone would be wrong."""
    if type(module).__name__ == "Linear" and type(module).__module__.startswith("torch.ao.nn.quantized.dynamic"):
        if module.bias() is not None:
            raise _refuse(module, name)
        weight = module.weight()  # per-channel qint8
        qdata, scale = weight.int_repr(), weight.q_per_channel_scales().float()[:, None]
        zero_point = weight.q_per_channel_zero_points()
    elif type(module) is nn.Linear and module.bias is None:
        weight = module.weight
        if type(weight) is nn.Parameter:
            return weight.detach()
        if not all(hasattr(weight, part) for part in ("qdata", "scale", "zero_point")):
            raise _refuse(module, name)
        qdata, scale, zero_point = weight.qdata, weight.scale, weight.zero_point
    else:
        raise _refuse(module, name)
    matrix = Int8Matrix(qdata, scale)
    if bool(torch.any(zero_point != 0)):
        zero = zero_point.float().reshape(matrix.out_features, -1)
        return matrix.dequantized() - (zero * matrix.scale).repeat_interleave(matrix.in_features // zero.shape[1], 1)
    return matrix


def _join(parts: list[torch.Tensor | Int8Matrix]) -> Matrix:
    """One matrix for several layers read by the same input (q/k/v, gate/up): their weights stacked by output."""
    if len(parts) == 1:
        return parts[0] if isinstance(parts[0], Int8Matrix) else FloatMatrix(parts[0])
    if all(isinstance(part, Int8Matrix) for part in parts) and len({p.scale.shape[1] for p in parts}) == 1:
        return Int8Matrix(torch.cat([p.qdata for p in parts]), torch.cat([p.scale for p in parts]))
    return FloatMatrix(torch.cat([p.dequantized() if isinstance(p, Int8Matrix) else p for p in parts]))


@dataclass(frozen=True)
class LayerWeights:
    input_norm: torch.Tensor  # (dim,)
    qkv: Matrix  # dim -> (H + 2 KV) * hd
    o: Matrix  # H * hd -> dim
    post_norm: torch.Tensor  # (dim,)
    gate_up: Matrix  # dim -> 2 * hidden
    down: Matrix  # hidden -> dim


class LeanDecoder:
    """Batched incremental decoding of a TinyLlama2ForCausalLM with a static KV cache.

    Use: `prefill(row, ids)` for a new sequence in row `n` (the current batch size), then `step(tokens)` feeds one
    token per running row and returns their next-token logits; `release(row)` frees a row.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        max_batch: int = 8,
        max_len: int | None = None,
        native: bool = True,
    ) -> None:
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
        self.head = _join([_weight_of(model.lm_head, "lm_head")])
        self._embedding = self._embedding_of(backbone.embed_tokens, model)
        self.dtype = torch.float32 if isinstance(self._embedding, Int8Matrix) else self._embedding.dtype
        self.device = backbone.norm.weight.device
        self.final_norm = backbone.norm.weight.detach()
        self.layers: list[LayerWeights] = []
        for index, layer in enumerate(backbone.layers):
            attn, mlp = layer.self_attn, layer.mlp
            prefix = f"model.layers.{index}"
            qkv = [_weight_of(getattr(attn, f"{p}_proj"), f"{prefix}.self_attn.{p}_proj") for p in "qkv"]
            gate_up = [_weight_of(getattr(mlp, f"{p}_proj"), f"{prefix}.mlp.{p}_proj") for p in ("gate", "up")]
            self.layers.append(
                LayerWeights(
                    input_norm=layer.input_layernorm.weight.detach(),
                    qkv=_join(qkv),
                    o=_join([_weight_of(attn.o_proj, f"{prefix}.self_attn.o_proj")]),
                    post_norm=layer.post_attention_layernorm.weight.detach(),
                    gate_up=_join(gate_up),
                    down=_join([_weight_of(mlp.down_proj, f"{prefix}.mlp.down_proj")]),
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
        if not native:  # PyTorch's operations only, products included (tests and benchmarks compare the two)
            for matrix in self._matrices():
                matrix.native = False
        self._native_step = self._bind_native_step() if native else None

    def _matrices(self) -> list["Matrix"]:
        """The head and every layer's matrices: what a step reads."""
        return [self.head, *(m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down))]

    def _bind_native_step(self) -> NativeStep | None:
        """The C step (infer/native.py) over this decoder's weights and cache, where it applies: a CPU, float32
        activations, float32 or int8 weights, and a C compiler to build it; else None (PyTorch's operations)."""
        floats = [m.rows.dtype for m in self._matrices() if isinstance(m, FloatMatrix)]
        if self.device.type != "cpu" or self.dtype != torch.float32 or any(d != torch.float32 for d in floats):
            return None
        library = native_library()
        return NativeStep(self, library) if library is not None else None

    @property
    def native(self) -> bool:
        """Whether steps run the C step (infer/native.py)."""
        return self._native_step is not None

    def _embedding_of(self, module: nn.Module, model: PreTrainedModel) -> torch.Tensor | Int8Matrix:
        """The input embedding: the float table itself (never copied), or the integer rows of a quantised one (for
        a tied int8-dynamic model, `TiedInt8Embedding`, those of the head)."""
        if hasattr(module, "head"):  # quantize.methods.TiedInt8Embedding: rows of the head's int8 weight
            return self.head if isinstance(self.head, Int8Matrix) else module.head[0].weight().dequantize()
        weight = module.weight
        if weight is model.lm_head.weight and isinstance(self.head, Int8Matrix):
            return self.head  # torchao: one quantised tensor is the embedding and the head
        if type(weight) is nn.Parameter:
            return weight.detach()
        if all(hasattr(weight, part) for part in ("qdata", "scale", "zero_point")) and not bool(
            torch.any(weight.zero_point != 0)
        ):
            return Int8Matrix(weight.qdata, weight.scale)
        raise UsageError(f"model.embed_tokens holds a {type(weight).__name__} the lean decoder cannot read")

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self._embedding, Int8Matrix):
            return self._embedding.rows(ids)
        return self._embedding[ids]

    @property
    def weight_bytes(self) -> int:
        """Bytes of the matrices a decode step reads (the head and every layer's), as the decoder stores them."""
        return sum(matrix.nbytes for matrix in self._matrices())

    # ------------------------------------------------------------------------------------------- the maths
    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # torch's fused kernel: bit-identical to the written-out float32 formula
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # rolling the last dimension by half swaps its halves, as model.swap_halves does, in one op
        return x * cos + torch.roll(x, self.head_dim // 2, dims=-1) * sin

    def _attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """One query per row (q: (B, H, hd)) against its cached keys and values (B, KV, T, hd), grouped-query
        attention without repeating the cache; returns (B, H * hd): torch's fused SDPA kernel."""
        out = F.scaled_dot_product_attention(
            q[:, :, None], keys, values, attn_mask=mask, scale=self.scale, enable_gqa=self.groups > 1
        )  # (B, H, 1, hd)
        return out.reshape(q.shape[0], -1)

    def _mlp(self, x: torch.Tensor, layer: LayerWeights) -> torch.Tensor:
        gate, up = layer.gate_up(self._norm(x, layer.post_norm)).chunk(2, dim=-1)
        return x + layer.down(F.silu(gate) * up)

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
        x = self._embed(torch.as_tensor(ids, device=self.device))  # (T, dim)
        cos, sin = self.cos[:length, None], self.sin[:length, None]  # (T, 1, hd)
        for index, layer in enumerate(self.layers):
            qkv = layer.qkv(self._norm(x, layer.input_norm)).view(length, sum(heads), self.head_dim)
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
            x = x + layer.o(out[0].transpose(0, 1).reshape(length, -1))
            x = self._mlp(x, layer)
        self.lengths[row] = length
        self.rows += 1
        hidden = x if all_logits else x[-1]
        return self.head(self._norm(hidden, self.final_norm).view(-1, hidden.shape[-1])).view(*hidden.shape[:-1], -1)

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
        if self._native_step is not None:
            logits = self._native_step(tokens, torch.as_tensor(lengths))
        else:
            logits = self._eager_step(tokens, lengths)
        for row in range(batch):
            self.lengths[row] += 1
        return logits

    def _eager_step(self, tokens: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """The step with Python-known lengths: attention over the longest row's prefix only, and slices instead
        of gathers when every row is at the same position (the common case: one sequence)."""
        span = max(lengths) + 1  # keys to attend over: the longest row's cache plus its new token
        if min(lengths) == max(lengths):  # one position for every row: slices instead of gathers and index_put
            position = lengths[0]
            rotary = self.cos[position : position + 1], self.sin[position : position + 1]  # (1, hd)
            return self._layers_step(tokens, rotary, position, None, span)
        positions = torch.as_tensor(lengths, device=self.device)  # (B,)
        # rows shorter than the longest must not see the stale cache entries beyond their own length
        mask = (self._positions[:span][None] <= positions[:, None])[:, None, None]  # (B, 1, 1, span): attend
        rotary = self.cos[positions][:, None], self.sin[positions][:, None]  # (B, 1, hd)
        return self._layers_step(tokens, rotary, positions, mask, span)

    def _layers_step(
        self,
        tokens: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        positions: int | torch.Tensor,
        mask: torch.Tensor | None,
        span: int,
    ) -> torch.Tensor:
        """The step's arithmetic: each row's new key and value written at `positions` (one int for every row, or
        one per row), attention over the first `span` cache positions (`mask`: which each row sees)."""
        batch = tokens.shape[0]
        cos, sin = rotary
        heads = (self.n_heads, self.n_kv_heads, self.n_kv_heads)
        x = self._embed(tokens)  # (B, dim)
        for index, layer in enumerate(self.layers):
            qkv = layer.qkv(self._norm(x, layer.input_norm)).view(batch, sum(heads), self.head_dim)
            qk = self._rotate(qkv[:, : heads[0] + heads[1]], cos, sin)
            keys, values = self.keys[index], self.values[index]
            if isinstance(positions, int):
                keys[:batch, :, positions] = qk[:, heads[0] :]
                values[:batch, :, positions] = qkv[:, heads[0] + heads[1] :]
            else:
                rows = self._row_index[:batch]
                keys[rows, :, positions] = qk[:, heads[0] :]  # (B, KV, hd) at each row's position
                values[rows, :, positions] = qkv[:, heads[0] + heads[1] :]
            out = self._attend(qk[:, : heads[0]], keys[:batch, :, :span], values[:batch, :, :span], mask)
            x = x + layer.o(out)
            x = self._mlp(x, layer)
        return self.head(self._norm(x, self.final_norm))

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
def greedy_tokens(logits: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """Each row's argmax of (rows, vocab) logits, the same index as `logits.argmax(-1)` (the first maximum; a NaN
    counts as the maximum, as there), found in two passes: the maximum of each chunk of `chunk` logits, which torch
    vectorises (`amax`), then argmax over the chunks' maxima and within the first chunk holding the largest one.
    torch's argmax over a long row is a scalar loop: for ChatGLM3's 64,798 logits it took 56 us for one row and
    427 us for 8 (a tenth of a batch-8 decode step of the 24m shape), this 30 and 84 us (one thread, under load)."""
    rows, width = logits.shape
    body = width - width % chunk
    maxima = logits[:, :body].view(rows, body // chunk, chunk).amax(-1)  # (rows, chunks)
    if body < width:
        maxima = torch.cat([maxima, logits[:, body:].amax(-1, keepdim=True)], dim=1)
    starts = maxima.argmax(-1) * chunk  # (rows,) the first chunk holding the maximum
    window = (starts[:, None] + torch.arange(chunk, device=logits.device)).clamp_max(width - 1)  # (rows, chunk)
    return starts + logits.gather(1, window).argmax(-1)


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from (vocab,) logits: argmax at temperature 0, else softmax(logits / T) cut to the smallest set
    of tokens whose probability reaches `top_p` (nucleus sampling, Holtzman et al. 2020), drawn with the request's
    own generator so that a seed reproduces a reply whatever else the server is doing."""
    if temperature <= 0:
        return int(greedy_tokens(logits.view(1, -1))[0])
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep a token while the probability before it is below top_p (the first token is always kept)
        keep = (sorted_probs.cumsum(0) - sorted_probs) < top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass(frozen=True)
class Sampler:
    """How a row's next token is chosen, with transformers' logits processors in `generate`'s order: the
    repetition penalty (CTRL, Keskar et al. 2019: a seen token's logit divided by the penalty when positive,
    multiplied when negative, over the prompt and the reply), then temperature, top-k and top-p (`sample_token`).
    Temperature 0 is greedy (after the penalty, as in `generate`)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def choose(self, logits: torch.Tensor, history: Sequence[int], generator: torch.Generator | None) -> int:
        if self.repetition_penalty != 1.0 and history:
            seen = torch.as_tensor(history, device=logits.device)
            scores = logits.gather(0, seen)
            penalised = torch.where(scores < 0, scores * self.repetition_penalty, scores / self.repetition_penalty)
            logits = logits.scatter(0, seen, penalised)
        if self.temperature > 0 and 0 < self.top_k < logits.numel():
            kth = logits.topk(self.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return sample_token(logits, self.temperature, self.top_p, generator)


GREEDY = Sampler()


@torch.inference_mode()
def generate_batch(
    decoder: LeanDecoder,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    sampler: Sampler = GREEDY,
    seed: int | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Continuations of several prompts decoded as one batch, each up to and including its stop token: the
    decoder's counterpart of `model.generate`, for `tinyllm generate`, `chat`, evaluation, tests and benchmarks
    (the server's engine runs the same decoder step by step, admitting requests as they come). Sampled rows draw
    from their own generator seeded with `seed + prompt index`, never from the process's random state.
    `on_token(prompt index, token)` sees every token as it is chosen (streaming)."""
    if decoder.rows:
        raise ValueError("generate_batch needs an empty decoder")
    stop = set(stop_ids)
    outputs: list[list[int]] = [[] for _ in prompts]
    generators: list[torch.Generator | None] = [None] * len(prompts)
    if sampler.temperature > 0:
        for index in range(len(prompts)):
            generators[index] = torch.Generator(device=decoder.device)
            if seed is None:
                generators[index].seed()
            else:
                generators[index].manual_seed(seed + index)

    def choose(index: int, logits: torch.Tensor) -> int:
        if sampler is GREEDY:
            return int(greedy_tokens(logits.view(1, -1))[0])
        return sampler.choose(logits, [*prompts[index], *outputs[index]], generators[index])

    running = list(range(len(prompts)))  # prompt index of each decoder row
    try:
        next_tokens = [choose(row, decoder.prefill(row, ids)) for row, ids in enumerate(prompts)]
        while running:
            for row in reversed(range(len(running))):
                index = running[row]
                outputs[index].append(next_tokens[row])
                if on_token is not None:
                    on_token(index, next_tokens[row])
                if next_tokens[row] in stop or len(outputs[index]) >= max_new_tokens:
                    decoder.release(row)
                    running[row], next_tokens[row] = running[-1], next_tokens[-1]
                    running.pop(), next_tokens.pop()
            if running:
                logits = decoder.step(torch.tensor(next_tokens, device=decoder.device))
                if sampler is GREEDY:
                    next_tokens = greedy_tokens(logits).tolist()
                else:
                    next_tokens = [choose(index, logits[row]) for row, index in enumerate(running)]
    finally:
        decoder.reset()
    return outputs


def greedy_generate(
    decoder: LeanDecoder, prompts: list[list[int]], max_new_tokens: int, stop_ids: Sequence[int] = ()
) -> list[list[int]]:
    """Greedy continuations (`generate_batch` with argmax): `model.generate(do_sample=False)`'s tokens."""
    return generate_batch(decoder, prompts, max_new_tokens, stop_ids)
