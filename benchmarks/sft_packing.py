"""SFT throughput, packed vs padded, on the demo SFT set (the three demo tasks), with the demo model's shape.

    python benchmarks/sft_packing.py                # 60 steps each, batch 16, max_length 256
    python benchmarks/sft_packing.py --steps 30 --tokenizer runs/demo/tokenizer

Both runs use the same recipe (`tinyllm sft` on TRL's SFTTrainer, assistant-only loss), the same random-initialised
model and the same examples; only `train.packing` differs. Real tokens/s counts the tokens of the conversations
(not padding), from the Trainer's own `num_input_tokens_seen` (non-padding), over the timed steps after warm-up.
Packing (best-fit decreasing, TRL's default) puts several conversations in one row, each attending to itself only
(block-diagonal attention from `position_ids`), so no work is spent on padding.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from tiny_llama2_zh.config import load_config
from tiny_llama2_zh.data.demo_corpus import build_demo_corpus
from tiny_llama2_zh.data.tasks import TASKS, build_tasks
from tiny_llama2_zh.demo import DEMO_VOCAB_SIZE
from tiny_llama2_zh.loading import save_model_folder
from tiny_llama2_zh.model import TinyLlama2ForCausalLM
from tiny_llama2_zh.recipes import RECIPES
from tiny_llama2_zh.tokenizer import load_tokenizer, train_bpe_tokenizer
from tiny_llama2_zh.train.pretrain import PretrainConfig, build_model_config
from tiny_llama2_zh.train.sft import SFTRecipeConfig, sft


class Clock(TrainerCallback):
    """Time and tokens at the end of the warm-up step and at the end of training."""

    def __init__(self, warmup: int):
        self.warmup, self.marks = warmup, {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (self.warmup, state.max_steps):
            self.marks[state.global_step] = (time.perf_counter(), state.num_input_tokens_seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default: 60)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps (default: 5)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per step (default: 16)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per row (default: 256)")
    parser.add_argument("--tokenizer", help="a tokenizer folder (default: train the demo's on the demo corpus)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sft_packing_"))
    if args.tokenizer is None:
        build_demo_corpus(work / "corpus")
        train_bpe_tokenizer([work / "corpus" / "train.jsonl"], DEMO_VOCAB_SIZE, work / "tokenizer")
        args.tokenizer = str(work / "tokenizer")
    tokenizer = load_tokenizer(args.tokenizer)
    build_tasks(work / "tasks")
    shape = load_config(PretrainConfig, RECIPES["pretrain"].demo_config()).model  # the demo model's shape
    config = build_model_config(shape, tokenizer)
    torch.manual_seed(0)
    save_model_folder(TinyLlama2ForCausalLM(config), tokenizer, work / "model")

    print(f"device: cpu, {torch.get_num_threads()} threads; batch {args.batch_size} x {args.max_length} tokens")
    print(f"{'mode':<8} {'steps':>5} {'real tokens/s':>14} {'rows':>6} {'real tokens/step':>17}")
    results = {}
    for packing in (False, True):
        clock = Clock(args.warmup)
        recipe = load_config(
            SFTRecipeConfig,
            RECIPES["sft"].demo_config(),
            [
                f"model.init_from={work / 'model'}",
                f"data.train={[str(work / 'tasks' / task / 'sft-train.jsonl') for task in TASKS]}",
                "data.validation=null",
                f"data.max_train_examples={args.steps * args.batch_size * 8}",
                f"train.output_dir={work / ('packed' if packing else 'padded')}",
                f"train.max_steps={args.steps}",
                f"train.per_device_train_batch_size={args.batch_size}",
                f"train.max_length={args.max_length}",
                f"train.packing={str(packing).lower()}",
                "train.eval_steps=0",
                "train.save_steps=100000",
                "train.report_to=[]",
                "sample_prompts=[]",
            ],
        )
        sft(recipe, callbacks=[clock])
        (start, tokens_start), (end, tokens_end) = clock.marks[args.warmup], clock.marks[args.steps]
        rate = (tokens_end - tokens_start) / (end - start)
        state = json.loads((work / ("packed" if packing else "padded") / "summary.json").read_text())
        name = "packed" if packing else "padded"
        results[name] = rate
        print(
            f"{name:<8} {args.steps:>5} {rate:>14,.0f} {args.batch_size:>6} {state['tokens_seen'] / args.steps:>17,.0f}"
        )
    print(f"packed / padded: {results['packed'] / results['padded']:.2f}x real tokens/s")


if __name__ == "__main__":
    main()
