"""Pretraining throughput: our model vs transformers' LlamaForCausalLM, side by side in one process.

    python benchmarks/pretrain_throughput.py                      # 24m preset, seq 512, ChatGLM3-sized vocab
    python benchmarks/pretrain_throughput.py --size 9m --steps 20 --batch-size 8

Both models get the identical configuration (the same weights, even), the same Trainer (`GuardedTrainer` with
the recipe's TrainingArguments), the same data (random token ids in a .bin read by `PretrainDataset`) and batch.
Prints tokens/s and MFU: 6·N·tokens (+ attention) FLOPs per second over the fp32 matmul peak that this script
measures on this machine first. On a GPU pass --precision bf16 (and --compile) to measure that path.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback, default_data_collator

from tiny_llama2_zh.data.pretokenized import Manifest, PretrainDataset
from tiny_llama2_zh.export import to_hf_llama
from tiny_llama2_zh.model import TinyLlama2ForCausalLM
from tiny_llama2_zh.presets import count_parameters, flops_per_token, preset_config
from tiny_llama2_zh.train.common import GuardedTrainer, TrainOptions, training_arguments


def measure_matmul_peak(size: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of a square matmul on this device (the denominator of MFU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def random_token_file(folder: Path, vocab_size: int, num_tokens: int) -> Path:
    path = folder / "random.bin"
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    np.random.default_rng(0).integers(3, vocab_size, num_tokens, dtype=np.int64).astype(dtype).tofile(path)
    manifest = Manifest(np.dtype(dtype).name, num_tokens, 1, vocab_size, 2, "random")
    Path(f"{path}.json").write_text(json.dumps(manifest.__dict__))
    return path


def time_training(model, dataset, args, steps: int, warmup: int) -> list[float]:
    timer = StepTimer()
    trainer = GuardedTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=default_data_collator, callbacks=[timer]
    )
    trainer.tokens_per_step = args.per_device_train_batch_size * len(dataset[0]["input_ids"])
    trainer.train()
    return timer.times[warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="24m", help="size preset (default: 24m)")
    parser.add_argument("--vocab-size", type=int, default=64798, help="vocabulary size (default: ChatGLM3's 64798)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default: 512)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step (default: 4)")
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps per model (default: 12)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="training precision")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--rounds", type=int, default=2, help="alternate the models this many times (default: 2)")
    args = parser.parse_args()

    threads = torch.get_num_threads()
    peak = measure_matmul_peak(dtype=torch.float32 if args.precision == "fp32" else torch.bfloat16)
    config = preset_config(args.size, args.vocab_size, max_position_embeddings=max(512, args.seq_len))
    per_token = flops_per_token(config, args.seq_len)
    print(
        f"device: {'cuda ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, "
        f"{threads} threads; measured matmul peak {peak / 1e9:.1f} GFLOP/s ({args.precision})"
    )
    print(
        f"model: {args.size} preset, {count_parameters(config)['total']:,} parameters, vocab {args.vocab_size}, "
        f"seq {args.seq_len}, batch {args.batch_size}; {per_token / 1e6:.1f} MFLOP per token"
    )

    with tempfile.TemporaryDirectory() as folder:
        total_steps = args.warmup + args.steps
        data = random_token_file(Path(folder), args.vocab_size, (args.seq_len - 1) * args.batch_size * total_steps + 1)
        dataset = PretrainDataset(data, args.seq_len)
        options = TrainOptions(
            output_dir=str(Path(folder) / "run"),
            max_steps=total_steps,
            per_device_batch_size=args.batch_size,
            warmup_steps=0,
            logging_steps=10**9,
            eval_steps=0,
            save_steps=10**9,
            report_to=[],
            precision=args.precision,
            torch_compile=args.compile,
        )
        training_args = training_arguments(options, disable_tqdm=True, save_strategy="no")
        torch.manual_seed(0)
        ours = TinyLlama2ForCausalLM(config)
        initial_state = {k: v.clone() for k, v in ours.state_dict().items()}
        results: dict[str, list[float]] = {
            "tiny_llama2 (ours, recipe)": [],
            "tiny_llama2 (ours, plain loss)": [],
            "transformers LlamaForCausalLM": [],
        }
        for _ in range(args.rounds):
            for name, chunk_rows in (("tiny_llama2 (ours, recipe)", 1024), ("tiny_llama2 (ours, plain loss)", None)):
                ours.load_state_dict(initial_state)
                ours.fused_loss_chunk_rows = chunk_rows
                results[name] += time_training(ours, dataset, training_args, args.steps, args.warmup)
            llama = to_hf_llama(ours)  # same weights, same config
            llama.load_state_dict(initial_state)
            llama.train()
            results["transformers LlamaForCausalLM"] += time_training(
                llama, dataset, training_args, args.steps, args.warmup
            )

    tokens_per_step = args.seq_len * args.batch_size
    print(f"\n{'model':<32} {'step (median)':>14} {'tokens/s':>10} {'MFU':>7}")
    rates = {}
    for name, times in results.items():
        step = statistics.median(times)
        rates[name] = tokens_per_step / step
        print(f"{name:<32} {step * 1000:>11.0f} ms {rates[name]:>10,.0f} {rates[name] * per_token / peak:>6.1%}")
    for name in ("tiny_llama2 (ours, recipe)", "tiny_llama2 (ours, plain loss)"):
        print(f"{name} / transformers Llama: {rates[name] / rates['transformers LlamaForCausalLM']:.2f}x")


if __name__ == "__main__":
    main()
