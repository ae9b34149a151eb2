"""Pretraining throughput: our model vs transformers' LlamaForCausalLM, in one process, rounds interleaved.

    python benchmarks/pretrain_throughput.py                  # 24m preset, vocab 64798 (ChatGLM3), seq 256, batch 4
    python benchmarks/pretrain_throughput.py --seq-len 512 --batch-size 2
    python benchmarks/pretrain_throughput.py --compile        # also both with torch.compile'd decoder layers

A plain training loop, nothing from the project's Trainer: forward with labels, backward, AdamW step, zero_grad.
The optimizer is fused AdamW, the Trainer's default ("adamw_torch_fused") on torch >= 2.8. Both models start from
identical weights (`to_hf_llama` copies ours) and see identical random batches in the same order. Rounds alternate
the models (A B A B ...), so a neighbour's load on a shared machine slows both alike: trust the ratio of the
interleaved medians more than the absolute tokens/s. No round starts after --budget-s seconds (2 rounds at least).
With --compile both models also run with every decoder layer compiled (ours: `model.compile_layers()`).

"MFU" is 6·N·tokens (+ attention, `presets.flops_per_token`) FLOPs per second over the best fp32 matmul this
script measures first. On a CPU that is relative to a measured matmul best, not to a hardware peak.
"""

import argparse
import statistics
import time

import torch
from torch import nn

from tiny_llama2_zh.export.hf_llama import to_hf_llama
from tiny_llama2_zh.model import TinyLlama2ForCausalLM
from tiny_llama2_zh.presets import count_parameters, flops_per_token, preset_config

BASELINE = "transformers Llama"


def device_sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_matmul_best(device: str, size: int = 2048, repeats: int = 8, dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of a square matmul on this device: the denominator of "MFU" (on a CPU, not a hardware peak)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        device_sync()
        start = time.perf_counter()
        a @ b
        device_sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def compile_decoder_layers(model: nn.Module) -> nn.Module:
    """Regional compilation for transformers' Llama: what `TinyLlama2ForCausalLM.compile_layers()` does for ours."""
    for layer in model.model.layers:
        layer.compile()
    return model


class Variant:
    """One model with its own optimizer, and the step times it has recorded."""

    def __init__(self, name: str, model: nn.Module):
        self.name = name
        self.model = model.train()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
        self.times: list[float] = []

    def train_step(self, batch: torch.Tensor) -> float:
        device_sync()
        start = time.perf_counter()
        loss = self.model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        device_sync()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="24m", help="size preset (default: 24m)")
    parser.add_argument("--vocab-size", type=int, default=64798, help="vocabulary size (default: ChatGLM3's 64798)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step (default: 4)")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds, each model once per round (default: 8)")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per model per round (default: 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model first (default: 1)")
    parser.add_argument("--budget-s", type=float, default=100, help="start no round after this (default: 100)")
    parser.add_argument("--chunk-rows", type=int, default=256, help="our fused loss's rows per chunk (default: 256)")
    parser.add_argument("--plain-loss", action="store_true", help="also time our model with the plain loss")
    parser.add_argument("--compile", action="store_true", help="also time both with compiled decoder layers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    best = measure_matmul_best(device)
    config = preset_config(args.size, args.vocab_size, max_position_embeddings=max(512, args.seq_len))
    per_token = flops_per_token(config, args.seq_len)
    where = f"cuda {torch.cuda.get_device_name()}" if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {where}; best fp32 matmul measured here: {best / 1e9:.1f} GFLOP/s (the MFU denominator)")
    print(
        f"model: {args.size} preset, {count_parameters(config)['total']:,} parameters, vocab {args.vocab_size}, "
        f"seq {args.seq_len}, batch {args.batch_size}, fp32; {per_token / 1e6:.1f} MFLOP per token"
    )

    torch.manual_seed(args.seed)
    initial_state = TinyLlama2ForCausalLM(config).state_dict()

    def our_model(chunk_rows: int | None) -> TinyLlama2ForCausalLM:
        model = TinyLlama2ForCausalLM(config)
        model.load_state_dict(initial_state)
        model.fused_loss_chunk_rows = chunk_rows
        return model.to(device)

    variants = [Variant("ours (fused loss)", our_model(args.chunk_rows))]
    if args.plain_loss:
        variants.append(Variant("ours (plain loss)", our_model(None)))
    variants.append(Variant(BASELINE, to_hf_llama(our_model(None))))
    if args.compile:
        variants.append(Variant("ours (fused loss), compiled", our_model(args.chunk_rows).compile_layers()))
        variants.append(Variant(f"{BASELINE}, compiled", compile_decoder_layers(to_hf_llama(our_model(None)))))

    generator = torch.Generator().manual_seed(args.seed)
    batches = [
        torch.randint(3, args.vocab_size, (args.batch_size, args.seq_len), generator=generator).to(device)
        for _ in range(args.warmup + args.rounds * args.steps)
    ]
    for variant in variants:  # warmup: allocator, oneDNN primitives, and compilation for the compiled variants
        start = time.perf_counter()
        for batch in batches[: args.warmup]:
            variant.train_step(batch)
        print(f"warmup {variant.name}: {time.perf_counter() - start:.1f} s for {args.warmup} step(s)", flush=True)
    started = time.perf_counter()
    for round_index in range(args.rounds):
        if round_index >= 2 and time.perf_counter() - started > args.budget_s:
            print(f"time budget reached after {round_index} rounds")
            break
        first = args.warmup + round_index * args.steps
        for variant in variants:  # A B A B ...: the same batches, in the same order, for every model
            variant.times += [variant.train_step(batch) for batch in batches[first : first + args.steps]]

    tokens_per_step = args.batch_size * args.seq_len
    print(f"\n{'model':<30} {'step (median)':>14} {'tokens/s':>10} {'MFU*':>7}")
    rates = {}
    for variant in variants:
        step = statistics.median(variant.times)
        rates[variant.name] = tokens_per_step / step
        mfu = rates[variant.name] * per_token / best
        print(f"{variant.name:<30} {step * 1000:>11.0f} ms {rates[variant.name]:>10,.0f} {mfu:>6.1%}")
    peak_note = ", not a hardware peak" if device == "cpu" else ""
    print(f"* MFU: relative to the best fp32 matmul measured above{peak_note}")
    ratios = [(name, BASELINE) for name in rates if not name.startswith(BASELINE) and not name.endswith("compiled")]
    if args.compile:
        ratios += [("ours (fused loss), compiled", f"{BASELINE}, compiled"), ("ours (fused loss), compiled", BASELINE)]
    for name, reference in ratios:
        print(f"{name} / {reference}: {rates[name] / rates[reference]:.2f}x (interleaved medians)")


if __name__ == "__main__":
    main()
