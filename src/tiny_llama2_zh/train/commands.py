"""`tinyllm` commands of the training floor: the recipes (pretrain, sft, reward, ppo, rloo, dpo, grpo), `reward
score`, `lora merge`, `plot` and `sizes`. Light at import (the recipe modules load when a command runs), so
`--help` answers at once.
"""

import argparse
import json

from tiny_llama2_zh.recipes import RECIPES


def add_sizes_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", help="tokenizer folder whose vocabulary size the counts use")
    source.add_argument("--vocab-size", type=int, help="vocabulary size, instead of a tokenizer folder")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_sizes(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.presets import PRESETS, count_parameters, preset_config

    vocab_size = args.vocab_size
    if args.tokenizer:
        from tiny_llama2_zh.tokenizer import load_tokenizer

        vocab_size = len(load_tokenizer(args.tokenizer))
    rows = []
    for name, preset in PRESETS.items():
        counts = count_parameters(preset_config(name, vocab_size))
        rows.append({"preset": name, **vars(preset), "vocab_size": vocab_size, **counts})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"{'preset':>6} {'dim':>5} {'layers':>6} {'heads':>5} {'kv':>3} {'ctx':>5} {'embedding':>12} "
        f"{'non-embedding':>14} {'total':>12}"
    )
    for row in rows:
        print(
            f"{row['preset']:>6} {row['dim']:>5} {row['n_layers']:>6} {row['n_heads']:>5} {row['n_kv_heads']:>3} "
            f"{row['max_seq_len']:>5} {row['embedding']:>12,} {row['non_embedding']:>14,} {row['total']:>12,}"
        )


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    from tiny_llama2_zh.train.plan import CHATGLM3_VOCAB_SIZE

    parser.add_argument("--size", required=True, help="a size preset: 9m, 24m, 58m, 134m, 256m")
    parser.add_argument("--tokens", required=True, type=float, help="training tokens, e.g. 19e9")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs in all (DDP or ZeRO over all of them)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to plan with (0.4)")
    parser.add_argument("--gpu", default="h100", help="h100, h200, a100, a800, l40s, 4090 (dense bf16 peak)")
    parser.add_argument("--vocab-size", type=int, default=CHATGLM3_VOCAB_SIZE, help="default: ChatGLM3's")
    parser.add_argument("--seq-len", type=int, help="default: the size's pretraining recipe")
    parser.add_argument("--micro-batch", type=int, help="sequences per GPU per micro-step; default: the recipe's")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_plan(args: argparse.Namespace) -> None:
    import dataclasses

    from tiny_llama2_zh.train.plan import make_plan, plan_table

    plan = make_plan(
        args.size, args.tokens, args.gpus, args.mfu, args.gpu, args.vocab_size, args.seq_len, args.micro_batch
    )
    if args.json:
        print(json.dumps({**dataclasses.asdict(plan), "total_flops": plan.total_flops, "hours": plan.hours}, indent=2))
    else:
        print(plan_table(plan))


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    stage = parser.prog.split()[-1]
    parser.add_argument("--config", required=True, help=f"recipe YAML, e.g. {RECIPES[stage].shipped_config}")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in train.output_dir from its newest complete checkpoint (same as resume=true)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="override any YAML value, e.g. train.max_steps=100 train.learning_rate=3e-4",
    )


def run_recipe(args: argparse.Namespace) -> None:
    stage = args.command
    recipe = RECIPES[stage]
    result = recipe.run(recipe.load(args.config, [*args.overrides, *(["resume=true"] if args.resume else [])]))
    if result is not None:
        print(
            f"{stage}: {result['steps']} steps in {result['train_seconds']:.0f}s; final model: "
            f"{result['final_model_dir']}; validation loss "
            f"{result['initial_validation_loss']} -> {result['final_validation_loss']}"
        )


def add_reward_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a reward model folder (a reward run's final/)")
    parser.add_argument("--prompt", required=True, help="the user's message")
    parser.add_argument(
        "--response", required=True, nargs="+", help="one or more replies to score (each gets its own line)"
    )


def run_reward_score(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.eval.preferences import score_replies

    for response, score in zip(args.response, score_replies(args.model, args.prompt, args.response)):
        print(f"{score:+.4f}\t{response}")


def add_lora_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="a LoRA adapter folder (an SFT run's final/ with model.lora)")
    parser.add_argument("--output", required=True, help="folder for the merged model (must be new or empty)")
    parser.add_argument("--base", help="the base model folder (default: the one recorded in the adapter)")


def run_lora_merge(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.train.lora import merge_adapter

    print(f"wrote the merged model to {merge_adapter(args.adapter, args.output, args.base)}")


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a training run folder (holds metrics.jsonl)")
    parser.add_argument("--output", help="PNG path (default: RUN_DIR/loss.png)")


def run_plot(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.runfiles import plot_curves

    print(f"wrote {plot_curves(args.run_dir, args.output)}")
