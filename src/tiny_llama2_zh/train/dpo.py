"""Direct preference optimisation: TRL's `DPOTrainer` on preference pairs, from an SFT folder, no reward model.

    tinyllm dpo --config configs/dpo/demo.yaml model.init_from=runs/demo/sft/final

DPO (Rafailov et al. 2023) trains the policy so that its log-probability ratio to a frozen reference,
beta * log(pi(y|x) / pi_ref(y|x)), acts as the reward of a Bradley-Terry model of the pairs; `train.loss_type`
picks the loss (sigmoid = the paper's, ipo = Azar et al. 2023, hinge, robust, ...), `train.beta` its strength.
The reference is a second copy of the SFT model passed explicitly (TRL's `ref_model=None` would reload it from a
hub id); with `model.lora` the reference is the same network with its adapters off.

Every evaluation scores the held-out pairs (split by prompt) with DPO's implicit reward: accuracy (chosen above
rejected; at step 0 every margin is 0, a tie, so 50 %) and mean margin, per source. With `model.reward_model`,
the end of the run also samples replies to the held-out prompts from the SFT and the DPO model and reports the
reward model's mean score of each and the DPO model's KL to the SFT model (`train.rl.held_out_metrics`, the
same measure as PPO's and RLOO's).
"""

from dataclasses import dataclass
from itertools import zip_longest
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
from trl import DPOConfig, DPOTrainer

from tiny_llama2_zh.data.preferences import load_preference_splits
from tiny_llama2_zh.data.tasks import TASKS
from tiny_llama2_zh.eval.markdown import table
from tiny_llama2_zh.eval.preferences import (
    TokenizedPair,
    flat_metrics,
    markdown_table,
    pair_report,
    reply_log_probs,
    tokenize_pairs,
)
from tiny_llama2_zh.infer.generate import turn_end_ids
from tiny_llama2_zh.loading import check_model_folder, init_tokenizer, same_tokenizer_or_refuse
from tiny_llama2_zh.tensors import eval_mode
from tiny_llama2_zh.train.lora import LoraOptions, count_trainable, peft_config
from tiny_llama2_zh.train.rl import held_out_metrics, open_ended_judge, prompt_ids, reward_model_function
from tiny_llama2_zh.train.runner import (
    HeldOutEvaluation,
    LengthSortedSteps,
    StageRun,
    training_arguments,
    trl_defaults,
)


@dataclass
class DPOModelOptions:
    init_from: str  # an SFT model folder: the policy starts here and the reference stays here
    tokenizer: str | None = None  # if given, init_from's tokenizer must be this one
    lora: LoraOptions | None = None
    reward_model: str | None = None  # a reward run's final/: score SFT and DPO replies at the end


@dataclass
class DPODataOptions:
    train: str | list[str]  # JSONL of {prompt, chosen, rejected}, globs allowed
    validation: str | list[str]  # held-out pairs, reported per source (the folder of each file)
    max_train_examples: int | None = None  # per file
    max_validation_examples: int = 300  # per file
    max_reward_prompts: int = 128  # held-out prompts the reward model scores replies to (with model.reward_model)


@dataclass
class DPORecipeConfig:
    model: DPOModelOptions
    data: DPODataOptions
    # Any option of TRL's DPOConfig (TrainingArguments plus beta, loss_type, max_length, precompute_ref_log_probs...)
    train: dict[str, Any]
    reply_max_new_tokens: int = 48  # replies sampled for the reward-model comparison
    eval_batch_size: int = 64
    resume: bool = False


def dpo_arguments(config: DPORecipeConfig) -> DPOConfig:
    return training_arguments(
        DPOConfig,
        config.train,
        "train",
        max_length=512,
        learning_rate=5e-5 if config.model.lora else 5e-6,
        warmup_steps=20,
        lr_scheduler_type="linear",
        lr_scheduler_kwargs={},
        **trl_defaults(DPOConfig),
    )


def implicit_reward_report(
    policy, reference, pairs: list[TokenizedPair], beta: float, pad_id: int, batch_size: int = 64
) -> dict:
    """DPO's implicit reward beta * (log pi - log pi_ref) of each reply, compared within each held-out pair."""
    sides = {}
    for side in ("chosen", "rejected"):
        sequences = [getattr(p, f"{side}_ids") for p in pairs]
        lengths = [p.prompt_length for p in pairs]
        policy_logp, _ = reply_log_probs(policy, sequences, lengths, pad_id, batch_size)
        reference_logp, _ = reply_log_probs(reference, sequences, lengths, pad_id, batch_size)
        sides[side] = beta * (policy_logp - reference_logp)
    return pair_report(sides["chosen"], sides["rejected"], [p.source for p in pairs])


def reward_prompt_rows(rows: list[dict], limit: int) -> list[dict]:
    """The prompts of the held-out pairs, taken from each source in turn (so that every source is scored), at most
    `limit`, as prompt rows (`{"prompt": [messages], "source"}`) for `train.rl.prompt_ids`. Distinct prompts, except
    for an open-ended task (`Task.open_ended`, review: one prompt, many replies), whose rows are each a sample. A
    prompt is the whole conversation before the reply, as DPO trained on it, earlier turns included."""
    by_source: dict[str, list[tuple[tuple[str, str], ...]]] = {}
    for row in rows:
        key = tuple((m["role"], m["content"]) for m in row["prompt"])
        keys = by_source.setdefault(row["source"], [])
        task = TASKS.get(row["source"])
        if key not in keys or (task is not None and task.open_ended):
            keys.append(key)
    per_source = [[(source, key) for key in keys] for source, keys in by_source.items()]
    picked = [pair for pairs in zip_longest(*per_source) for pair in pairs if pair is not None]
    return [
        {"prompt": [{"role": role, "content": content} for role, content in key], "source": source}
        for source, key in picked[:limit]
    ]


class HeldOutPairsDPOTrainer(HeldOutEvaluation, LengthSortedSteps, DPOTrainer):
    """TRL's DPOTrainer whose evaluation is the implicit-reward report on the held-out pairs (per source)."""

    length_columns = ("prompt_ids", "chosen_ids", "rejected_ids")

    def __init__(self, *args, held_out: list[TokenizedPair], reference, eval_batch_size: int = 64, **kwargs):
        super().__init__(*args, **kwargs)
        self.held_out, self.reference, self.eval_batch_size = held_out, reference, eval_batch_size

    def held_out_report(self) -> dict:
        with eval_mode(self.model):
            return implicit_reward_report(
                self.model, self.reference, self.held_out, self.args.beta, self.processing_class.pad_token_id,
                self.eval_batch_size,
            )  # fmt: skip

    def held_out_metrics(self) -> dict[str, float]:
        return flat_metrics(self.held_out_report())


def dpo(config: DPORecipeConfig, callbacks: list[TrainerCallback] | None = None) -> dict | None:
    args = dpo_arguments(config)
    init_from = check_model_folder(config.model.init_from)
    tokenizer = init_tokenizer(init_from, config.model.tokenizer)
    if config.model.reward_model:
        same_tokenizer_or_refuse(init_from, check_model_folder(config.model.reward_model))
    train_rows, train_report, eval_rows, eval_report = load_preference_splits(config.data, tokenizer, args.max_length)
    held_out = tokenize_pairs(eval_rows, tokenizer)

    run = StageRun("dpo", config, args, resume=config.resume, language_model=False)
    policy = AutoModelForCausalLM.from_pretrained(str(init_from))
    policy.generation_config.eos_token_id = turn_end_ids(tokenizer)
    reference = AutoModelForCausalLM.from_pretrained(str(init_from)).eval().requires_grad_(False)
    lora = peft_config(config.model.lora) if config.model.lora else None
    trainer = HeldOutPairsDPOTrainer(
        model=policy,
        ref_model=None if lora else reference,  # with LoRA, TRL's reference is the policy with adapters off
        args=args,
        train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in train_rows]),
        eval_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in eval_rows[:1]]),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=run.callbacks(None, callbacks),
        held_out=held_out,
        reference=reference,
        eval_batch_size=config.eval_batch_size,
    )
    parameters = count_trainable(trainer.model)
    run.attach(trainer)
    initial = trainer.held_out_report() if run.checkpoint is None else None
    if initial is not None:
        run.evaluate_before(lambda: flat_metrics(initial))
    output = run.train(trainer)
    final = trainer.held_out_report()
    run.evaluate_after(output.global_step, lambda: flat_metrics(final))

    replies = None
    if config.model.reward_model:
        reward_model = AutoModelForSequenceClassification.from_pretrained(config.model.reward_model).eval()
        prompt_rows = reward_prompt_rows(eval_rows, config.data.max_reward_prompts)
        measure = {
            "reward": reward_model_function(reward_model),
            "prompts": prompt_ids(prompt_rows, tokenizer),
            "tokenizer": tokenizer,
            "judge": open_ended_judge(prompt_rows),
        }
        options = {"max_new_tokens": config.reply_max_new_tokens, "temperature": 1.0, "seed": args.seed}
        with torch.no_grad():
            replies = {
                name: held_out_metrics(model, reference, **measure, **options)
                for name, model in (("sft", reference), ("dpo", trainer.model))
            }
    reports = {**({"DPO implicit reward, step 0": initial} if initial else {}), "DPO implicit reward": final}
    report = f"## Held-out pair accuracy ({final['pairs']} pairs; a tie counts half)\n\n{markdown_table(reports)}\n"
    if replies:
        report += (
            "\n## Replies to held-out prompts, scored by the reward model (sampled, temperature 1)\n\n"
            + table(
                ("policy", "reward-model score", "KL to SFT (nats / reply)", "reply length"),
                [
                    (name, f"{m['eval_score']:+.3f}", f"{m['eval_kl']:.3f}", f"{m['eval_response_length']:.1f}")
                    for name, m in replies.items()
                ],
            )
            + "\n"
        )
    if run.main_process:
        (run.output_dir / "dpo_eval.md").write_text(report, encoding="utf-8")
        print(report)
    return run.finish(
        trainer,
        tokenizer,
        {
            "init_from": str(init_from),
            "lora": lora is not None,
            "parameters": parameters,
            "data": {
                "train": train_report.as_dict(),
                "validation": eval_report.as_dict(),
            },
            "initial": initial,
            "final": final,
            "replies": replies,
            "initial_validation_loss": None,
            "final_validation_loss": None,
        },
    )
