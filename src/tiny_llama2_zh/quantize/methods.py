"""Post-training weight quantisation for CPU inference, with the kernels of well-kept libraries.

Three methods (`tinyllm quantize --method`):

- `int8-weight`: torchao's `Int8WeightOnlyConfig` — int8 weights with one scale per output channel, activations
  stay float32; the matmul dequantises on the fly.
- `int8-dynamic`: `torch.ao.quantization.quantize_dynamic` with per-channel int8 weights — activations are quantised
  per batch at run time and the matmul runs in fbgemm's int8 kernels. torchao's own
  `Int8DynamicActivationInt8WeightConfig` runs on this CPU but took 3.3x the time of float32 per decoded token
  (measured with the 24m shape, 2 cores, torchao 0.18), so the CPU path is torch.ao's, as torchao's docs suggest for
  x86 dynamic quantisation of linear layers.
- `int4-weight`: torchao's `IntxWeightOnlyConfig(weight_dtype=int4, PerGroup(group_size))`. torchao's
  `Int4WeightOnlyConfig` needs CUDA (tinygemm) or mslk kernels, which this CPU build does not load; the Intx tensor
  keeps one int4 value per int8 byte in memory and dequantises in the matmul. On disk the values are packed two per
  byte.

The embedding matters at this size: at vocabulary 4,096 and width 128 it is 40 % of the weights. It is shared with
the output head (tied, as llama2.c does), so one quantised matrix serves both, as one float matrix did: for torchao,
the embedding's quantised tensor (per row = per output channel of the head) is the head's weight too; for torch.ao,
the head is a dynamic int8 Linear and the embedding looks its rows up in the head's int8 weight
(`TiedInt8Embedding`).

Folders: `config.json`, the tokenizer, `quantization.json` (method, group size, library versions, source) and
`model.quantized.safetensors` holding plain tensors only — the integer values, scales and zero points of every
quantised weight (`NAME.qdata`, `NAME.scale`, `NAME.zero_point`) and the float tensors left as they were (norms).
Loading builds the model, quantises it with the same method (which creates the tensors of the right types and
shapes) and copies the stored values in, refusing a missing, unexpected or mis-shaped tensor: the stored integers
are used as they are, never re-quantised.
"""

import json
import warnings
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tiny_llama2_zh.errors import UsageError

# quantised-folder detection lives in loading (the lower floor); re-exported here for the quantisation commands
from tiny_llama2_zh.loading import QUANTIZATION_FILE, is_quantized_folder, refuse_quantized  # noqa: F401
from tiny_llama2_zh.model import TinyLlama2ForCausalLM
from tiny_llama2_zh.quantize import METHODS

WEIGHTS_FILE = "model.quantized.safetensors"


def check_method(method: str, group_size: int, widths: tuple[int, ...] = ()) -> None:
    """Refuse an unknown method, and an int4 group size that is not a power of two or does not divide every input
    width of the quantised matrices (`widths`: the model width and the SwiGLU width)."""
    if method not in METHODS:
        raise UsageError(f"unknown quantisation method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "int4-weight":
        if group_size < 1 or group_size & (group_size - 1):
            raise UsageError(f"--group-size must be a power of two, got {group_size}")
        for width in widths:
            if width % group_size:
                raise UsageError(f"--group-size {group_size} does not divide the model's input width {width}")


# ------------------------------------------------------------------------------------------- applying
class TiedInt8Embedding(nn.Module):
    """The input embedding of a tied model whose head is a torch.ao dynamic int8 Linear: rows of the head's
    per-channel int8 weight, times their scales. One int8 matrix serves both, as one float matrix did."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = [head]  # a list: not a submodule, so the head's weight is stored once

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        weight = self.head[0].weight()  # (vocab, dim) qint8, one scale per row
        rows = weight.int_repr()[input_ids].float()  # (B, T, dim)
        scales = weight.q_per_channel_scales().float()[input_ids]  # (B, T)
        return rows * scales.unsqueeze(-1)


def _tied(model: TinyLlama2ForCausalLM) -> bool:
    return bool(model.config.tie_word_embeddings)


def apply_method(model: TinyLlama2ForCausalLM, method: str, group_size: int = 32) -> TinyLlama2ForCausalLM:
    """Quantise `model` (float32, CPU) in place with `method` and return it, in eval mode."""
    check_method(method, group_size, (model.config.hidden_size, model.config.intermediate_size))
    model = model.float().cpu().eval()
    if method == "int8-dynamic":
        with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao; the kernels remain
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
        if _tied(model):
            model.model.embed_tokens = TiedInt8Embedding(model.lm_head)
        return model

    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    if method == "int8-weight":
        linear_config = Int8WeightOnlyConfig()
        embedding_config = IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    else:
        linear_config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
        embedding_config = linear_config
    quantize_(
        model.model.embed_tokens, embedding_config, filter_fn=lambda module, fqn: isinstance(module, nn.Embedding)
    )
    if _tied(model):
        model.lm_head.weight = model.model.embed_tokens.weight  # one quantised matrix for the embedding and head
        quantize_(model.model, linear_config)
    else:
        quantize_(model, linear_config)
    return model


# ------------------------------------------------------------------------------------------- storing
def _is_dynamic_linear(module: nn.Module) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return isinstance(module, DynamicLinear)


def _pack_int4(values: torch.Tensor) -> torch.Tensor:
    """int4 values in -8..7 (one per int8), two per byte: (..., n) -> (..., n/2) uint8."""
    nibbles = (values.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low, high = (packed & 0xF).to(torch.int8), (packed >> 4).to(torch.int8)
    values = torch.stack((low, high), dim=-1).flatten(-2)
    return torch.where(values > 7, values - 16, values)


def _int4_attr(weight: torch.Tensor, attr: str) -> bool:
    return attr == "qdata" and getattr(weight, "target_dtype", None) == torch.int4


def quantized_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain tensors that store a quantised model (see the module docstring), in stored form."""
    tensors: dict[str, torch.Tensor] = {}
    dynamic = {name for name, module in model.named_modules() if _is_dynamic_linear(module)}
    for name in dynamic:
        weight = dict(model.named_modules())[name].weight()
        tensors[f"{name}.weight.qdata"] = weight.int_repr().contiguous()
        tensors[f"{name}.weight.scale"] = weight.q_per_channel_scales().float()
        tensors[f"{name}.weight.zero_point"] = weight.q_per_channel_zero_points().to(torch.int8)
    seen: set[int] = set()
    for key, value in model.named_parameters(remove_duplicate=False):
        if id(value) in seen:  # the tied head: stored once, under the embedding's name
            continue
        seen.add(id(value))
        if type(value) is nn.Parameter or not hasattr(value, "__tensor_flatten__"):
            tensors[key] = value.detach().contiguous()
            continue
        for attr in value.__tensor_flatten__()[0]:  # torchao tensor subclass: qdata, scale, zero_point
            inner = getattr(value, attr).detach()
            tensors[f"{key}.{attr}"] = (_pack_int4(inner) if _int4_attr(value, attr) else inner).contiguous()
    return tensors


QUANTIZED_PARTS = ("qdata", "scale", "zero_point")


def _restore(model: nn.Module, stored: dict[str, torch.Tensor]) -> None:
    """Copy stored tensors (already checked against `quantized_tensors(model)`) into a freshly quantised model."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, value in stored.items():
            owner, _, attr = key.rpartition(".")
            if attr not in QUANTIZED_PARTS:
                model.get_parameter(key).copy_(value)
            elif not _is_dynamic_linear(modules[owner.removesuffix(".weight")]):
                parameter = model.get_parameter(owner)
                getattr(parameter, attr).copy_(_unpack_int4(value) if _int4_attr(parameter, attr) else value)
    for name, module in modules.items():
        if _is_dynamic_linear(module):
            qweight = torch._make_per_channel_quantized_tensor(
                stored[f"{name}.weight.qdata"],
                stored[f"{name}.weight.scale"].double(),
                stored[f"{name}.weight.zero_point"].long(),
                0,
            )
            module.set_weight_bias(qweight, None)


def save_quantized(model: nn.Module, tokenizer, output_dir: str | Path, method: str, group_size: int, source) -> Path:
    """Write a quantised model folder (see the module docstring); files are written under a temporary name and
    renamed, so an interrupted save never leaves a folder that looks complete."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(output_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    partial = output_dir / f"{WEIGHTS_FILE}.partial"
    save_file(quantized_tensors(model), partial, metadata={"format": "pt", "method": method})
    partial.replace(output_dir / WEIGHTS_FILE)
    recipe = {
        "method": method,
        "library": METHODS[method].library,
        "group_size": group_size if method == "int4-weight" else None,
        "versions": {"torch": version("torch"), "torchao": version("torchao")},
        "source": str(source),
    }
    (output_dir / QUANTIZATION_FILE).write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
    return output_dir


def load_quantized(path: str | Path, device: str = "cpu") -> TinyLlama2ForCausalLM:
    """A quantised folder as a ready model (eval mode). Refused: a folder whose stored tensors do not match what the
    recipe creates (names or shapes), and a device the method has no kernels for."""
    from tiny_llama2_zh.model import TinyLlama2Config

    path = Path(path)
    recipe = json.loads((path / QUANTIZATION_FILE).read_text(encoding="utf-8"))
    method, group_size = recipe.get("method"), recipe.get("group_size") or 32
    check_method(method, group_size)
    if method == "int8-dynamic" and device != "cpu":
        raise UsageError(f"{path}: int8-dynamic runs in fbgemm's CPU kernels; load it on the CPU, not {device}")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: {QUANTIZATION_FILE} is there but {WEIGHTS_FILE} is missing")
    config = TinyLlama2Config.from_pretrained(path)
    with torch.device("cpu"):
        model = apply_method(TinyLlama2ForCausalLM(config), method, group_size)
    stored = load_file(weights)
    expected = {key: value.shape for key, value in quantized_tensors(model).items()}
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    wrong = [
        f"{k} {tuple(stored[k].shape)} != {tuple(expected[k])}"
        for k in expected
        if k in stored and stored[k].shape != expected[k]
    ]
    if missing or unexpected or wrong:
        raise UsageError(
            f"{weights} does not hold a {method} model of this config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}"
        )
    _restore(model, stored)
    return model.to(device).eval()
