"""Training-loop plumbing shared by every stage (pretraining now; SFT, reward model, PPO and DPO reuse it).

The loop itself is transformers' `Trainer` (or a TRL trainer built on it): it already does mixed precision,
gradient accumulation, checkpoints with optimizer/scheduler/RNG state and data position, torchrun,
accelerate, DeepSpeed and FSDP. What lives here is what every stage adds around it:

- `TrainOptions`: one typed set of optimisation options (the `train:` section of every recipe YAML) and
  their translation to `TrainingArguments`;
- `TrainingGuards`: a mixin for any Trainer subclass that stops on a non-finite loss or gradient norm before
  the optimizer applies it, and adds tokens/s and MFU to every log record (so TensorBoard shows them);
- checkpoint helpers: which checkpoint is complete, resuming from it, the resolved config in each one;
- `MetricsFileCallback`: `metrics.jsonl`, the file a person (and `tinyllm plot`) reads.
"""

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

# Dense bf16 peak of common accelerators, TFLOP/s (vendor data sheets), used for MFU when
# `train.peak_tflops` is not given. MFU as in PaLM (Chowdhery et al. 2022, appendix B).
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "4090": 165.0}


@dataclass
class TrainOptions:
    """Optimisation and bookkeeping options: the `train:` section of every recipe YAML."""

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
    # auto: fused AdamW on GPUs (one kernel for all parameters), the foreach AdamW on CPUs, where the fused
    # one measured slower for the demo model (benchmarks: 150 steps 39.8 s fused vs 34.8 s foreach)
    optimizer: Literal["auto", "adamw_torch_fused", "adamw_torch"] = "auto"
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
    peak_tflops: float | None = None  # for MFU; None: looked up for known GPUs, omitted on CPU
    deepspeed: str | None = None  # a DeepSpeed JSON, e.g. configs/deepspeed/zero2.json
    fsdp: str = ""  # transformers' FSDP option string, e.g. "full_shard auto_wrap"
    ddp_backend: str | None = None  # None: accelerate picks (nccl on GPUs, gloo on CPU)


class TrainingDivergedError(RuntimeError):
    """Raised when the loss or gradient norm stops being finite."""


def training_arguments(options: TrainOptions, **stage_specific) -> TrainingArguments:
    """TrainingArguments from TrainOptions; a stage passes the few arguments that are its own (they win)."""
    if options.precision != "fp32" and not torch.cuda.is_available():
        raise ValueError(f"precision {options.precision} needs a GPU; use train.precision=fp32 on CPU")
    scheduler, scheduler_kwargs = options.lr_scheduler, {}
    if scheduler == "cosine":
        scheduler, scheduler_kwargs = "cosine_with_min_lr", {"min_lr_rate": options.min_lr_ratio}
    arguments = dict(
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
        optim=options.optimizer if options.optimizer != "auto" else optimizer_for_device(),
        logging_steps=options.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN must be seen, not averaged away
        eval_strategy="steps" if options.eval_steps > 0 else "no",
        prediction_loss_only=True,  # evaluation keeps losses only, never (tokens x vocab) logits in memory
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
        dataloader_num_workers=options.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        report_to=options.report_to,
        deepspeed=options.deepspeed,
        fsdp=options.fsdp,
        ddp_backend=options.ddp_backend,
        use_cpu=not torch.cuda.is_available(),  # also what makes torchrun on CPU run distributed (gloo)
    )
    arguments.update(stage_specific)
    return TrainingArguments(**arguments)


def optimizer_for_device() -> str:
    return "adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch"


def peak_flops(options: TrainOptions) -> float | None:
    if options.peak_tflops is not None:
        return options.peak_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


class TrainingGuards:
    """Mixin for a transformers Trainer (or a TRL trainer): put it first, `class X(TrainingGuards, Trainer)`.

    - Stops with `TrainingDivergedError` on a non-finite loss or gradient norm, before the optimizer step, naming
      the step and the last complete checkpoint (fp16 excepted for gradients: its loss scaler skips such steps).
    - Adds `tokens_per_second` and, when a peak is known, `mfu` to every training log record.

    Set `tokens_per_step` (all processes, one optimizer step) and `flops_per_token` after construction.
    """

    tokens_per_step: int = 0
    flops_per_token: float = 0.0
    peak_flops: float | None = None
    _speed_mark: tuple[float, int] | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(_StartSpeedClock(self))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            self._diverged(f"loss is {loss.item()}")
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if grad_norm is not None and not self.args.fp16 and not math.isfinite(float(grad_norm)):
            self._diverged(f"gradient norm is {float(grad_norm)}")
        return grad_norm

    def _diverged(self, what: str) -> None:
        step = self.state.global_step + 1
        checkpoint = latest_complete_checkpoint(self.args.output_dir)
        raise TrainingDivergedError(
            f"training diverged at step {step}: {what}. Nothing of this step was applied. Last good checkpoint: "
            f"{checkpoint or 'none yet'}. Lower train.learning_rate, or use bf16 instead of fp16, and resume."
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            now, step = time.perf_counter(), self.state.global_step
            if self._speed_mark is not None and step > self._speed_mark[1]:
                rate = (step - self._speed_mark[1]) * self.tokens_per_step / (now - self._speed_mark[0])
                logs["tokens_per_second"] = rate
                if self.peak_flops:
                    logs["mfu"] = rate * self.flops_per_token / (self.peak_flops * self.args.world_size)
            self._speed_mark = (now, step)
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        super().log(logs, start_time)


class _StartSpeedClock(TrainerCallback):
    def __init__(self, trainer: TrainingGuards):
        self.trainer = trainer

    def on_train_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        self.trainer._speed_mark = (time.perf_counter(), state.global_step)


class GuardedTrainer(TrainingGuards, Trainer):
    """transformers' Trainer with TrainingGuards: the pretraining loop."""


def checkpoint_is_complete(path: Path) -> bool:
    """transformers writes trainer_state.json last (after weights, optimizer, scheduler and RNG states), so a
    checkpoint with a readable one is complete; a crash mid-write leaves it missing or unparseable."""
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def checkpoint_step(path: Path) -> int:
    """checkpoint-1200 -> 1200."""
    return int(path.name.split("-")[-1])


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    checkpoints = sorted(
        (p for p in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.split("-")[-1].isdigit()),
        key=checkpoint_step,
        reverse=True,
    )
    for checkpoint in checkpoints:
        if checkpoint_is_complete(checkpoint):
            return checkpoint
        print(f"ignoring incomplete checkpoint {checkpoint} (interrupted while it was written)")
    return None


class CopyConfigToCheckpoints(TrainerCallback):
    """Keeps the resolved recipe config beside every checkpoint, so each one says how it was made."""

    def __init__(self, config_file: str | Path):
        self.config_file = Path(config_file)

    def on_save(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if checkpoint.is_dir():
                shutil.copyfile(self.config_file, checkpoint / self.config_file.name)


class MetricsFileCallback(TrainerCallback):
    """Appends every log record (train loss, lr, grad norm, tokens/s, MFU, eval loss and perplexity) to
    metrics.jsonl. On resume, records after the checkpoint's step are dropped first: they are recomputed."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
            temporary.replace(self.path)

    def on_log(self, args, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.write({"step": state.global_step, **logs})

    def write(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is it a run folder written by a tinyllm recipe?")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
