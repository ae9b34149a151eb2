"""What the reinforcement-learning stages share: PPO (`train/ppo.py`), RLOO (`train/rloo.py`), GRPO
(`train/grpo.py`), and every comparison of their policies (DPO's reply check, the demo's side-by-side table). The
recipes import from here and never from each other.

- The folders a stage starts from (`training_folders`): float model folders (a quantised one is refused, naming
  the folder it was quantised from, as sft, reward and dpo refuse it) that share the policy's tokenizer.
- Rollout prompts (`PromptDataOptions`, `load_rollout_prompts`, `prompt_ids`): read from chat or preference files
  by `data.conversations.load_prompts`, the held-out ones beside them, as ids through the chat template; refused
  before the run folder exists when fewer are usable than one step samples from (`check_enough_prompts`: TRL's
  sampler drops an incomplete batch, so RLOO and GRPO would train 0 steps and fail only at the end).
- Sampled replies scored token by token (`sample_and_score`): replies sampled with the KV cache, masked after
  their first end-of-turn token, and their log-probabilities under the policy and under the frozen reference. Their
  difference per token is the k1 estimate of the KL to the reference (Schulman 2020, "Approximating KL
  divergence"), the penalty in PPO's reward and the KL every held-out measure reports.
- The held-out measure (`held_out_metrics`): reward-model score, KL to the reference, length and the fraction of
  replies that ended, on replies sampled as in training.
"""

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments

from tiny_llama2_zh.config import ConfigError
from tiny_llama2_zh.data.conversations import load_prompts
from tiny_llama2_zh.data.jsonl import ReadReport
from tiny_llama2_zh.data.tasks import TASKS
from tiny_llama2_zh.infer.generate import left_pad, position_ids_of, sample_replies, turn_end_ids
from tiny_llama2_zh.loading import check_model_folder, refuse_quantized, same_tokenizer_or_refuse
from tiny_llama2_zh.tensors import eval_mode, token_log_probs
from tiny_llama2_zh.tokenizer import chat_ids

# (sequences (B, T), attention mask (B, T), position ids (B, T), prompt width P) -> one score per sequence (B,)
RewardFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


# ---------------------------------------------------------------------------------------------- folders
def training_folders(policy: str | Path, *scorers: str | Path) -> list[Path]:
    """The policy's folder and the folders that score it (reward model, value model), checked before anything is
    written: each a saved float model folder, each made with the policy's tokenizer."""
    folders = [check_model_folder(folder) for folder in (policy, *scorers)]
    for folder in folders:
        refuse_quantized(folder, "training")
    for other in dict.fromkeys(folders[1:]):
        same_tokenizer_or_refuse(folders[0], other)
    return folders


# ---------------------------------------------------------------------------------------------- prompts
@dataclass
class PromptDataOptions:
    prompts: str | list[str]  # chat JSONL ({"messages"}: the prompt is what precedes the last reply) or {"prompt"}
    validation: str | list[str] | None = None  # held-out prompts, measured before, during and after training
    max_prompt_length: int = 192
    max_train_prompts: int | None = None  # per file
    max_validation_prompts: int = 64  # per file


@dataclass
class RolloutPrompts:
    train: list[dict]  # load_prompts rows: {"prompt": [messages], "source", "reference"}
    train_report: ReadReport
    held_out: list[dict]
    held_out_report: ReadReport | None


def load_rollout_prompts(data: PromptDataOptions, tokenizer: PreTrainedTokenizerBase) -> RolloutPrompts:
    """The training prompts and the held-out ones (none without `data.validation`), each file's counts printed."""
    train, train_report = load_prompts(data.prompts, tokenizer, data.max_prompt_length, data.max_train_prompts)
    print(f"prompts: {train_report.summary()}")
    held_out, held_out_report = [], None
    if data.validation:
        held_out, held_out_report = load_prompts(
            data.validation, tokenizer, data.max_prompt_length, data.max_validation_prompts
        )
        print(f"held-out prompts: {held_out_report.summary()}")
    return RolloutPrompts(train, train_report, held_out, held_out_report)


def check_enough_prompts(usable: int, needed: int, why: str) -> None:
    """Refuse, before the run starts, a prompt set smaller than what one step samples from: PPO's rollout would
    repeat prompts within a batch, and TRL's `RepeatSampler` drops an incomplete batch, so RLOO and GRPO would
    train 0 steps and fail only at the end."""
    if usable < needed:
        raise ConfigError(
            f"data.prompts: {usable} usable prompts, fewer than the {needed} that one step needs ({why}); "
            "add prompts or make the batch smaller"
        )


def prompts_per_generation(args: TrainingArguments) -> tuple[int, str]:
    """The distinct prompts one generation batch of a TRL RL trainer (RLOOConfig, GRPOConfig) samples from, and
    why: `generation_batch_size` replies (per_device_train_batch_size x processes x steps_per_generation), each
    prompt `num_generations` times."""
    needed = args.generation_batch_size // args.num_generations
    return needed, (
        f"{args.generation_batch_size} replies per generation batch = {needed} prompts x "
        f"train.num_generations {args.num_generations}"
    )


def prompt_ids(rows: list[dict], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Each row's prompt messages as ids, followed by the assistant's opening: what a policy answers."""
    return [chat_ids(tokenizer, row["prompt"], generation_prompt=True) for row in rows]


# ---------------------------------------------------------------------------------------------- replies
@dataclass
class SampledReplies:
    """A batch of sampled replies with their log-probabilities (replies are R tokens, prompts P wide)."""

    sequences: torch.Tensor  # (B, P + R) prompt (left-padded) + reply (right-padded)
    attention_mask: torch.Tensor  # (B, P + R)
    positions: torch.Tensor  # (B, P + R) position ids over real tokens
    reply_mask: torch.Tensor  # (B, R) 1 up to and including the end-of-turn token
    ended: torch.Tensor  # (B,) whether the reply ended within the token budget
    prompt_width: int
    log_probs: torch.Tensor  # (B, R) under the policy that sampled them, 0 outside the reply
    ref_log_probs: torch.Tensor  # (B, R) under the reference, 0 outside the reply

    @property
    def replies(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_width :]

    @property
    def kl(self) -> torch.Tensor:
        """(B, R) the k1 estimate of KL(policy || reference) per reply token: log pi - log pi_ref."""
        return self.log_probs - self.ref_log_probs


@torch.no_grad()
def sample_and_score(
    policy: PreTrainedModel,
    ref_policy: PreTrainedModel,
    prompts: list[list[int]],
    end_ids: list[int],
    pad_id: int,
    max_new_tokens: int,
    temperature: float,
) -> SampledReplies:
    """Replies sampled from `policy` (in eval mode: no dropout) to `prompts` (ids), with each reply token's
    log-probability under the policy and under the reference. The temperature divides the logits of both, so that
    the log-probabilities are those of the distribution the replies were sampled from."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, policy.device)
    width = prompt_ids.shape[1]
    with eval_mode(policy):
        sequences, mask, reply_mask, ended = sample_replies(
            policy, prompt_ids, prompt_mask, end_ids, pad_id, max_new_tokens, temperature
        )
        positions = position_ids_of(mask)

        def log_probs(model: PreTrainedModel) -> torch.Tensor:
            logits = model(input_ids=sequences, attention_mask=mask, position_ids=positions).logits
            return token_log_probs(logits[:, width - 1 : -1], sequences[:, width:], temperature) * reply_mask

        return SampledReplies(
            sequences, mask, positions, reply_mask, ended, width, log_probs(policy), log_probs(ref_policy)
        )


# ---------------------------------------------------------------------------------------------- measures
def reward_model_function(reward_model: PreTrainedModel) -> RewardFunction:
    """A sequence-classification reward model as a `RewardFunction`: its score of each whole sequence."""

    def score(sequences, mask, positions, prompt_width) -> torch.Tensor:
        return reward_model(input_ids=sequences, attention_mask=mask, position_ids=positions).logits.squeeze(-1)

    return score


Judge = Callable[[list[str]], dict[str, float]]  # reply texts -> metrics over them, by a judge that is not the RM


def open_ended_judge(rows: list[dict]) -> Judge | None:
    """For held-out prompts of one open-ended task (`Task.open_ended`, e.g. review): the task's own metrics over the
    sampled replies (review: the share an independent classifier reads as positive), the measure beside the reward
    model's score that shows whether a higher score is the behaviour wanted or a way around the reward model; None
    for other prompts."""
    sources = {row["source"] for row in rows}
    if len(sources) != 1 or (task := TASKS.get(next(iter(sources)))) is None or not task.open_ended:
        return None
    references = [row.get("reference") or "" for row in rows]
    return lambda replies: task.metrics(references[: len(replies)], replies)


@torch.no_grad()
def held_out_metrics(
    policy: PreTrainedModel,
    ref_policy: PreTrainedModel,
    reward: RewardFunction,
    prompts: list[list[int]],
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 32,
    judge: Judge | None = None,
) -> dict[str, float]:
    """How a policy answers held-out prompts, for PPO, RLOO, DPO and the comparison of all: replies sampled as in
    training (a fixed seed, in a forked RNG state so a run's own random stream is untouched), their mean
    reward-model score, KL to the reference (summed over each reply's tokens, the k1 estimate), length, and the
    fraction that ended; with a `judge`, its metrics over the decoded replies (`eval_judge_<metric>`). Scores here
    are raw: no missing-eos penalty."""
    end_ids, pad_id = turn_end_ids(tokenizer), tokenizer.pad_token_id
    totals: dict[str, float] = defaultdict(float)
    texts: list[str] = []
    devices = [policy.device] if policy.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            sampled = sample_and_score(
                policy, ref_policy, prompts[start : start + batch_size], end_ids, pad_id, max_new_tokens, temperature
            )
            scores = reward(sampled.sequences, sampled.attention_mask, sampled.positions, sampled.prompt_width)
            totals["score"] += float(scores.float().sum())
            totals["kl"] += float(sampled.kl.sum())
            totals["response_length"] += float(sampled.reply_mask.sum())
            totals["ended_fraction"] += float(sampled.ended.sum())
            if judge is not None:
                replies = sampled.sequences[:, sampled.prompt_width :].masked_fill(sampled.reply_mask == 0, pad_id)
                texts += tokenizer.batch_decode(replies, skip_special_tokens=True)
    metrics = {f"eval_{name}": total / len(prompts) for name, total in totals.items()}
    if judge is not None:
        metrics.update({f"eval_judge_{name}": float(value) for name, value in judge(texts).items()})
    return metrics
