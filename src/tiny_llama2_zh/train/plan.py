"""`tinyllm plan`: what a pretraining run of a size preset costs before a GPU-hour is spent.

    tinyllm plan --size 256m --tokens 19e9 --gpus 8 --mfu 0.4 --gpu h100

- parameters: counted on the model itself, built on the meta device from the preset (no memory, no formula);
- training FLOPs: 6N per token for the forward and backward pass through every weight (Kaplan et al. 2020, §2.1;
  Hoffmann et al. 2022, Chinchilla) plus 12·L·d·T for attention's scores and values (Chowdhery et al. 2022, PaLM,
  appendix B), the same `presets.flops_per_token` that the runs' MFU divides by;
- memory per GPU: model states under mixed-precision Adam as the ZeRO paper accounts them (Rajbhandari et al.
  2020, §3.1: 2 bytes of 16-bit weights + 2 of 16-bit gradients + 12 of float32 weights, momentum and variance =
  16 bytes per parameter), with DDP keeping all of it on every GPU and ZeRO-1/2/3 partitioning the optimizer
  states, then the gradients, then the weights over the N GPUs; DeepSpeed's own estimator beside it when deepspeed
  is installed (it also counts a float32 copy of the gradients: 18 bytes); plus activations at the recipe's
  micro-batch and sequence length;
- hours: the FLOPs over the GPUs' dense bf16 peak at the stated MFU.

The recipe (configs/pretrain/SIZE.yaml) gives the sequence length and micro-batch unless they are given here.
"""

import math
from dataclasses import dataclass

from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.recipes import PACKAGE_DIR

CHATGLM3_VOCAB_SIZE = 64798  # the size recipes' tokenizer (tinyllm tokenizer convert-chatglm3)
GIB = 1024**3

# Bytes per parameter of the model states (ZeRO paper, §3.1 and §5: P_os, P_os+g, P_os+g+p), as
# (unpartitioned, partitioned over the N GPUs): 16-bit weights (2), 16-bit gradients (2), float32 optimizer
# states: master weights, Adam's momentum and variance (12).
ZERO_STAGES: dict[str, tuple[int, int]] = {"DDP": (16, 0), "ZeRO-1": (4, 12), "ZeRO-2": (2, 14), "ZeRO-3": (0, 16)}

# Activation bytes per layer per token at 16 bits (Korthikanti et al. 2022, "Reducing Activation Recomputation
# in Large Transformer Models", eq. 1: s·b·h·(34 + 5·a·s/h)); SDPA's fused kernels keep no (a, s, s) attention
# matrix, so its 5·a·s/h term is gone. With activation checkpointing a layer keeps its 16-bit input only (2·s·b·h).
ACTIVATION_BYTES_PER_LAYER_TOKEN_DIM = 34
CHECKPOINTED_BYTES_PER_LAYER_TOKEN_DIM = 2


@dataclass
class Plan:
    size: str
    vocab_size: int
    parameters: int
    largest_layer_parameters: int
    layers: int
    dim: int
    seq_len: int
    micro_batch: int
    tokens: float
    gpus: int
    gpu: str
    peak_tflops: float
    mfu: float
    flops_per_token: float

    @property
    def total_flops(self) -> float:
        return self.flops_per_token * self.tokens

    @property
    def hours(self) -> float:
        return self.total_flops / (self.gpus * self.peak_tflops * 1e12 * self.mfu) / 3600

    def model_state_bytes(self, stage: str) -> float:
        whole, partitioned = ZERO_STAGES[stage]
        return self.parameters * (whole + partitioned / self.gpus)

    def activation_bytes(self, checkpointing: bool = False) -> float:
        per = CHECKPOINTED_BYTES_PER_LAYER_TOKEN_DIM if checkpointing else ACTIVATION_BYTES_PER_LAYER_TOKEN_DIM
        return per * self.layers * self.dim * self.seq_len * self.micro_batch


def recipe_shape(size: str) -> tuple[int, int]:
    """(seq_len, per_device_train_batch_size) of the shipped pretraining recipe of a size."""
    import yaml

    path = PACKAGE_DIR / "configs" / "pretrain" / f"{size}.yaml"
    if not path.is_file():
        raise UsageError(f"no pretraining recipe {path.name} for --size {size}; give --seq-len and --micro-batch")
    recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    return int(recipe["data"]["seq_len"]), int(recipe["train"]["per_device_train_batch_size"])


def deepspeed_estimates(parameters: int, largest_layer: int, gpus: int) -> dict[str, float] | None:
    """DeepSpeed's model-state estimators (GPU bytes, no offload), or None when deepspeed is not installed."""
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    except ImportError:
        return None
    nodes, per_node = (gpus // 8, 8) if gpus > 8 and gpus % 8 == 0 else (1, gpus)
    _, zero2 = estimate_zero2_model_states_mem_needs(parameters, per_node, nodes, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(parameters, largest_layer, per_node, nodes, cpu_offload=False)
    return {"ZeRO-2": float(zero2), "ZeRO-3": float(zero3)}


def make_plan(
    size: str,
    tokens: float,
    gpus: int = 1,
    mfu: float = 0.4,
    gpu: str = "h100",
    vocab_size: int = CHATGLM3_VOCAB_SIZE,
    seq_len: int | None = None,
    micro_batch: int | None = None,
) -> Plan:
    import torch

    from tiny_llama2_zh.model import TinyLlama2ForCausalLM
    from tiny_llama2_zh.presets import flops_per_token, preset_config
    from tiny_llama2_zh.train.runner import KNOWN_PEAK_TFLOPS

    if not (0 < mfu <= 1):
        raise UsageError(f"--mfu {mfu}: a fraction of the peak, between 0 and 1")
    if gpus < 1 or not (math.isfinite(tokens) and tokens > 0):
        raise UsageError("--gpus must be at least 1 and --tokens a positive number")
    peaks = {name.lower(): tflops for name, tflops in KNOWN_PEAK_TFLOPS.items()}
    if gpu.lower() not in peaks:
        raise UsageError(f"--gpu {gpu}: known GPUs are {', '.join(sorted(peaks))}")
    recipe_seq_len, recipe_batch = recipe_shape(size) if seq_len is None or micro_batch is None else (0, 0)
    config = preset_config(size, vocab_size)
    seq_len = seq_len or recipe_seq_len
    with torch.device("meta"):  # shapes only: a 256m model costs no memory and no initialisation time
        model = TinyLlama2ForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())  # the tied head is one parameter, counted once
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    plan = Plan(
        size=size, vocab_size=vocab_size, parameters=parameters, largest_layer_parameters=largest,
        layers=config.num_hidden_layers, dim=config.hidden_size, seq_len=seq_len,
        micro_batch=micro_batch or recipe_batch, tokens=tokens, gpus=gpus, gpu=gpu.upper(),
        peak_tflops=peaks[gpu.lower()], mfu=mfu, flops_per_token=flops_per_token(config, seq_len),
    )  # fmt: skip
    return plan


def plan_table(plan: Plan) -> str:
    """The plan as markdown."""
    activations, checkpointed = plan.activation_bytes(), plan.activation_bytes(checkpointing=True)
    deepspeed = deepspeed_estimates(plan.parameters, plan.largest_layer_parameters, plan.gpus) or {}
    lines = [
        f"| {plan.size} | |",
        "|---|---|",
        f"| parameters (vocabulary {plan.vocab_size:,}, tied head) | {plan.parameters:,} |",
        f"| training FLOPs per token (6N + 12·L·d·T, T = {plan.seq_len}) | {plan.flops_per_token:.3e} |",
        f"| training FLOPs for {plan.tokens:.3g} tokens | {plan.total_flops:.3e} |",
        f"| {plan.gpus} × {plan.gpu} at {plan.mfu:.0%} MFU of {plan.peak_tflops:g} TFLOP/s bf16 | "
        f"{plan.hours:,.1f} h ({plan.hours * plan.gpus:,.0f} GPU-hours) |",
    ]
    for stage in ZERO_STAGES:
        states = plan.model_state_bytes(stage)
        extra = f"; DeepSpeed's estimator: {deepspeed[stage] / GIB:.2f} GiB" if stage in deepspeed else ""
        lines.append(f"| model states per GPU, {stage} (16 bytes/param, ZeRO paper{extra}) | {states / GIB:.2f} GiB |")
    lines.append(
        f"| activations per GPU (micro-batch {plan.micro_batch} × {plan.seq_len}; with activation checkpointing) | "
        f"{activations / GIB:.2f} GiB ({checkpointed / GIB:.2f} GiB) |"
    )
    return "\n".join(lines)
