"""`tinyllm eval policies`: several policies side by side on held-out prompts, measured the way PPO, RLOO and DPO
measure themselves during training: the reward model's mean score of sampled replies, the KL to a reference
policy (summed over each reply's tokens, the k1 estimate) and the reply length, all with one sampling seed.

It lives on the training floor because the measure is the RL stages' own (`held_out_metrics`); evaluation of
answers against references is `tinyllm eval tasks`.
"""

import argparse
import json
from pathlib import Path

from tiny_llama2_zh.eval.markdown import table


def compare_policies(
    model_dirs: list[str | Path],
    reference_dir: str | Path,
    reward_model_dir: str | Path,
    prompt_files: list[str],
    max_prompts: int = 64,
    max_prompt_length: int = 192,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    seed: int = 1337,
) -> dict:
    """{"rows": [{"model": dir, "eval_score": ..., "eval_kl": ..., ...}], settings...} for each policy."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import tiny_llama2_zh.model  # noqa: F401  (registers the model with the Auto classes)
    from tiny_llama2_zh.data.conversations import load_prompts
    from tiny_llama2_zh.loading import check_model_folder, same_tokenizer_or_refuse
    from tiny_llama2_zh.tokenizer import load_tokenizer
    from tiny_llama2_zh.train.rl import held_out_metrics, open_ended_judge, prompt_ids, reward_model_function

    for folder in (*model_dirs, reference_dir, reward_model_dir):
        check_model_folder(folder)
    for folder in (*model_dirs, reward_model_dir):
        same_tokenizer_or_refuse(reference_dir, folder)
    tokenizer = load_tokenizer(reference_dir)
    rows, report = load_prompts(prompt_files, tokenizer, max_prompt_length, max_prompts)
    if not rows:
        raise FileNotFoundError(f"no usable prompts in {', '.join(map(str, prompt_files))}: {report.summary()}")
    prompts = prompt_ids(rows, tokenizer)
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(reference_dir).eval()
    measured = []
    for folder in model_dirs:
        policy = AutoModelForCausalLM.from_pretrained(folder).eval()
        metrics = held_out_metrics(
            policy, reference, reward_model_function(reward_model), prompts, tokenizer, max_new_tokens, temperature,
            seed=seed, judge=open_ended_judge(rows),
        )  # fmt: skip
        measured.append({"model": str(folder), **metrics})
    return {
        "rows": measured,
        "reference": str(reference_dir),
        "reward_model": str(reward_model_dir),
        "prompts": len(prompts),
        "prompt_files": [str(path) for path in prompt_files],
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
    }


def markdown_table(result: dict) -> str:
    """One row per policy; the judge's metrics (open-ended prompts: `train.rl.open_ended_judge`) as extra columns."""
    judged = [key for key in result["rows"][0] if key.startswith("eval_judge_")] if result["rows"] else []
    rows = [
        (Path(row["model"]).parent.name, f"{row['eval_score']:+.3f}", f"{row['eval_kl']:.3f}",
         f"{row['eval_response_length']:.1f}", f"{row['eval_ended_fraction']:.0%}",
         *(f"{row[key]:.3g}" for key in judged))
        for row in result["rows"]
    ]  # fmt: skip
    headers = ("policy", "reward-model score", "KL to reference (nats / reply)", "reply length", "replies ended")
    return table((*headers, *(f"judge: {key.removeprefix('eval_judge_')}" for key in judged)), rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True, metavar="DIR", help="a policy folder; repeatable")
    parser.add_argument("--reference", required=True, help="the reference policy for the KL (e.g. the SFT model)")
    parser.add_argument("--reward-model", required=True, help="the reward model that scores the replies")
    parser.add_argument("--prompts", nargs="+", required=True, help="held-out chat or preference JSONL files")
    parser.add_argument("--max-prompts", type=int, default=64, help="prompts per file at most (default: 64)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="reply length at most (default: 32)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    parser.add_argument("--seed", type=int, default=1337, help="sampling seed, the same for every policy")
    parser.add_argument("--output", help="folder for policies.json and policies.md (default: print only)")


def run(args: argparse.Namespace) -> None:
    result = compare_policies(
        args.model, args.reference, args.reward_model, args.prompts, args.max_prompts,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
    )  # fmt: skip
    table = markdown_table(result)
    print(table)
    if args.output:
        output = Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        (output / "policies.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        (output / "policies.md").write_text(table + "\n", encoding="utf-8")
        print(f"wrote {output / 'policies.json'} and {output / 'policies.md'}")
