"""Does a reward model favour one sentiment label across reviews, and does a policy trained on it follow?

    python benchmarks/reward_label_bias.py --reward runs/demo/reward/final --data runs/demo/tasks \
        --model runs/demo/sft/final --model runs/demo/ppo/final

On the held-out sentiment pairs of `tinyllm data tasks`: the reward model's mean score of each label over all
reviews, how often it prefers 正面 and how often its preference is right; then, for each model, how often its greedy
reply says 正面 and how often it is right. A reward model can be right about each review half the time in each
direction and still score one label higher on average: a policy that cannot tell reviews apart well collects that
difference by shifting its label prior (reward hacking), which this script makes visible.
"""

import argparse
import json
from pathlib import Path

from transformers import AutoModelForSequenceClassification

from tiny_llama2_zh.eval.preferences import reward_scores
from tiny_llama2_zh.infer.generate import greedy_replies
from tiny_llama2_zh.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", required=True, help="a reward model folder")
    parser.add_argument("--data", required=True, help="the `tinyllm data tasks` folder")
    parser.add_argument("--model", action="append", default=[], help="a policy folder (repeatable)")
    parser.add_argument("--rows", type=int, default=200, help="held-out sentiment pairs to use (default 200)")
    args = parser.parse_args()

    lines = (Path(args.data) / "sentiment" / "preference-test.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines[: args.rows]]
    truth = [row["chosen"] for row in rows]
    reward, tokenizer = load_model(args.reward, auto_class=AutoModelForSequenceClassification)

    def ids(prompt: str, reply: str) -> list[int]:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
        return list(tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"])

    positive = reward_scores(reward, [ids(row["prompt"], "正面") for row in rows], tokenizer.pad_token_id)
    negative = reward_scores(reward, [ids(row["prompt"], "负面") for row in rows], tokenizer.pad_token_id)
    prefers = ["正面" if p > n else "负面" for p, n in zip(positive, negative, strict=True)]
    right = sum(p == t for p, t in zip(prefers, truth, strict=True)) / len(rows)
    print(f"{len(rows)} held-out reviews, {truth.count('正面') / len(rows):.1%} of them positive")
    print(
        f"reward model: mean score 正面 {positive.mean():+.3f}, 负面 {negative.mean():+.3f}; "
        f"prefers 正面 for {prefers.count('正面') / len(rows):.1%}, right for {right:.1%}"
    )
    for folder in args.model:
        model, model_tokenizer = load_model(folder)
        replies = greedy_replies(model, model_tokenizer, [[{"role": "user", "content": r["prompt"]}] for r in rows], 8)
        says = sum(reply.startswith("正面") for reply in replies) / len(rows)
        correct = sum(reply.startswith(t) for reply, t in zip(replies, truth, strict=True)) / len(rows)
        print(f"{folder}: says 正面 for {says:.1%}, right for {correct:.1%} (greedy; reply starts with the label)")


if __name__ == "__main__":
    main()
