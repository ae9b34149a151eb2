"""How well a model separates preference pairs: the reward model's held-out pair accuracy and margin, per source,
with a calibration view, beside the baselines a reward model has to beat.

A pair counts as right when the chosen reply scores above the rejected one; a tie counts half (a coin flip).
Baselines, scored on the same pairs:
- length: the longer reply is preferred (a known shortcut of preference data; Singhal et al. 2023);
- the SFT model's log-probability of each reply, summed and per token: what the policy already prefers, before any
  reward model (DPO's implicit reward at the reference is zero, so this is also where DPO starts).
Calibration: a Bradley-Terry reward model predicts P(chosen wins) = sigmoid(margin); grouping pairs by that
confidence and comparing it with the accuracy observed in each group shows whether its margins mean what they say.
Per label: for a source whose replies are a small label set (`eval.tasks.label_set`: sentiment's 正面/负面), the
mean score each label gets over every held-out pair it is in, chosen or rejected. The pairs hold each label as
often on either side, so a gap between the labels' means is a prior the scorer has for a label whatever the review
says -- one a policy could gain by shifting its own label prior rather than by reading the review.
"""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.eval.markdown import percent, table
from tiny_llama2_zh.tensors import eval_mode, token_log_probs
from tiny_llama2_zh.tokenizer import chat_ids

CONFIDENCE_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class TokenizedPair:
    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_length: int  # the tokens before the reply (the prompt with the template's assistant opening)
    source: str
    chosen_text: str = ""  # the replies as text, for the per-label report
    rejected_text: str = ""


def tokenize_pairs(rows: list[dict], tokenizer: PreTrainedTokenizerBase) -> list[TokenizedPair]:
    """Rows from `data.preferences.load_preferences` as token ids, through the chat template."""
    pairs = []
    for row in rows:
        prompt_ids = chat_ids(tokenizer, row["prompt"], generation_prompt=True)
        chosen_ids = chat_ids(tokenizer, [*row["prompt"], *row["chosen"]])
        if chosen_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError("the chat template renders a prompt differently when a reply follows it")
        rejected_ids = chat_ids(tokenizer, [*row["prompt"], *row["rejected"]])
        texts = ("".join(m["content"] for m in row[side]).strip() for side in ("chosen", "rejected"))
        pairs.append(TokenizedPair(chosen_ids, rejected_ids, len(prompt_ids), row["source"], *texts))
    return pairs


def _batches(sequences: list[list[int]], batch_size: int, pad_id: int, device):
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in chunk], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=device)
        yield ids, mask


@torch.no_grad()
def reward_scores(
    model: PreTrainedModel, sequences: list[list[int]], pad_id: int, batch_size: int = 64
) -> torch.Tensor:
    """A sequence-classification model's score of each sequence (read at its last token), as a float CPU tensor."""
    with eval_mode(model):
        scores = [
            model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float().cpu()
            for ids, mask in _batches(sequences, batch_size, pad_id, model.device)
        ]
    return torch.cat(scores)


@torch.no_grad()
def reply_log_probs(
    model: PreTrainedModel, sequences: list[list[int]], prompt_lengths: list[int], pad_id: int, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal LM's summed log-probability of each sequence's reply tokens (after `prompt_length`), and their count."""
    sums, counts = [], []
    start = 0
    for ids, mask in _batches(sequences, batch_size, pad_id, model.device):
        token_logp = token_log_probs(model(input_ids=ids, attention_mask=mask).logits[:, :-1], ids[:, 1:])  # (B, T-1)
        positions = torch.arange(1, ids.shape[1], device=ids.device)[None, :]
        lengths = torch.tensor(prompt_lengths[start : start + len(ids)], device=ids.device)[:, None]
        reply = (positions >= lengths) & mask[:, 1:].bool()
        sums.append((token_logp * reply).sum(-1).cpu())
        counts.append(reply.sum(-1).cpu())
        start += len(ids)
    return torch.cat(sums), torch.cat(counts)


def _accuracy(margins: torch.Tensor) -> float:
    return float(((margins > 0).float() + 0.5 * (margins == 0).float()).mean()) if len(margins) else float("nan")


def per_label_scores(
    chosen: Sequence[float], rejected: Sequence[float], replies: Sequence[tuple[str, str]]
) -> dict[str, dict] | None:
    """For pairs whose reply texts are a label set: each label's mean score over every pair it is in, chosen or
    rejected, and its mean as the chosen and as the rejected reply (None where it never was one); None when the
    replies are not a label set."""
    from tiny_llama2_zh.eval.tasks import label_set

    labels = label_set([text for pair in replies for text in pair])
    if labels is None:
        return None
    mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    result = {}
    for label in labels:
        as_chosen = [float(score) for score, (text, _) in zip(chosen, replies) if text == label]
        as_rejected = [float(score) for score, (_, text) in zip(rejected, replies) if text == label]
        result[label] = {
            "replies": len(as_chosen) + len(as_rejected),
            "mean_score": mean(as_chosen + as_rejected),
            "mean_as_chosen": mean(as_chosen),
            "mean_as_rejected": mean(as_rejected),
        }
    return result


def pair_report(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    sources: list[str],
    calibrate: bool = False,
    replies: Sequence[tuple[str, str]] | None = None,
) -> dict:
    """Accuracy, mean margin and pair count, overall and per source; with `calibrate`, the Bradley-Terry
    calibration buckets and the pairwise loss too; with the (chosen, rejected) reply texts, `per_label` under each
    source whose replies are a label set (`per_label_scores`)."""
    margins = chosen - rejected
    report: dict = {"pairs": len(margins), "accuracy": _accuracy(margins), "margin": float(margins.mean())}
    report["per_source"] = {}
    for source in sorted(set(sources)):
        picked = torch.tensor([s == source for s in sources])
        report["per_source"][source] = {
            "pairs": int(picked.sum()),
            "accuracy": _accuracy(margins[picked]),
            "margin": float(margins[picked].mean()),
        }
        if replies is not None:
            indices = [i for i, s in enumerate(sources) if s == source]
            labels = per_label_scores(
                chosen[indices].tolist(), rejected[indices].tolist(), [replies[i] for i in indices]
            )
            if labels is not None:
                report["per_source"][source]["per_label"] = labels
    if calibrate:
        report["loss"] = float(-torch.nn.functional.logsigmoid(margins).mean())
        confidence = torch.sigmoid(margins.abs())
        buckets = []
        for low, high in itertools.pairwise(CONFIDENCE_BUCKETS):
            inside = (confidence >= low) & ((confidence < high) | (high == 1.0))
            if inside.any():
                buckets.append(
                    {
                        "confidence": f"{low:.1f}-{high:.1f}",
                        "pairs": int(inside.sum()),
                        "predicted": float(confidence[inside].mean()),
                        "accuracy": _accuracy(margins[inside]),
                    }
                )
        report["calibration"] = buckets
    return report


def score_replies(model_dir: str, prompt: str, replies: list[str]) -> list[float]:
    """A reward model folder's score of each reply to one user message (through the chat template)."""
    from transformers import AutoModelForSequenceClassification

    from tiny_llama2_zh.loading import load_model

    model, tokenizer = load_model(model_dir, auto_class=AutoModelForSequenceClassification)
    if model.config.num_labels != 1:
        raise UsageError(f"{model_dir} has {model.config.num_labels} outputs; a reward model has one")
    user = [{"role": "user", "content": prompt}]
    sequences = [chat_ids(tokenizer, [*user, {"role": "assistant", "content": reply}]) for reply in replies]
    return reward_scores(model, sequences, tokenizer.pad_token_id).tolist()


def reward_model_report(model: PreTrainedModel, pairs: list[TokenizedPair], pad_id: int, batch_size: int = 64) -> dict:
    chosen = reward_scores(model, [p.chosen_ids for p in pairs], pad_id, batch_size)
    rejected = reward_scores(model, [p.rejected_ids for p in pairs], pad_id, batch_size)
    replies = [(p.chosen_text, p.rejected_text) for p in pairs]
    return pair_report(chosen, rejected, [p.source for p in pairs], calibrate=True, replies=replies)


def baseline_reports(policy: PreTrainedModel | None, pairs: list[TokenizedPair], pad_id: int) -> dict[str, dict]:
    """The length baseline, and with a policy its summed and per-token reply log-probability preferences."""
    sources = [p.source for p in pairs]
    lengths = {side: torch.tensor([len(getattr(p, f"{side}_ids")) for p in pairs]) for side in ("chosen", "rejected")}
    reports = {"longer reply": pair_report(lengths["chosen"].float(), lengths["rejected"].float(), sources)}
    if policy is not None:
        prompt_lengths = [p.prompt_length for p in pairs]
        chosen_sum, chosen_count = reply_log_probs(policy, [p.chosen_ids for p in pairs], prompt_lengths, pad_id)
        rejected_sum, rejected_count = reply_log_probs(policy, [p.rejected_ids for p in pairs], prompt_lengths, pad_id)
        reports["SFT log-prob (sum)"] = pair_report(chosen_sum, rejected_sum, sources)
        reports["SFT log-prob (per token)"] = pair_report(
            chosen_sum / chosen_count.clamp(min=1), rejected_sum / rejected_count.clamp(min=1), sources
        )
    return reports


def flat_metrics(report: dict, prefix: str = "eval") -> dict[str, float]:
    """A report as log keys: eval_accuracy, eval_margin, eval_loss, eval_<source>_accuracy, ..."""
    metrics = {f"{prefix}_{key}": report[key] for key in ("accuracy", "margin", "loss") if key in report}
    for source, values in report["per_source"].items():
        metrics[f"{prefix}_{source}_accuracy"] = values["accuracy"]
        metrics[f"{prefix}_{source}_margin"] = values["margin"]
    return metrics


def markdown_table(reports: dict[str, dict]) -> str:
    """Rows: scorers (baselines, reward models); columns: accuracy per source and overall, mean margin."""
    sources = sorted({source for report in reports.values() for source in report["per_source"]})
    header = ["scorer", *(f"{s} acc" for s in sources), "all acc", "pairs"]
    rows = [
        (name, *(percent(report["per_source"].get(s, {}).get("accuracy")) for s in sources),
         percent(report["accuracy"]), report["pairs"])
        for name, report in reports.items()
    ]  # fmt: skip
    return table(header, rows)


def per_label_table(reports: dict[str, dict]) -> str | None:
    """Rows: (scorer, source, label) for every source with `per_label`; the mean score of the label's replies, and
    as chosen / as rejected. None when no report has one."""
    rows = [
        (name, source, label, values["replies"], *(_score(values[key]) for key in
         ("mean_score", "mean_as_chosen", "mean_as_rejected")))
        for name, report in reports.items()
        for source, figures in report["per_source"].items()
        for label, values in figures.get("per_label", {}).items()
    ]  # fmt: skip
    if not rows:
        return None
    return table(("scorer", "source", "reply", "replies", "mean score", "as chosen", "as rejected"), rows, left=3)


def _score(value: float | None) -> str:
    return "—" if value is None else f"{value:+.3f}"


def calibration_table(report: dict) -> str:
    rows = [
        (bucket["confidence"], bucket["pairs"], percent(bucket["predicted"]), percent(bucket["accuracy"]))
        for bucket in report["calibration"]
    ]
    return table(("confidence sigmoid(\\|margin\\|)", "pairs", "predicted", "observed accuracy"), rows)
