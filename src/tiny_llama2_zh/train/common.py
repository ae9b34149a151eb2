"""Training-loop plumbing shared by every stage (pretraining now; SFT, reward model, PPO and DPO reuse it).

The loop itself is transformers' `Trainer` (or a TRL trainer built on it): it already does mixed precision,
gradient accumulation, checkpointing, torchrun/accelerate/DeepSpeed and logging. What lives here is what every
stage adds around it: one typed set of optimisation options, their translation to `TrainingArguments`, and a
metrics file a person can read (`metrics.jsonl`), with tokens/s, that `tinyllm plot` turns into a PNG.
"""

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


@dataclass
class TrainOptions:
    """Optimisation and bookkeeping options, the `train:` section of every recipe YAML."""

    output_dir: str
    max_steps: int = 1000
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-4
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio (llama2.c: min_lr = lr / 10)
    warmup_steps: int = 100
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    eval_steps: int = 200  # 0 disables periodic evaluation
    save_steps: int = 500
    save_total_limit: int = 2
    seed: int = 1337
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    torch_compile: bool = False
    gradient_checkpointing: bool = False
    dataloader_num_workers: int = 0
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])


def training_arguments(options: TrainOptions, **stage_specific) -> TrainingArguments:
    """TrainingArguments from TrainOptions; a stage passes the few arguments that are its own."""
    if options.precision != "fp32" and not torch.cuda.is_available():
        raise ValueError(f"precision {options.precision} needs a GPU; use precision: fp32 on CPU")
    scheduler, scheduler_kwargs = options.lr_scheduler, {}
    if scheduler == "cosine":
        scheduler, scheduler_kwargs = "cosine_with_min_lr", {"min_lr_rate": options.min_lr_ratio}
    return TrainingArguments(
        output_dir=options.output_dir,
        max_steps=options.max_steps,
        per_device_train_batch_size=options.per_device_batch_size,
        per_device_eval_batch_size=options.per_device_batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        learning_rate=options.learning_rate,
        lr_scheduler_type=scheduler,
        lr_scheduler_kwargs=scheduler_kwargs,
        warmup_steps=options.warmup_steps,
        weight_decay=options.weight_decay,
        adam_beta1=options.adam_beta1,
        adam_beta2=options.adam_beta2,
        max_grad_norm=options.max_grad_norm,
        logging_steps=options.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if options.eval_steps > 0 else "no",
        eval_steps=options.eval_steps if options.eval_steps > 0 else None,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        seed=options.seed,
        data_seed=options.seed,
        bf16=options.precision == "bf16",
        fp16=options.precision == "fp16",
        torch_compile=options.torch_compile,
        activation_checkpointing=options.gradient_checkpointing,
        dataloader_pin_memory=torch.cuda.is_available(),
        dataloader_num_workers=options.dataloader_num_workers,
        report_to=options.report_to,
        **stage_specific,
    )


class MetricsFileCallback(TrainerCallback):
    """Appends every log record (train loss, lr, grad norm, eval loss, perplexity, tokens/s) to metrics.jsonl."""

    def __init__(self, path: str | Path, tokens_per_step: int):
        self.path = Path(path)
        self.tokens_per_step = tokens_per_step
        self._last_time: float | None = None
        self._last_step = 0

    def on_train_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        self._last_time, self._last_step = time.perf_counter(), state.global_step

    def on_log(self, args, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, **logs}
        if "eval_loss" in logs:
            record["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        if "loss" in logs and self._last_time is not None:
            now = time.perf_counter()
            steps = state.global_step - self._last_step
            if steps > 0:
                record["tokens_per_second"] = steps * self.tokens_per_step / (now - self._last_time)
            self._last_time, self._last_step = now, state.global_step
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is it a run folder written by a tinyllm recipe?")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
