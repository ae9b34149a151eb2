"""How well a model separates preference pairs: the reward model's held-out pair accuracy and margin, per source,
with a calibration view, beside the baselines a reward model has to beat.

A pair counts as right when the chosen reply scores above the rejected one; a tie counts half (a coin flip).
Baselines, scored on the same pairs:
- length: the longer reply is preferred (a known shortcut of preference data; Singhal et al. 2023);
- the SFT model's log-probability of each reply, summed and per token: what the policy already prefers, before any
  reward model (DPO's implicit reward at the reference is zero, so this is also where DPO starts).
Calibration: a Bradley-Terry reward model predicts P(chosen wins) = sigmoid(margin); grouping pairs by that
confidence and comparing it with the accuracy observed in each group shows whether its margins mean what they say.
"""

import itertools
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


def tokenize_pairs(rows: list[dict], tokenizer: PreTrainedTokenizerBase) -> list[TokenizedPair]:
    """Rows from `data.preferences.load_preferences` as token ids, through the chat template."""
    pairs = []
    for row in rows:
        prompt_ids = chat_ids(tokenizer, row["prompt"], generation_prompt=True)
        chosen_ids = chat_ids(tokenizer, [*row["prompt"], *row["chosen"]])
        if chosen_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError("the chat template renders a prompt differently when a reply follows it")
        rejected_ids = chat_ids(tokenizer, [*row["prompt"], *row["rejected"]])
        pairs.append(TokenizedPair(chosen_ids, rejected_ids, len(prompt_ids), row["source"]))
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


def pair_report(chosen: torch.Tensor, rejected: torch.Tensor, sources: list[str], calibrate: bool = False) -> dict:
    """Accuracy, mean margin and pair count, overall and per source; with `calibrate`, the Bradley-Terry
    calibration buckets and the pairwise loss too."""
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
    return pair_report(chosen, rejected, [p.source for p in pairs], calibrate=True)


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


def calibration_table(report: dict) -> str:
    rows = [
        (bucket["confidence"], bucket["pairs"], percent(bucket["predicted"]), percent(bucket["accuracy"]))
        for bucket in report["calibration"]
    ]
    return table(("confidence sigmoid(\\|margin\\|)", "pairs", "predicted", "observed accuracy"), rows)
