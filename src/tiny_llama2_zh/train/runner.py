"""The stage runner: what every training stage (pretrain, sft, reward, dpo, grpo, ...) does around its trainer.

The loop itself is transformers' `Trainer` or a TRL trainer built on it: mixed precision, gradient accumulation,
checkpoints with optimizer/scheduler/RNG state and data position, torchrun, accelerate, DeepSpeed and FSDP.
Around it, every stage needs the same things, and gets them here:

- its `train:` YAML section turned into the stage's own argument class (`TrainingArguments`, `SFTConfig`,
  `RewardConfig`, `DPOConfig`, `GRPOConfig`) and validated by it, with this project's defaults beneath
  (`training_arguments`); a misspelled key names the closest valid ones;
- refuse-or-resume for the run folder, the resolved config in the run and beside every checkpoint;
- `metrics.jsonl`, tokens/s and MFU, the divergence guard, sample replies at every evaluation;
- evaluation before and after training, the final model saved with its tokenizer, curves as PNG, `summary.json`.

A recipe builds its data, model and trainer, and hands the trainer to `StageRun`.
"""

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import has_length

from tiny_llama2_zh.config import ConfigError, check_library_options, save_config
from tiny_llama2_zh.eval.perplexity import perplexity
from tiny_llama2_zh.model import TinyLlama2PreTrainedModel
from tiny_llama2_zh.runfiles import METRICS_FILE, plot_curves, read_metrics
from tiny_llama2_zh.tensors import eval_mode
from tiny_llama2_zh.train.callbacks import (
    CopyConfigToCheckpoints,
    DivergenceGuard,
    MetricsFileCallback,
    SamplesCallback,
    ThroughputCallback,
)
from tiny_llama2_zh.train.checkpoints import (
    arguments_as_json,
    checkpoint_step,
    checkpoints,
    latest_complete_checkpoint,
)

ArgsT = TypeVar("ArgsT", bound=TrainingArguments)

# Dense bf16 peak of common accelerators, TFLOP/s (vendor data sheets), for MFU as in PaLM (Chowdhery et al.
# 2022, appendix B). Override with the recipe's `peak_tflops`. On a CPU there is no published peak to divide by.
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "4090": 165.0}


def project_defaults() -> dict[str, Any]:
    """This project's defaults beneath every stage's `train:` section (the YAML wins). llama2.c's optimiser
    settings: AdamW betas (0.9, 0.95), weight decay 0.1, cosine decay to a tenth of the peak learning rate."""
    gpu = torch.cuda.is_available()
    return {
        "max_steps": 1000,
        "per_device_train_batch_size": 8,
        "learning_rate": 5e-4,
        "lr_scheduler_type": "cosine_with_min_lr",
        "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
        "warmup_steps": 100,
        "weight_decay": 0.1,
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "max_grad_norm": 1.0,
        # fused AdamW is one kernel for all parameters on a GPU; on a CPU torch's default AdamW (its per-tensor loop:
        # foreach is a CUDA default) measured faster than the fused one for the demo model (150 steps: 34.8 s vs 39.8 s)
        "optim": "adamw_torch_fused" if gpu else "adamw_torch",
        "logging_steps": 10,
        "logging_first_step": True,
        "logging_nan_inf_filter": False,  # a NaN must be seen (and stop the run), not averaged away
        "eval_strategy": "no",
        "save_strategy": "steps",
        "save_steps": 500,
        "save_total_limit": 2,
        "seed": 1337,
        "report_to": ["tensorboard"],
        "include_num_input_tokens_seen": "non_padding",  # tokens/s from each batch's real tokens
        "dataloader_pin_memory": gpu,
        "use_cpu": not gpu,  # also what makes torchrun on a CPU run distributed (gloo)
    }


def trl_defaults(args_class: type[TrainingArguments]) -> dict[str, Any]:
    """Beneath every TRL stage: TRL's configs default to bf16 and activation checkpointing, which assume a GPU; on
    a CPU bf16 is slow and checkpointing buys nothing. Datasets are prepared in this process (where the class
    has that option)."""
    gpu = torch.cuda.is_available()
    defaults = {
        "bf16": gpu and torch.cuda.is_bf16_supported(),
        "activation_checkpointing": False,
        "dataset_num_proc": None,
    }
    names = {f.name for f in dataclasses.fields(args_class)}
    return {name: value for name, value in defaults.items() if name in names}


# Beneath the reinforcement-learning stages (PPO, RLOO, GRPO): a small constant-then-linear learning rate without
# weight decay, as TRL's RL trainers default to; the recipes' own YAMLs set the rate.
RL_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-5,
    "warmup_steps": 0,
    "lr_scheduler_type": "linear",
    "lr_scheduler_kwargs": {},
    "weight_decay": 0.0,
    "include_num_input_tokens_seen": "no",  # their batches are prompts, not the tokens trained on
}


def training_arguments(
    args_class: type[ArgsT], values: dict[str, Any], where: str = "train", **stage_defaults: Any
) -> ArgsT:
    """The stage's argument class from its `train:` section: project defaults, then the stage's own defaults, then
    the YAML. Conveniences: `eval_steps: N` alone turns periodic evaluation on (0 turns it off); a scheduler other
    than the default drops the default's `min_lr_rate`; `data_seed` follows `seed`. Limits that the libraries
    accept but that train nothing (or garbage) are refused here, before a run folder is touched."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of {args_class.__name__} options, got {values!r}")
    values = dict(values)
    if "output_dir" not in values:
        raise ConfigError(f"{where}.output_dir is required: the folder the run writes to")
    # a deep copy: nested defaults (RL_DEFAULTS' `lr_scheduler_kwargs: {}`) and the config's own mappings would
    # otherwise be one object shared by every run's arguments, so one run's change would reach the next
    merged = copy.deepcopy({**project_defaults(), **stage_defaults, **values})
    if values.get("eval_steps") == 0:
        merged.pop("eval_steps")
        merged["eval_strategy"] = "no"
    elif values.get("eval_steps") and "eval_strategy" not in values:
        merged["eval_strategy"] = "steps"
    if "lr_scheduler_type" in values and "lr_scheduler_kwargs" not in values:
        merged["lr_scheduler_kwargs"] = {}
    merged.setdefault("data_seed", merged["seed"])
    args = check_library_options(args_class, merged, where)
    _check_limits(args, where)
    return args


def _check_limits(args: TrainingArguments, where: str) -> None:
    if args.max_steps == 0 or (args.max_steps < 0 and args.num_train_epochs <= 0):
        raise ConfigError(f"{where}.max_steps is {args.max_steps}: the run would train nothing")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise ConfigError(f"{where}.learning_rate must be a positive finite number, got {args.learning_rate}")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"{where}.{name} must be at least 1, got {getattr(args, name)}")
    if args.max_grad_norm is not None and not math.isfinite(args.max_grad_norm):
        raise ConfigError(f"{where}.max_grad_norm must be finite, got {args.max_grad_norm}")


def peak_flops(peak_tflops: float | None) -> float | None:
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def run_folder_state(output_dir: Path) -> str:
    """'empty', 'residue' (a start that failed before its first step: config and a step-0 evaluation at most),
    or 'run' (a checkpoint, a final model or a training record exists)."""
    if checkpoints(output_dir) or (output_dir / "final").exists():
        return "run"
    metrics = output_dir / METRICS_FILE
    if metrics.is_file():
        if any(record.get("step", 0) > 0 for record in read_metrics(metrics)):
            return "run"
        return "residue"
    return "empty"


def compile_decoder_layers(trainer: Trainer, fixed_shapes: bool = False) -> bool:
    """`train.torch_compile: true` for this project's models: compile each decoder layer in place
    (`TinyLlama2PreTrainedModel.compile_layers`, PyTorch's regional compilation recipe) instead of letting
    accelerate wrap the whole model in `torch.compile`. Returns whether it did.

    `fixed_shapes`: every training batch has one shape (pretraining's blocks of seq_len), so the layers compile
    once for it, static. Otherwise (SFT, DPO, the RL stages: batches padded to their longest row, or packed rows)
    they compile with dynamic shapes from the first batch (`dynamic=True`): left to dynamo's automatic dynamic
    shapes, the first batch's length was compiled static and thrown away at the second (measured, torch 2.13: SFT
    with packing compiled a graph for its first length, then a dynamic one; one compile of a layer's forward and
    backward is ~50 C++ kernels on a CPU, tens of seconds).

    Why: compiled whole, the graph takes in create_causal_mask and the fused loss's chunk loop, both of which
    specialise on the sequence length, so every new batch shape is a new graph. Measured on CPU (torch 2.13, TRL
    1.16): SFT with `packing: true` (padding-free rows of varying length) recompiled the whole model at every one
    of its 4 steps, ~40 s each, and would fall back to eager after `torch._dynamo.config.recompile_limit` (8).
    The layers alone see (batch, length, dim) activations: after one recompile dynamo marks the length dynamic.
    Parameter names keep no `_orig_mod.` prefix either way. Other models (none today) keep accelerate's compile;
    the backend and mode are still the arguments' (`torch_compile_backend`, `torch_compile_mode`)."""
    args = trainer.args
    if not args.torch_compile:
        return False
    model = next((m for m in trainer.model.modules() if isinstance(m, TinyLlama2PreTrainedModel)), None)
    if model is None:
        return False
    mode = {"mode": args.torch_compile_mode} if args.torch_compile_mode else {}
    model.compile_layers(backend=args.torch_compile_backend, dynamic=None if fixed_shapes else True, **mode)
    # accelerate compiles at prepare() time when its dynamo backend is set (Trainer sets it from the arguments);
    # the layers are compiled already. The arguments keep torch_compile=true (TF32 and FSDP read it).
    from accelerate.utils import DynamoBackend, is_compiled_module

    trainer.accelerator.state.dynamo_plugin.backend = DynamoBackend.NO
    # TRL prepares its frozen models (DPO's and GRPO's reference, GRPO's reward models) in __init__, so accelerate
    # has wrapped them whole already: they only ever run without grad mode, where compiled layers run eagerly too,
    # and compiled whole they graph-break in TRL's chunked log-prob kernel and recompile for every batch length
    # (measured: DPO, TRL 1.16). Unwrapped, they run eagerly.
    if is_compiled_module(getattr(trainer, "ref_model", None)):
        trainer.ref_model = trainer.ref_model._orig_mod
    reward_funcs = getattr(trainer, "reward_funcs", None)
    if isinstance(reward_funcs, list):
        trainer.reward_funcs = [f._orig_mod if is_compiled_module(f) else f for f in reward_funcs]
    return True


class StageRun:
    """One training run of one stage in one folder. Construct it after the data and options are validated: it
    refuses a folder that holds another run (unless resuming), then writes the resolved config.

        run = StageRun("sft", config, args, resume=config.resume)
        trainer = SomeTrainer(..., callbacks=run.callbacks(samples))
        run.attach(trainer, flops_per_token=...)
        run.evaluate_before(lambda: {"eval_loss": ...})
        output = run.train(trainer)
        run.finish(trainer, tokenizer, summary={...})
    """

    def __init__(
        self, stage: str, config: Any, args: TrainingArguments, resume: bool = False, language_model: bool = True
    ):
        self.stage = stage
        self.language_model = language_model  # its eval_loss is nats per token, so perplexity means something
        self.args = args
        self.output_dir = Path(args.output_dir)
        self.main_process = args.process_index == 0
        state = run_folder_state(self.output_dir)
        self.checkpoint = latest_complete_checkpoint(self.output_dir) if resume else None
        if state == "run" and not resume:
            raise FileExistsError(
                f"{self.output_dir} already holds a run; pass --resume (resume=true) to continue it, "
                "or choose another train.output_dir"
            )
        if state == "residue" and not resume and self.main_process:
            print(f"{self.output_dir}: an earlier start failed before its first step; starting over")
            (self.output_dir / METRICS_FILE).unlink()
        # metrics.jsonl keeps what the checkpoint saw; resuming with no checkpoint starts the records over
        self.resume_step = checkpoint_step(self.checkpoint) if self.checkpoint else (-1 if resume else None)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.config_file = self.output_dir / "config.yaml"
        if self.main_process:
            save_config(config, self.config_file)
        self.metrics = MetricsFileCallback(
            self.output_dir / METRICS_FILE, resume_step=self.resume_step, main_process=self.main_process
        )
        self.samples: SamplesCallback | None = None
        self.stage_seconds = 0.0

    def callbacks(self, samples: SamplesCallback | None = None, extra: list[TrainerCallback] | None = None) -> list:
        self.samples = samples
        chosen = [self.metrics, CopyConfigToCheckpoints(self.config_file), DivergenceGuard()]
        return [*chosen, *([samples] if samples else []), *(extra or [])]

    def attach(
        self,
        trainer: Trainer,
        flops_per_token: float = 0.0,
        peak_tflops: float | None = None,
        fixed_shapes: bool = False,
    ) -> None:
        """Put the throughput callback first, so that the loggers (TensorBoard, metrics.jsonl) see its values, and
        turn `train.torch_compile` into regional compilation (`compile_decoder_layers`; `fixed_shapes`: every
        training batch has the same shape)."""
        throughput = ThroughputCallback(flops_per_token, peak_flops(peak_tflops), self.language_model)
        trainer.callback_handler.callbacks.insert(0, throughput)
        compile_decoder_layers(trainer, fixed_shapes)

    def evaluate_before(self, evaluate: Callable[[], dict[str, float]]) -> dict[str, float] | None:
        """Evaluation at step 0 (skipped when resuming: the record is already in metrics.jsonl)."""
        if self.checkpoint is not None:
            return None
        metrics = evaluate()
        if self.language_model and "eval_loss" in metrics and "eval_perplexity" not in metrics:
            metrics["eval_perplexity"] = perplexity(metrics["eval_loss"])
        if self.main_process:
            self.metrics.write({"step": 0, **metrics})
        return metrics

    def train(self, trainer: Trainer):
        if self.checkpoint is not None:
            print(f"resuming from {self.checkpoint}")
        started = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=str(self.checkpoint) if self.checkpoint else None)
        self.stage_seconds = time.perf_counter() - started
        return output

    def evaluate_after(self, step: int, evaluate: Callable[[], dict[str, float]]) -> dict[str, float]:
        metrics = evaluate()
        if self.main_process:
            self.metrics.write({"step": step, "final": True, **metrics})
        return metrics

    def finish(
        self, trainer: Trainer, tokenizer: PreTrainedTokenizerBase, summary: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Save the final model with its tokenizer (`final/`), sample once more, draw the curves and write
        `summary.json`. Every process takes part in saving and sampling (ZeRO-3); the main one returns the
        summary, the others None.

        `final/` holds no pickle: transformers' `Trainer._save` writes the arguments with `torch.save`
        (`training_args.bin`, which runs code when loaded); they are kept as `training_args.json` instead."""
        final_dir = self.output_dir / "final"
        trainer.save_model(str(final_dir))
        step = trainer.state.global_step
        if self.samples is not None:
            summary["samples"] = self.samples.write(trainer.model, step, self.main_process)
        if not self.main_process:
            return None
        tokenizer.save_pretrained(str(final_dir))
        arguments_as_json(final_dir, trainer.args)
        plot_curves(self.output_dir)
        summary = {
            "stage": self.stage,
            "output_dir": str(self.output_dir),
            "final_model_dir": str(final_dir),
            "steps": step,
            "train_seconds": round(self.stage_seconds, 2),
            "tokens_seen": trainer.state.num_input_tokens_seen,
            **summary,
        }
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        return summary


class HeldOutEvaluation:
    """Mixin for a Trainer (first in the bases) whose every evaluation is the recipe's own held-out measure,
    `held_out_metrics()` -> {"eval_...": value}, the same function that scores the model before and after
    training. Logged through `Trainer.log`, not the TRL trainer's own `log`, which would mix in (and reset) its
    training averages; the callbacks see it as any evaluation (samples, metrics.jsonl, TensorBoard)."""

    def held_out_metrics(self) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = self.held_out_metrics()
        Trainer.log(self, metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics


class LengthSortedSteps:
    """Mixin for a Trainer (first in the bases): the rows of each optimizer step are drawn at random, as
    transformers' default sampler draws them, and then sorted longest first, so that the step's gradient-
    accumulation micro-batches each hold rows of similar length and pad little. The step's rows, and so its
    gradient, are what they would be without the sort; only how they are split into micro-batches changes. It is
    transformers' `LengthGroupedSampler` with a mega-batch of one optimizer step: that sampler sorts 50 steps' rows
    at once, so one task's long rows would fill whole steps on their own.

    Why: the demo's SFT mix pads each random batch of 32 to its longest row, 2.5x the real tokens (addition's 31
    tokens beside reviews of up to 173); split into 4 length-sorted micro-batches, 1.25x. Set
    `gradient_accumulation_steps` > 1 for it to matter; with one micro-batch per step it changes nothing."""

    length_columns: tuple[str, ...] = ("input_ids",)  # the tokenised columns whose lengths add up to a row's cost

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if dataset is None or not has_length(dataset):  # a stream: read in its own order, as transformers does
            return super()._get_train_sampler(train_dataset)
        step_rows = self.args.train_batch_size * self.args.gradient_accumulation_steps * max(1, self.args.world_size)
        columns = [dataset[column] for column in self.length_columns]
        return _StepSortedSampler([sum(map(len, row)) for row in zip(*columns, strict=True)], step_rows)


class _StepSortedSampler(torch.utils.data.Sampler[int]):
    def __init__(self, lengths: list[int], step_rows: int):
        self.lengths, self.step_rows = lengths, step_rows
        # None: torch's global generator, as transformers' RandomSampler uses it (a resumed run restores its
        # state); under several processes accelerate sets and synchronises this one, so every rank draws alike
        self.generator: torch.Generator | None = None

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        for start in range(0, len(order), self.step_rows):
            yield from sorted(order[start : start + self.step_rows], key=self.lengths.__getitem__, reverse=True)


def trainer_eval_loss(trainer: Trainer) -> dict[str, float]:
    """The eval loss as the Trainer's periodic evaluation computes it -- the trainer's own `compute_loss` on each
    batch of its eval dataloader (its collator, packing, label masking and loss mean), the batches weighted by
    their rows -- so that the records before and after training sit on the same curve as the ones between (SFT's
    conversation mean is not the token mean: on the demo 2.16 against 5.12 nats). Computed without
    `trainer.evaluate()`: evaluating through the Trainer before `train()` marks the model as prepared by
    accelerate, which then skips wrapping it in DistributedDataParallel (transformers 5.23 / accelerate 1.15:
    ranks trained apart under torchrun)."""
    total, rows = 0.0, 0
    with eval_mode(trainer.model), torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            batch = trainer._prepare_inputs(batch)
            batch_rows = len(batch["input_ids"])
            total += float(trainer.compute_loss(trainer.model, batch)) * batch_rows
            rows += batch_rows
    if not rows:
        raise ConfigError("the validation data holds no rows to evaluate")
    return {"eval_loss": total / rows}
