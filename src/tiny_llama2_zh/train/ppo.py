"""PPO for RLHF, written here: policy = an SFT model, reward = a trained reward model, KL-penalised to a frozen copy.

    tinyllm ppo --config configs/ppo/demo.yaml \
        model.policy=runs/demo/sft/final model.reward_model=runs/demo/reward/final

Why by hand: no current TRL release ships PPO (its PPOTrainer was removed after trl 1.12, which cannot share an
environment with trl 1.16), and the RLHF engines that keep it (OpenRLHF, verl) need GPUs and vLLM. This file
follows InstructGPT (Ouyang et al. 2022), "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024)
and TRL 1.12's experimental PPOTrainer, in their choices:

- value model: a separate copy of the reward model (backbone + score head read at every position), not a value
  head on the policy: the value starts from a network that already scores replies (a good baseline from step one),
  and the policy's language-modelling features are not pulled toward regression (InstructGPT, sec. 3.5; Huang et
  al. detail 3). One optimizer trains both (TRL's PolicyAndValueWrapper).
- rollouts: prompts left-padded, replies sampled with the KV cache (`generate`), everything after the first
  end-of-turn token masked; a reply that never ends has `missing_eos_penalty` taken off its score (detail 23).
- reward per token: -kl_coef * (log pi - log pi_ref) on every reply token (the k1 estimator), plus the reward
  model's score at the end-of-turn token; the coefficient fixed or adaptive (Ziegler et al. 2019, sec. 2.2).
- generalised advantage estimation (Schulman et al. 2016), advantages whitened over the batch's real tokens,
  several PPO epochs over shuffled minibatches, clipped policy and clipped value losses (Schulman et al. 2017).
- sampling temperature applied to the log-probabilities too, so that the ratio compares the same distribution.

The loop is transformers' Trainer: each optimizer step is one minibatch of one PPO epoch (`compute_loss`), and a
rollout is made when a step needs one, so gradient clipping, the learning-rate schedule, checkpoints (policy, value
model, optimizer, scheduler, RNG), resume, TensorBoard and the project's callbacks are the same as every other
stage's. Checkpoints fall on rollout boundaries, so a resumed run continues exactly.
"""

import contextlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from tiny_llama2_zh.config import ConfigError
from tiny_llama2_zh.data.conversations import load_prompts
from tiny_llama2_zh.errors import TrainingDivergedError
from tiny_llama2_zh.infer.generate import SamplingOptions, generate_reply, position_ids_of, turn_end_ids
from tiny_llama2_zh.tokenizer import chat_ids, load_tokenizer
from tiny_llama2_zh.train.callbacks import SamplesCallback
from tiny_llama2_zh.train.rl import (
    Judge,
    PromptDataOptions,
    RewardFunction,
    check_enough_prompts,
    held_out_metrics,
    load_rollout_prompts,
    open_ended_judge,
    prompt_ids,
    reward_model_function,
    sample_and_score,
    training_folders,
)
from tiny_llama2_zh.train.runner import RL_DEFAULTS, HeldOutEvaluation, StageRun, training_arguments

PTX_TARGETS = ("labels", "reference")  # PPOOptions.ptx_target


@dataclass
class PPOOptions:
    rollout_batch_size: int = 32  # prompts per rollout
    mini_batch_size: int = 16  # replies per optimizer step
    ppo_epochs: int = 4  # passes over each rollout
    max_new_tokens: int = 32
    temperature: float = 1.0
    kl_coef: float = 0.05  # beta of the per-token KL penalty (the initial one when adaptive)
    target_kl: float | None = None  # nats per reply: adapt kl_coef toward it (Ziegler et al. 2019); None: fixed
    kl_horizon: int = 10000  # the adaptive controller's horizon, in replies
    gamma: float = 1.0
    lam: float = 0.95  # GAE lambda
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    missing_eos_penalty: float = 1.0  # taken off the score of a reply that does not end within max_new_tokens
    # rollouts at the start that train the value model only (OpenRLHF's `freezing_actor_steps`): a value model
    # read at positions its reward-model weights never scored gives a poor baseline, and the policy then drifts
    # toward whatever reply scores high on average instead of what scores high for its prompt
    critic_warmup_rollouts: int = 0
    # PPO-ptx (InstructGPT, Ouyang et al. 2022, eq. 2): each optimizer step also takes ptx_coef x the SFT loss of
    # ptx_batch_size conversations from data.ptx, so that what RL does not reward (the other tasks SFT taught) is
    # not traded away for the reward model's score; 0: plain PPO
    ptx_coef: float = 0.0
    ptx_batch_size: int = 16
    # what the ptx term pulls the policy toward on those conversations: "labels", their replies (InstructGPT's SFT
    # loss); "reference", the reference (SFT) model's own next-token distributions over the same reply tokens
    # (KL(reference || policy), distillation, Hinton et al. 2015) -- it keeps what SFT had, its calibration
    # included, where the labels keep teaching: a task half learnt at the end of SFT moves on under the SFT loss
    ptx_target: str = "labels"

    def check(self) -> None:
        if self.rollout_batch_size % self.mini_batch_size:
            raise ConfigError(
                f"ppo.rollout_batch_size {self.rollout_batch_size} must be a multiple of ppo.mini_batch_size "
                f"{self.mini_batch_size}"
            )
        for name in ("rollout_batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ppo.{name} must be at least 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"ppo.temperature must be positive (PPO samples), got {self.temperature}")
        if self.ptx_target not in PTX_TARGETS:
            raise ConfigError(f"ppo.ptx_target must be one of {', '.join(PTX_TARGETS)}, got {self.ptx_target!r}")
        if self.ptx_coef < 0 or self.ptx_batch_size < 1:
            raise ConfigError(f"ppo.ptx_coef must be >= 0 and ppo.ptx_batch_size >= 1, got {self.ptx_coef}, "
                              f"{self.ptx_batch_size}")  # fmt: skip

    @property
    def steps_per_rollout(self) -> int:
        return self.ppo_epochs * (self.rollout_batch_size // self.mini_batch_size)


# ---------------------------------------------------------------------------------------------- tensors
def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(variance + 1e-8) * mask


def token_values(value_model: PreTrainedModel, sequences, mask, positions) -> torch.Tensor:
    """The value model's score head read at every position (its forward reads only the last): (B, T)."""
    hidden = value_model.model(input_ids=sequences, attention_mask=mask, position_ids=positions).last_hidden_state
    return value_model.score(hidden).squeeze(-1).float()


def ptx_examples(rows: list[dict], tokenizer: PreTrainedTokenizerBase) -> list[tuple[list[int], int]]:
    """SFT conversations for PPO-ptx: (the whole conversation's ids, how many of them are the prompt), from
    `load_prompts` rows whose reference reply is the conversation's last assistant turn."""
    examples = []
    for row in rows:
        prompt = chat_ids(tokenizer, row["prompt"], generation_prompt=True)
        whole = chat_ids(tokenizer, [*row["prompt"], {"role": "assistant", "content": row["reference"]}])
        examples.append((whole, len(prompt)))
    return examples


def _reply_batch(examples: list[tuple[list[int], int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """(ids, attention mask, labels): right-padded conversations, labels -100 outside the replies, (B, T) each."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in examples], device=device)
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in examples], device=device)
    labels = torch.tensor(
        [[-100] * start + ids[start:] + [-100] * (width - len(ids)) for ids, start in examples], device=device
    )
    return ids, mask, labels


def sft_loss(policy: PreTrainedModel, examples: list[tuple[list[int], int]], pad_id: int) -> torch.Tensor:
    """The mean negative log-likelihood of the replies' tokens (the assistant-only SFT loss) of one batch."""
    ids, mask, labels = _reply_batch(examples, pad_id, policy.device)
    return policy(input_ids=ids, attention_mask=mask, labels=labels).loss  # the model's own (fused) shifted loss


def reference_kl(
    policy: PreTrainedModel, reference: PreTrainedModel, examples: list[tuple[list[int], int]], pad_id: int
) -> torch.Tensor:
    """KL(reference || policy) of the next-token distributions at the replies' tokens, averaged over those tokens:
    the policy is pulled toward what the reference model would say there, not toward the written reply."""
    ids, mask, labels = _reply_batch(examples, pad_id, policy.device)
    predicts = labels[:, 1:] != -100  # position t predicts token t + 1: the reply tokens' predictions
    with torch.no_grad():
        target = torch.log_softmax(reference(input_ids=ids, attention_mask=mask).logits[:, :-1][predicts].float(), -1)
    log_probs = torch.log_softmax(policy(input_ids=ids, attention_mask=mask).logits[:, :-1][predicts].float(), -1)
    return torch.nn.functional.kl_div(log_probs, target, log_target=True, reduction="batchmean")


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates over the reply tokens (B, R); rewards and values are 0 after a reply's end."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages


def adapted_kl_coef(coef: float, kl: float, target: float | None, n_steps: int, horizon: int) -> float:
    """The adaptive KL coefficient after one rollout (Ziegler et al. 2019, sec. 2.2): proportional control toward
    `target` nats per reply, error e = clip(KL / target - 1, -0.2, 0.2), beta <- beta * (1 + e * n_steps / horizon),
    `n_steps` the replies of the rollout. A `target` of None keeps the coefficient fixed."""
    if target is None:
        return coef
    error = max(-0.2, min(0.2, kl / target - 1))
    return coef * (1 + error * n_steps / horizon)


@dataclass
class Rollout:
    """One batch of sampled replies and everything PPO needs from them (replies are R tokens, prompts P wide)."""

    sequences: torch.Tensor  # (B, P + R) prompt (left-padded) + reply (right-padded)
    attention_mask: torch.Tensor  # (B, P + R)
    reply_mask: torch.Tensor  # (B, R) 1 up to and including the end-of-turn token
    prompt_width: int
    log_probs: torch.Tensor  # (B, R) under the policy that sampled them
    ref_log_probs: torch.Tensor  # (B, R)
    values: torch.Tensor  # (B, R)
    scores: torch.Tensor  # (B,) reward-model score, after the missing-eos penalty
    advantages: torch.Tensor  # (B, R) whitened
    returns: torch.Tensor  # (B, R)
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def replies(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_width :]

    def select(self, index: torch.Tensor) -> "Rollout":
        picked = {
            name: value[index] if isinstance(value, torch.Tensor) else value for name, value in vars(self).items()
        }
        return Rollout(**picked)


def check_rollout_schedule(args: TrainingArguments, options: PPOOptions) -> None:
    """Steps count optimizer steps, and a rollout is `steps_per_rollout` of them: the run must end and save on
    rollout boundaries, in one process without gradient accumulation (minibatches are the unit)."""
    options.check()
    if args.max_steps % options.steps_per_rollout:
        raise ConfigError(
            f"train.max_steps {args.max_steps} must be a multiple of the optimizer steps per rollout "
            f"({options.steps_per_rollout} = ppo_epochs x rollout_batch_size / mini_batch_size)"
        )
    if args.save_strategy == "steps" and args.save_steps % options.steps_per_rollout:
        raise ConfigError(
            f"train.save_steps {args.save_steps} must be a multiple of {options.steps_per_rollout} (the steps per "
            "rollout): a checkpoint in the middle of a rollout could not be resumed exactly"
        )
    if args.gradient_accumulation_steps != 1 or args.world_size != 1:
        raise ConfigError("PPO here runs in one process without gradient accumulation (minibatches are the unit)")


class PolicyAndValue(nn.Module):
    """The two trained networks under one optimizer (TRL's PolicyAndValueWrapper)."""

    def __init__(self, policy: PreTrainedModel, value_model: PreTrainedModel):
        super().__init__()
        self.policy, self.value_model = policy, value_model


class WorkItems(Dataset):
    """Optimizer step k of the run -> (rollout, PPO epoch, minibatch). A plain, deterministic map-style dataset,
    so that the Trainer's resume skips steps it has done exactly as it does for any dataset."""

    def __init__(self, max_steps: int, options: PPOOptions):
        self.max_steps, self.per_epoch = max_steps, options.rollout_batch_size // options.mini_batch_size
        self.steps_per_rollout = options.steps_per_rollout

    def __len__(self) -> int:
        return self.max_steps

    def __getitem__(self, step: int) -> dict[str, int]:
        within = step % self.steps_per_rollout
        return {
            "rollout": step // self.steps_per_rollout,
            "epoch": within // self.per_epoch,
            "minibatch": within % self.per_epoch,
        }


def _first(items: list[dict]) -> dict:
    return items[0]


# ---------------------------------------------------------------------------------------------- trainer
class PPOTrainer(HeldOutEvaluation, Trainer):
    """PPO on transformers' Trainer. `model` is a `PolicyAndValue`; `ref_policy` is frozen; `reward` scores whole
    sequences (the reward model, or any function, e.g. a toy one in tests)."""

    def __init__(
        self,
        model: PolicyAndValue,
        ref_policy: PreTrainedModel,
        reward: RewardFunction,
        tokenizer: PreTrainedTokenizerBase,
        prompts: list[list[int]],
        options: PPOOptions,
        args: TrainingArguments,
        eval_prompts: list[list[int]] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        judge: Judge | None = None,
        ptx: list[tuple[list[int], int]] | None = None,
    ):
        check_rollout_schedule(args, options)
        for network in (model.policy, model.value_model):
            network.config.dropout = 0.0  # dropout would make the ratio differ from 1 with unchanged weights
            for module in network.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        super().__init__(
            model=model,
            args=args,
            train_dataset=WorkItems(args.max_steps, options),
            eval_dataset=eval_prompts or None,  # the Trainer wants one to evaluate; `evaluate` is PPO's own
            data_collator=_first,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        self.ref_policy = ref_policy.eval().requires_grad_(False)
        self.reward = reward
        self.prompts, self.eval_prompts = prompts, eval_prompts or []
        self.judge = judge  # held-out replies judged by something other than the reward model (`open_ended_judge`)
        self.ptx = ptx or []  # SFT conversations for PPO-ptx (`ptx_examples`)
        if options.ptx_coef > 0 and not self.ptx:
            raise ConfigError("ppo.ptx_coef > 0 needs SFT conversations to mix in: set data.ptx")
        self.options = options
        self.kl_coef = options.kl_coef
        self.end_ids = turn_end_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id
        self._rollout: tuple[int, Rollout] | None = None
        self._stats: dict[str, list[float]] = defaultdict(list)

    # ------------------------------------------------------------------------------------------ data
    def get_train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=1, shuffle=False, collate_fn=_first)

    def rollout_prompts(self, rollout: int) -> list[list[int]]:
        """The prompts of rollout r: consecutive slices of a seeded permutation per pass over the prompts."""
        size, count = self.options.rollout_batch_size, len(self.prompts)
        orders: dict[int, torch.Tensor] = {}  # one seeded permutation per pass, made once
        picked = []
        for position in range(rollout * size, (rollout + 1) * size):
            data_epoch, offset = divmod(position, count)
            if data_epoch not in orders:
                generator = torch.Generator().manual_seed(self.args.seed + data_epoch)
                orders[data_epoch] = torch.randperm(count, generator=generator)
            picked.append(self.prompts[int(orders[data_epoch][offset])])
        return picked

    # ------------------------------------------------------------------------------------------ rollout
    @torch.no_grad()
    def make_rollout(self, prompts: list[list[int]]) -> Rollout:
        options = self.options
        sampled = sample_and_score(
            self.model.policy, self.ref_policy, prompts, self.end_ids, self.pad_id, options.max_new_tokens,
            options.temperature,
        )  # fmt: skip
        sequences, mask, positions = sampled.sequences, sampled.attention_mask, sampled.positions
        width, reply_mask, ended = sampled.prompt_width, sampled.reply_mask, sampled.ended
        values = token_values(self.model.value_model, sequences, mask, positions)[:, width - 1 : -1] * reply_mask
        scores = self.reward(sequences, mask, positions, width).float()
        if not torch.isfinite(scores).all():
            raise TrainingDivergedError(
                f"the reward was not finite for {int((~torch.isfinite(scores)).sum())} of {len(scores)} replies at "
                f"step {self.state.global_step + 1}; nothing of this step was applied"
            )
        raw_scores = scores.clone()
        scores = scores - options.missing_eos_penalty * (~ended).float()
        kl = sampled.kl  # (B, R) per-token k1 estimate, 0 outside the replies
        rewards = -self.kl_coef * kl
        last = reply_mask.sum(-1) - 1
        rewards[torch.arange(len(rewards)), last] += scores
        advantages = gae(rewards, values, options.gamma, options.lam)
        returns = advantages + values
        advantages = whiten(advantages, reply_mask.float())
        kl_per_reply = kl.sum(-1)
        stats = {
            "score": float(raw_scores.mean()),
            "score_with_penalty": float(scores.mean()),
            "kl": float(kl_per_reply.mean()),
            "kl_coef": self.kl_coef,
            "reward": float(rewards.sum(-1).mean()),
            "response_length": float(reply_mask.sum(-1).float().mean()),
            "ended_fraction": float(ended.float().mean()),
        }
        self.kl_coef = adapted_kl_coef(self.kl_coef, stats["kl"], options.target_kl, len(prompts), options.kl_horizon)
        return Rollout(
            sequences, mask, reply_mask, width, sampled.log_probs, sampled.ref_log_probs, values, scores, advantages,
            returns, stats,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------ update
    def compute_loss(self, model, inputs: dict[str, int], return_outputs=False, num_items_in_batch=None):
        options = self.options
        rollout_index = int(inputs["rollout"])
        if self._rollout is None or self._rollout[0] != rollout_index:
            rollout = self.make_rollout(self.rollout_prompts(rollout_index))
            self._rollout = (rollout_index, rollout)
            for name, value in rollout.stats.items():
                self._stats[name].append(value)
        rollout = self._rollout[1]
        generator = torch.Generator().manual_seed(
            self.args.seed * 1_000_003 + rollout_index * 1009 + int(inputs["epoch"])
        )
        order = torch.randperm(options.rollout_batch_size, generator=generator)
        start = int(inputs["minibatch"]) * options.mini_batch_size
        batch = rollout.select(order[start : start + options.mini_batch_size].to(rollout.sequences.device))
        train_policy = rollout_index >= options.critic_warmup_rollouts
        loss, stats = self.ppo_loss(batch, train_policy=train_policy)
        if train_policy and options.ptx_coef > 0:
            picked = torch.randint(len(self.ptx), (options.ptx_batch_size,), generator=generator).tolist()
            batch_examples = [self.ptx[i] for i in picked]
            if options.ptx_target == "reference":
                ptx_loss = reference_kl(self.model.policy, self.ref_policy, batch_examples, self.pad_id)
            else:
                ptx_loss = sft_loss(self.model.policy, batch_examples, self.pad_id)
            loss = loss + options.ptx_coef * ptx_loss
            stats["ptx_loss"] = float(ptx_loss)
        for name, value in stats.items():
            self._stats[name].append(value)
        return loss

    def ppo_loss(self, batch: Rollout, train_policy: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        """Clipped policy loss + vf_coef * clipped value loss on one minibatch (Schulman et al. 2017, eq. 7 and 9);
        the value loss alone while the critic warms up.

        In warm-up the policy's forward runs without autograd, so its weights get no gradient at all and the
        optimizer skips them; a zero gradient (0 * policy loss) would still get AdamW's weight decay and count in
        its moment estimates. The log-softmax is computed here, not with `tensors.token_log_probs`, because the
        entropy needs the whole distribution: the log-probabilities of the replies are read from it."""
        options, width = self.options, batch.prompt_width
        mask = batch.reply_mask.float()
        positions = position_ids_of(batch.attention_mask)
        policy, value_model = self.model.policy, self.model.value_model
        with contextlib.nullcontext() if train_policy else torch.no_grad():
            logits = policy(input_ids=batch.sequences, attention_mask=batch.attention_mask, position_ids=positions)
            logits = logits.logits[:, width - 1 : -1].float() / options.temperature
            log_softmax = torch.log_softmax(logits, -1)
            new_logprobs = log_softmax.gather(-1, batch.replies[..., None]).squeeze(-1)
        values = token_values(value_model, batch.sequences, batch.attention_mask, positions)[:, width - 1 : -1]
        clipped_values = batch.values + (values - batch.values).clamp(
            -options.clip_range_value, options.clip_range_value
        )
        value_loss = 0.5 * masked_mean(
            torch.maximum((values - batch.returns) ** 2, (clipped_values - batch.returns) ** 2), mask
        )
        log_ratio = (new_logprobs - batch.log_probs) * mask
        ratio = torch.exp(log_ratio)
        clipped_ratio = ratio.clamp(1 - options.clip_range, 1 + options.clip_range)
        policy_loss = masked_mean(torch.maximum(-batch.advantages * ratio, -batch.advantages * clipped_ratio), mask)
        loss = options.vf_coef * value_loss + (policy_loss if train_policy else 0.0)
        with torch.no_grad():
            entropy = -(log_softmax.exp() * log_softmax).sum(-1)
            stats = {
                "policy_loss": float(policy_loss),
                "value_loss": float(value_loss),
                "clip_fraction": float(masked_mean((ratio - 1).abs() > options.clip_range, mask)),
                "approx_kl": float(masked_mean(0.5 * log_ratio**2, mask)),
                "entropy": float(masked_mean(entropy, mask)),
                "ratio": float(masked_mean(ratio, mask)),
            }
        return loss, stats

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training record: the averages since the last one
            logs = {**logs, **{name: sum(v) / len(v) for name, v in self._stats.items() if v}}
            self._stats.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------ evaluation
    def held_out_metrics(self) -> dict[str, float]:
        if not self.eval_prompts:
            return {}
        return held_out_metrics(
            self.model.policy,
            self.ref_policy,
            self.reward,
            self.eval_prompts,
            self.processing_class,
            self.options.max_new_tokens,
            self.options.temperature,
            self.args.seed,
            self.options.rollout_batch_size,
            judge=self.judge,
        )

    # ------------------------------------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """A checkpoint (and `final/`) is the policy as a plain model folder, the value model beside it, and the
        adaptive KL coefficient; no pickle (the arguments are in the run's config.yaml, copied beside every
        checkpoint, and `final/training_args.json`)."""
        output_dir = Path(output_dir or self.args.output_dir)
        self.model.policy.save_pretrained(str(output_dir))
        self.model.value_model.save_pretrained(str(output_dir / "value_model"))
        (output_dir / "ppo_state.json").write_text(json.dumps({"kl_coef": self.kl_coef}) + "\n")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        checkpoint = Path(resume_from_checkpoint)
        for network, folder, auto_class in (
            (self.model.policy, checkpoint, AutoModelForCausalLM),
            (self.model.value_model, checkpoint / "value_model", AutoModelForSequenceClassification),
        ):
            network.load_state_dict(auto_class.from_pretrained(str(folder)).state_dict())
        self.kl_coef = json.loads((checkpoint / "ppo_state.json").read_text())["kl_coef"]


# ---------------------------------------------------------------------------------------------- recipe
@dataclass
class PPOModelOptions:
    policy: str  # an SFT model folder; the frozen reference is a second copy of it
    reward_model: str  # a reward run's final/
    value_model: str | None = None  # default: the reward model


@dataclass
class PPODataOptions(PromptDataOptions):
    # PPO-ptx's SFT conversations (chat JSONL, e.g. the SFT stage's own files), used when ppo.ptx_coef > 0
    ptx: str | list[str] | None = None
    max_ptx_examples: int = 4000  # per file


@dataclass
class PPORecipeConfig:
    model: PPOModelOptions
    data: PPODataOptions
    ppo: PPOOptions
    # TrainingArguments: output_dir, max_steps (optimizer steps: ppo_epochs x minibatches per rollout), learning
    # rate, schedule, save_steps / eval_steps (multiples of the steps per rollout), seed, report_to, ...
    train: dict[str, Any]
    sample_prompts: list[str] = field(default_factory=list)
    sample_max_new_tokens: int = 48
    resume: bool = False


def ppo_arguments(config: PPORecipeConfig) -> TrainingArguments:
    per_rollout = config.ppo.steps_per_rollout
    return training_arguments(
        TrainingArguments,
        config.train,
        "train",
        **RL_DEFAULTS,
        logging_steps=per_rollout,
        logging_first_step=False,  # one record per rollout, not one for the first minibatch
        save_steps=10 * per_rollout,
        remove_unused_columns=False,
    )


def ppo(config: PPORecipeConfig, callbacks: list[TrainerCallback] | None = None) -> dict | None:
    args = ppo_arguments(config)
    check_rollout_schedule(args, config.ppo)
    policy_dir, reward_dir, value_dir = training_folders(
        config.model.policy, config.model.reward_model, config.model.value_model or config.model.reward_model
    )
    tokenizer = load_tokenizer(policy_dir)
    prompts = load_rollout_prompts(config.data, tokenizer)
    train_rows, train_report, eval_rows = prompts.train, prompts.train_report, prompts.held_out
    rollout = config.ppo.rollout_batch_size
    check_enough_prompts(len(train_rows), rollout, f"ppo.rollout_batch_size {rollout}")
    if args.eval_strategy != "no" and not eval_rows:
        raise ConfigError("train.eval_steps evaluates periodically but data.validation gives no prompt")

    ptx_rows: list[dict] = []
    if config.ppo.ptx_coef > 0:
        if not config.data.ptx:
            raise ConfigError("ppo.ptx_coef > 0 needs SFT conversations to mix in: set data.ptx")
        ptx_rows, ptx_report = load_prompts(config.data.ptx, tokenizer, 10**9, config.data.max_ptx_examples)
        ptx_rows = [row for row in ptx_rows if row["reference"]]
        if not ptx_rows:
            raise ConfigError(f"data.ptx: no conversation with a reply ({ptx_report.summary()})")

    run = StageRun("ppo", config, args, resume=config.resume, language_model=False)
    policy = AutoModelForCausalLM.from_pretrained(str(policy_dir))
    policy.generation_config.eos_token_id = turn_end_ids(tokenizer)
    ref_policy = AutoModelForCausalLM.from_pretrained(str(policy_dir))
    reward_model = AutoModelForSequenceClassification.from_pretrained(str(reward_dir)).eval().requires_grad_(False)
    value_model = AutoModelForSequenceClassification.from_pretrained(str(value_dir))
    options = SamplingOptions(max_new_tokens=config.sample_max_new_tokens)

    def reply(model: PolicyAndValue, prompt: str) -> str:
        return generate_reply(model.policy, tokenizer, [{"role": "user", "content": prompt}], options)[0]

    samples = SamplesCallback(config.sample_prompts, reply, run.output_dir / "samples.jsonl")
    trainer = PPOTrainer(
        model=PolicyAndValue(policy, value_model),
        ref_policy=ref_policy,
        reward=reward_model_function(reward_model),
        tokenizer=tokenizer,
        prompts=prompt_ids(train_rows, tokenizer),
        options=config.ppo,
        args=args,
        eval_prompts=prompt_ids(eval_rows, tokenizer),
        callbacks=run.callbacks(samples if config.sample_prompts else None, callbacks),
        judge=open_ended_judge(eval_rows),
        ptx=ptx_examples(ptx_rows, tokenizer) if config.ppo.ptx_coef > 0 else None,
    )
    run.attach(trainer)
    initial = run.evaluate_before(trainer.held_out_metrics) if eval_rows else None
    output = run.train(trainer)
    final = run.evaluate_after(output.global_step, trainer.held_out_metrics) if eval_rows else None
    trainer.model.policy.generation_config.eos_token_id = turn_end_ids(tokenizer)
    summary = run.finish(
        trainer,
        tokenizer,
        {
            "policy": str(policy_dir),
            "reward_model": str(reward_dir),
            "value_model": str(value_dir),
            "rollouts": output.global_step // config.ppo.steps_per_rollout,
            "prompts": train_report.as_dict(),
            "initial": initial,
            "final": final,
            "kl_coef": trainer.kl_coef,
            "initial_validation_loss": None,
            "final_validation_loss": None,
        },
    )
    if summary is not None and initial and final:
        print(
            f"held-out prompts: reward-model score {initial['eval_score']:+.3f} -> {final['eval_score']:+.3f}, "
            f"KL to the reference {initial['eval_kl']:.3f} -> {final['eval_kl']:.3f} nats per reply"
        )
    return summary
