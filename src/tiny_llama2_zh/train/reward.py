"""Reward-model recipe: a scalar score for a reply, trained on preference pairs with TRL's `RewardTrainer`.

    tinyllm reward --config configs/reward/demo.yaml model.init_from=runs/demo/sft/final

The model is `TinyLlama2ForSequenceClassification` with one output, initialised from an SFT folder: the backbone is
copied, the `score` head is new (the SFT model's LM head is dropped). It learns the Bradley-Terry pairwise loss
-log sigmoid(r(chosen) - r(rejected)) (Ouyang et al. 2022, InstructGPT, eq. 1), with a small penalty on the mean
reward keeping scores centred near zero (`center_rewards_coefficient`, Eisenstein et al. 2023), which PPO's
value model, initialised from this one, appreciates. Scores are read at the reply's closing eos.

Every evaluation scores the held-out pairs (split by prompt: no held-out prompt was trained on) and reports pair
accuracy and mean margin per source; at the end also a calibration table, the baselines it must beat: the
longer reply, and the SFT model's own log-probability preference, and for a source whose replies are labels
(sentiment's 正面/负面) the mean score of each label, before and after training (`eval/preferences.py`). All of it
is in `summary.json` (`final.per_source.<source>.per_label`) and `reward_eval.md`.
"""

from dataclasses import dataclass
from typing import Any

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
from trl import RewardConfig, RewardTrainer

from tiny_llama2_zh.data.preferences import load_preference_splits
from tiny_llama2_zh.eval.preferences import (
    TokenizedPair,
    baseline_reports,
    calibration_table,
    flat_metrics,
    markdown_table,
    per_label_table,
    reward_model_report,
    tokenize_pairs,
)
from tiny_llama2_zh.loading import check_model_folder, init_tokenizer
from tiny_llama2_zh.presets import flops_per_token
from tiny_llama2_zh.train.runner import (
    HeldOutEvaluation,
    LengthSortedSteps,
    StageRun,
    training_arguments,
    trl_defaults,
)


@dataclass
class RewardModelOptions:
    init_from: str  # an SFT (or pretrained) model folder
    tokenizer: str | None = None  # if given, init_from's tokenizer must be this one


@dataclass
class RewardDataOptions:
    train: str | list[str]  # JSONL of {prompt, chosen, rejected}, globs allowed
    validation: str | list[str]  # held-out pairs (reported per source: the folder each file is in)
    max_train_examples: int | None = None  # per file
    max_validation_examples: int = 300  # per file


@dataclass
class RewardRecipeConfig:
    model: RewardModelOptions
    data: RewardDataOptions
    # Any option of TRL's RewardConfig (TrainingArguments plus max_length, center_rewards_coefficient, ...)
    train: dict[str, Any]
    eval_batch_size: int = 64
    peak_tflops: float | None = None
    resume: bool = False


def reward_arguments(config: RewardRecipeConfig) -> RewardConfig:
    return training_arguments(
        RewardConfig,
        config.train,
        "train",
        max_length=512,
        learning_rate=1e-4,
        warmup_steps=20,
        center_rewards_coefficient=0.01,
        **trl_defaults(RewardConfig),
    )


class HeldOutPairsRewardTrainer(HeldOutEvaluation, LengthSortedSteps, RewardTrainer):
    """TRL's RewardTrainer whose evaluation is the held-out pair report (accuracy and margin per source, the
    pairwise loss), the same function that scores the model before and after training, instead of TRL's
    batch-averaged metrics."""

    length_columns = ("chosen_ids", "rejected_ids")

    def __init__(self, *args, held_out: list[TokenizedPair], eval_batch_size: int = 64, **kwargs):
        super().__init__(*args, **kwargs)
        self.held_out, self.eval_batch_size = held_out, eval_batch_size

    def held_out_report(self) -> dict:
        return reward_model_report(self.model, self.held_out, self.processing_class.pad_token_id, self.eval_batch_size)

    def held_out_metrics(self) -> dict[str, float]:
        return flat_metrics(self.held_out_report())


def load_reward_model(init_from: str, pad_token_id: int):
    """A one-output sequence-classification model with init_from's backbone and a new score head."""
    model = AutoModelForSequenceClassification.from_pretrained(init_from, num_labels=1)
    model.config.pad_token_id = pad_token_id
    return model


def reward(config: RewardRecipeConfig, callbacks: list[TrainerCallback] | None = None) -> dict | None:
    args = reward_arguments(config)
    init_from = check_model_folder(config.model.init_from)
    tokenizer = init_tokenizer(init_from, config.model.tokenizer)
    train_rows, train_report, eval_rows, eval_report = load_preference_splits(config.data, tokenizer, args.max_length)
    held_out = tokenize_pairs(eval_rows, tokenizer)
    pad_id = tokenizer.pad_token_id

    run = StageRun("reward", config, args, resume=config.resume, language_model=False)
    baselines = {}
    if run.checkpoint is None:
        policy = AutoModelForCausalLM.from_pretrained(str(init_from)).eval()
        baselines = baseline_reports(policy, held_out, pad_id)
        del policy
    model = load_reward_model(str(init_from), pad_id)
    trainer = HeldOutPairsRewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows[:1]),  # the Trainer wants one; evaluation uses `held_out`
        processing_class=tokenizer,
        callbacks=run.callbacks(None, callbacks),
        held_out=held_out,
        eval_batch_size=config.eval_batch_size,
    )
    run.attach(trainer, flops_per_token(model.config, args.max_length), config.peak_tflops)
    initial = trainer.held_out_report() if run.checkpoint is None else None
    if initial is not None:
        run.evaluate_before(lambda: flat_metrics(initial))
    output = run.train(trainer)
    final = trainer.held_out_report()
    run.evaluate_after(output.global_step, lambda: flat_metrics(final))
    reports = {**baselines, **({"reward model, step 0": initial} if initial else {}), "reward model": final}
    tables = (
        f"## Held-out pair accuracy ({final['pairs']} pairs; a tie counts half)\n\n{markdown_table(reports)}\n\n"
        f"## Calibration of the trained reward model\n\n{calibration_table(final)}\n"
    )
    labels = per_label_table({name: report for name, report in reports.items() if name.startswith("reward model")})
    if labels:
        tables += (
            "\n## Mean reward-model score per reply label (held-out pairs; a label that scores higher both as "
            f"chosen and as rejected is preferred whatever the prompt says)\n\n{labels}\n"
        )
    if run.main_process:
        (run.output_dir / "reward_eval.md").write_text(tables, encoding="utf-8")
        print(tables)
    return run.finish(
        trainer,
        tokenizer,
        {
            "init_from": str(init_from),
            "data": {
                "train": train_report.as_dict(),
                "validation": eval_report.as_dict(),
            },
            "baselines": baselines,
            "initial": initial,
            "final": final,
            "initial_validation_loss": initial["loss"] if initial else None,
            "final_validation_loss": final["loss"],
        },
    )
