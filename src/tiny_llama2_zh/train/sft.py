"""Supervised fine-tuning recipe: chat conversations on TRL's `SFTTrainer`, optionally with LoRA.

    tinyllm sft --config configs/sft/demo.yaml model.init_from=runs/demo/pretrain/final

The loss covers the assistant's replies only (`assistant_only_loss`: the chat template marks each reply and its
closing eos with `{% generation %}`), so the model learns to answer, not to imitate users. With `packing: true`
several conversations share one row, each attending only to itself (block-diagonal attention from
`position_ids`). Writes what every stage writes (`train/runner.py`); `final/` is a model folder, or with LoRA an
adapter folder that `tinyllm lora merge` turns into one.
"""

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback
from trl import SFTConfig, SFTTrainer

from tiny_llama2_zh.config import ConfigError
from tiny_llama2_zh.data.conversations import TooLong, load_conversations
from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.infer.generate import SamplingOptions, generate_reply, turn_end_ids
from tiny_llama2_zh.loading import check_model_folder, init_tokenizer
from tiny_llama2_zh.presets import flops_per_token
from tiny_llama2_zh.train.callbacks import SamplesCallback
from tiny_llama2_zh.train.lora import LoraOptions, count_trainable, peft_config
from tiny_llama2_zh.train.runner import (
    LengthSortedSteps,
    StageRun,
    trainer_eval_loss,
    training_arguments,
    trl_defaults,
)

SAMPLE_PROMPTS = ["你好，请介绍一下你自己。", "中国的首都是哪里？"]


LossMean = Literal["tokens", "conversations"]


@dataclass
class SFTModelOptions:
    init_from: str  # a pretrained `final/` folder (or a checkpoint-N folder)
    tokenizer: str | None = None  # if given, init_from's tokenizer must be this one (same fingerprint)
    lora: LoraOptions | None = None  # train low-rank adapters only
    # > 0: the loss is the model's own chunked cross-entropy (LinearCrossEntropy, `ModelLossSFTTrainer`);
    # 0: TRL's fused log-prob head, which also logs entropy and token accuracy
    fused_loss_chunk_rows: int = 256


class LengthSortedSFTTrainer(LengthSortedSteps, SFTTrainer):
    """TRL's SFTTrainer whose optimizer steps split into length-sorted micro-batches (`LengthSortedSteps`)."""


class ModelLossSFTTrainer(LengthSortedSFTTrainer):
    """TRL's SFTTrainer with the loss computed by the model itself, through transformers' `Trainer.compute_loss`
    (labels, `num_items_in_batch`, the model's `LinearCrossEntropy`), instead of TRL's chunked log-prob head.

    Why: TRL 1.16 computes the loss with its own fused head so that it can log entropy and token accuracy too;
    on this project's CPU a training step of the demo (32 x 127 tokens, forward and backward) took 0.96 s with that
    head, 0.47 s with the model's plain loss and 0.40 s with its chunked one (`tinyllm sft` then logs no entropy
    or token accuracy). Everything else (data preparation, assistant-only labels, packing, PEFT, evaluation) is
    TRL's."""

    loss_mean_over: LossMean = "tokens"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.loss_mean_over == "tokens":
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        # "conversations": each row's reply tokens share one row's weight, so a one-token label and a 40-token
        # review count alike; the Trainer then divides by the gradient-accumulation steps (loss_is_scaled_for_ga)
        outputs = model(**inputs, loss_weights=conversation_weights(inputs["labels"]))
        return (outputs.loss, outputs) if return_outputs else outputs.loss


def conversation_weights(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) loss weights aligned with labels: 1 / (the row's labelled tokens x the rows that have any), so the
    loss is the mean over rows of each row's mean token loss. The token mean (transformers' and TRL's) lets long
    replies outweigh short ones by their length: in the demo's SFT mix the reviews' ~37-token replies took 76 % of
    the loss and the sentiment labels' ~4 tokens 16 %, though sentiment was half the rows. This is DAPO's
    "sample-level" loss (Yu et al. 2025, section 3.3), which suits a mix of short and long answers; with packing a
    row holds several conversations and they share its weight."""
    targets = labels[:, 1:] != -100  # (B, T-1): the model shifts labels the same way
    per_row = targets.sum(dim=1, keepdim=True)  # (B, 1)
    rows = (per_row > 0).sum().clamp(min=1)
    weights = targets / (per_row.clamp(min=1) * rows)
    return torch.cat([torch.zeros_like(weights[:, :1]), weights], dim=1)  # (B, T), position 0 is never a target


@dataclass
class SFTDataOptions:
    train: str | list[str]  # JSONL files of {"messages": [...]}, globs allowed
    validation: str | list[str] | None = None
    too_long: TooLong = "skip"  # or truncate_left: drop whole turns from the start until it fits
    max_train_examples: int | None = None  # per file: the first N usable conversations of each
    max_validation_examples: int = 500  # per file


@dataclass
class SFTRecipeConfig:
    model: SFTModelOptions
    data: SFTDataOptions
    # Any option of TRL's SFTConfig (TrainingArguments plus max_length, packing, assistant_only_loss, ...)
    train: dict[str, Any]
    # the loss's mean: over every reply token of the batch (transformers' and TRL's), or over conversations, each
    # the mean of its own reply's tokens (`conversation_weights`; needs model.fused_loss_chunk_rows > 0)
    loss_mean_over: LossMean = "tokens"
    sample_prompts: list[str] = field(default_factory=lambda: list(SAMPLE_PROMPTS))
    sample_max_new_tokens: int = 48
    peak_tflops: float | None = None
    resume: bool = False


def sft_arguments(config: SFTRecipeConfig) -> SFTConfig:
    return training_arguments(
        SFTConfig,
        config.train,
        "train",
        assistant_only_loss=True,
        max_length=512,
        learning_rate=1e-3 if config.model.lora else 3e-4,
        warmup_steps=20,
        **trl_defaults(SFTConfig),
        # the model's own loss returns no logits: evaluation keeps the loss only
        prediction_loss_only=bool(config.model.fused_loss_chunk_rows),
    )


def sft(config: SFTRecipeConfig, callbacks: list[TrainerCallback] | None = None) -> dict | None:
    args = sft_arguments(config)
    if config.loss_mean_over != "tokens" and not config.model.fused_loss_chunk_rows:
        raise ConfigError("loss_mean_over: conversations needs the model's own loss (model.fused_loss_chunk_rows > 0)")
    init_from = check_model_folder(config.model.init_from)
    tokenizer = init_tokenizer(init_from, config.model.tokenizer)
    lora = peft_config(config.model.lora) if config.model.lora else None
    train_rows, train_report = load_conversations(
        config.data.train, tokenizer, args.max_length, config.data.too_long, config.data.max_train_examples
    )
    print(f"train data: {train_report.summary()}")
    for example in train_report.examples[:5]:
        print(f"  skipped {example}")
    if not train_rows:
        raise UsageError(f"data.train {config.data.train}: no usable conversation")
    eval_rows, eval_report = [], None
    if config.data.validation:
        eval_rows, eval_report = load_conversations(
            config.data.validation,
            tokenizer,
            args.max_length,
            config.data.too_long,
            config.data.max_validation_examples,
        )
        print(f"validation data: {eval_report.summary()}")

    if not eval_rows and args.eval_strategy != "no":
        raise ConfigError("train.eval_steps evaluates periodically but data.validation gives no conversation")
    run = StageRun("sft", config, args, resume=config.resume)
    model = AutoModelForCausalLM.from_pretrained(str(init_from))
    model.fused_loss_chunk_rows = config.model.fused_loss_chunk_rows or None
    model.generation_config.eos_token_id = turn_end_ids(tokenizer)  # saved with the model: chat stops at a turn's end
    options = SamplingOptions(max_new_tokens=config.sample_max_new_tokens)

    def reply(model, prompt: str) -> str:
        return generate_reply(model, tokenizer, [{"role": "user", "content": prompt}], options)[0]

    samples = SamplesCallback(config.sample_prompts, reply, run.output_dir / "samples.jsonl")
    trainer_class = ModelLossSFTTrainer if config.model.fused_loss_chunk_rows else LengthSortedSFTTrainer
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=run.callbacks(samples, callbacks),
    )
    if config.loss_mean_over != "tokens":  # refused above unless the trainer is ModelLossSFTTrainer
        trainer.loss_mean_over = config.loss_mean_over
        trainer.loss_is_scaled_for_ga = False
    parameters = count_trainable(trainer.model)
    print(f"parameters: {parameters['trainable']:,} trainable of {parameters['total']:,}")
    run.attach(trainer, flops_per_token(model.config, args.max_length), config.peak_tflops)
    initial = run.evaluate_before(lambda: trainer_eval_loss(trainer)) if eval_rows else None
    output = run.train(trainer)
    final = run.evaluate_after(output.global_step, lambda: trainer_eval_loss(trainer)) if eval_rows else None
    return run.finish(
        trainer,
        tokenizer,
        {
            "init_from": str(init_from),
            "lora": lora is not None,
            "parameters": parameters,
            "data": {
                "train": train_report.as_dict(),
                "validation": eval_report.as_dict() if eval_report else None,
            },
            "initial_validation_loss": initial["eval_loss"] if initial else None,
            "final_validation_loss": final["eval_loss"] if final else None,
        },
    )
