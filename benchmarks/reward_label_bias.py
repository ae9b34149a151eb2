"""Does a reward model favour one sentiment label across reviews, and does a policy trained on it follow?

    python benchmarks/reward_label_bias.py --reward runs/demo/reward/final --data runs/demo/tasks \
        --model runs/demo/sft/final --model runs/demo/ppo/final

On the held-out sentiment reviews of `tinyllm data tasks`, the rows `tinyllm eval tasks --limit N` scores: the
reward model's mean score of each label over all reviews, how often it prefers 正面 and how often its preference is
right; then, for each model, how often its greedy reply says 正面 and how often it is right, and the most it could
be right by a change of label prior alone: its log-prob margin log P(正面) - log P(负面) (each reply through the chat
template, eos included) thresholded at the best single offset. When that ceiling is little above the greedy
accuracy, the model's errors are in telling reviews apart, not in how often it says each label. A reward model can
be right about each review half the time in each direction and still score one label higher on average: a policy
that cannot tell reviews apart well collects that difference by shifting its label prior (reward hacking), which
this script makes visible.
"""

import argparse
from itertools import pairwise
from pathlib import Path

from transformers import AutoModelForSequenceClassification

from tiny_llama2_zh.eval.multiple_choice import chat_pair, encoded_loglikelihoods
from tiny_llama2_zh.eval.preferences import reward_scores
from tiny_llama2_zh.eval.tasks import limit_rows, read_task_file
from tiny_llama2_zh.infer.generate import greedy_replies
from tiny_llama2_zh.loading import load_model
from tiny_llama2_zh.tokenizer import chat_ids


def best_offset_accuracy(margins: list[float], positive: list[bool]) -> tuple[float, float]:
    """(accuracy, offset): the best share of rows where `margin > offset` equals `positive`, over every offset
    (between any two sorted margins, below all and above all)."""
    values = sorted(set(margins))
    offsets = [values[0] - 1.0, *((a + b) / 2 for a, b in pairwise(values)), values[-1] + 1.0]
    scored = [(sum((m > offset) == p for m, p in zip(margins, positive, strict=True)), offset) for offset in offsets]
    right, offset = max(scored, key=lambda pair: (pair[0], -abs(pair[1])))
    return right / len(margins), offset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", required=True, help="a reward model folder")
    parser.add_argument("--data", required=True, help="the `tinyllm data tasks` folder")
    parser.add_argument("--model", action="append", default=[], help="a policy folder (repeatable)")
    parser.add_argument(
        "--rows",
        type=int,
        default=200,
        help="held-out reviews, picked as `tinyllm eval tasks --limit` picks them (default 200)",
    )
    args = parser.parse_args()

    held_out = read_task_file(Path(args.data) / "sentiment" / "sft-test.jsonl", "sentiment").rows
    rows = limit_rows(held_out, args.rows)  # the rows `tinyllm eval tasks --limit` scores
    truth = [row.reference for row in rows]
    reward, tokenizer = load_model(args.reward, auto_class=AutoModelForSequenceClassification)

    def replied(reply: str) -> list[list[int]]:
        return [chat_ids(tokenizer, [*row.conversation, {"role": "assistant", "content": reply}]) for row in rows]

    positive = reward_scores(reward, replied("正面"), tokenizer.pad_token_id)
    negative = reward_scores(reward, replied("负面"), tokenizer.pad_token_id)
    prefers = ["正面" if p > n else "负面" for p, n in zip(positive, negative, strict=True)]
    right = sum(p == t for p, t in zip(prefers, truth, strict=True)) / len(rows)
    print(f"{len(rows)} held-out reviews, {truth.count('正面') / len(rows):.1%} of them positive")
    print(
        f"reward model: mean score 正面 {positive.mean():+.3f}, 负面 {negative.mean():+.3f}; "
        f"prefers 正面 for {prefers.count('正面') / len(rows):.1%}, right for {right:.1%}"
    )
    for folder in args.model:
        model, model_tokenizer = load_model(folder)
        replies = greedy_replies(model, model_tokenizer, [row.conversation for row in rows], 8)
        says = sum(reply.startswith("正面") for reply in replies) / len(rows)
        correct = sum(reply.startswith(t) for reply, t in zip(replies, truth, strict=True)) / len(rows)
        print(f"{folder}: says 正面 for {says:.1%}, right for {correct:.1%} (greedy; reply starts with the label)")
        scores = {
            label: encoded_loglikelihoods(
                model, model_tokenizer, [chat_pair(model_tokenizer, row.prompt, label) for row in rows]
            )
            for label in ("正面", "负面")
        }
        margins = [p - n for p, n in zip(scores["正面"], scores["负面"], strict=True)]
        at_zero = sum((m > 0) == (t == "正面") for m, t in zip(margins, truth, strict=True)) / len(rows)
        ceiling, offset = best_offset_accuracy(margins, [t == "正面" for t in truth])
        print(
            f"{' ' * len(folder)}  log-prob margin: right for {at_zero:.1%} at 0; at the best offset ({offset:+.2f} "
            f"nats) {ceiling:.1%}, the most a change of label prior alone could give"
        )


if __name__ == "__main__":
    main()
