"""Trainer callbacks every stage shares: the divergence guard, throughput, metrics.jsonl, config copies, samples.

They work with transformers' Trainer and every TRL trainer built on it, through the public callback events only.
"""

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from tiny_llama2_zh.errors import TrainingDivergedError
from tiny_llama2_zh.eval.perplexity import perplexity
from tiny_llama2_zh.runfiles import append_metrics, truncate_metrics
from tiny_llama2_zh.tensors import eval_mode
from tiny_llama2_zh.train.checkpoints import arguments_as_json, latest_complete_checkpoint


class DivergenceGuard(TrainerCallback):
    """Stops the run before the optimizer applies a step whose gradients are not finite (a NaN or infinite loss
    makes every gradient NaN, so this catches both), naming the step and the last complete checkpoint.

    fp16 is exempt: its loss scaler expects overflowing steps and skips them. Under DeepSpeed the gradients live
    in the engine, not on the parameters; there the logged loss is checked instead (after the step).
    """

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control, model=None, **kwargs):
        if args.fp16 or model is None:
            return
        gradients = [p.grad for p in model.parameters() if p.grad is not None]
        if not gradients:
            return
        norm = float(torch.nn.utils.get_total_norm(gradients))
        if not math.isfinite(norm):
            self._stop(args, state, f"the gradient norm is {norm} (a non-finite loss or gradient)", applied=False)

    def on_log(self, args: TrainingArguments, state: TrainerState, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if isinstance(loss, float) and not math.isfinite(loss):
            self._stop(args, state, f"the logged training loss is {loss}", applied=True)

    @staticmethod
    def _stop(args: TrainingArguments, state: TrainerState, what: str, applied: bool) -> None:
        checkpoint = latest_complete_checkpoint(args.output_dir, announce=False)
        step = state.global_step + (0 if applied else 1)
        happened = "" if applied else " Nothing of this step was applied."
        raise TrainingDivergedError(
            f"training diverged at step {step}: {what}.{happened} Last good checkpoint: {checkpoint or 'none yet'}. "
            "Lower train.learning_rate (or use bf16 instead of fp16) and resume."
        )


class ThroughputCallback(TrainerCallback):
    """Adds `tokens_per_second` (the real, non-padding tokens of every batch, all processes: the Trainer counts
    them with `include_num_input_tokens_seen="non_padding"`), `mfu` when a peak is known, and `eval_perplexity`
    to the log records. It must run before the loggers: `StageRun` puts it first."""

    def __init__(self, flops_per_token: float = 0.0, peak_flops: float | None = None, perplexity: bool = True):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.perplexity = perplexity
        self._mark: tuple[float, int] | None = None

    def on_train_begin(self, args, state: TrainerState, control, **kwargs):
        self._mark = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args: TrainingArguments, state: TrainerState, control, logs=None, **kwargs):
        if logs is None:
            return
        if "loss" in logs and self._mark is not None:
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            if tokens > self._mark[1]:
                rate = (tokens - self._mark[1]) / (now - self._mark[0])
                logs["tokens_per_second"] = rate
                if self.peak_flops and self.flops_per_token:
                    logs["mfu"] = rate * self.flops_per_token / (self.peak_flops * args.world_size)
            self._mark = (now, tokens)
        if self.perplexity and isinstance(logs.get("eval_loss"), float):
            logs["eval_perplexity"] = perplexity(logs["eval_loss"])


class MetricsFileCallback(TrainerCallback):
    """Appends every log record to metrics.jsonl (what `tinyllm plot` and a person read). On resume, records after
    the checkpoint's step are dropped first: the resumed run recomputes them.

    Only the main process touches the file: under torchrun every rank builds this callback, and ranks truncating
    and appending at once would race over one file (and one temporary name)."""

    def __init__(self, path: str | Path, resume_step: int | None = None, main_process: bool = True):
        self.path = Path(path)
        self.main_process = main_process
        if resume_step is not None and main_process:
            truncate_metrics(self.path, resume_step)

    def on_log(self, args, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.write({"step": state.global_step, **logs})

    def write(self, record: dict) -> None:
        if self.main_process:
            append_metrics(self.path, [record])


class CopyConfigToCheckpoints(TrainerCallback):
    """Keeps the resolved recipe config beside every checkpoint, so each one says how it was made, and its
    training arguments as JSON instead of transformers' pickle."""

    def __init__(self, config_file: str | Path):
        self.config_file = Path(config_file)

    def on_save(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if checkpoint.is_dir():
                shutil.copyfile(self.config_file, checkpoint / self.config_file.name)
                arguments_as_json(checkpoint, args)


# (model, prompt) -> the model's text for that prompt; a chat stage formats the prompt with the chat template.
SampleFunction = Callable[[PreTrainedModel, str], str]


class SamplesCallback(TrainerCallback):
    """Writes the model's reply to each sample prompt to samples.jsonl at every evaluation (and on request), so a
    person can watch it learn. Every process generates (ZeRO-3 shards the weights); the main one writes."""

    def __init__(self, prompts: list[str], sample: SampleFunction, path: str | Path):
        self.prompts, self.sample, self.path = prompts, sample, Path(path)

    def on_evaluate(self, args, state: TrainerState, control, model=None, **kwargs):
        if state.global_step > 0 and model is not None:
            self.write(model, state.global_step, state.is_world_process_zero)

    def write(self, model: PreTrainedModel, step: int, main_process: bool = True) -> dict[str, str]:
        with eval_mode(model):
            samples = {prompt: self.sample(model, prompt) for prompt in self.prompts}
        if main_process:
            records = [{"step": step, "prompt": prompt, "reply": text} for prompt, text in samples.items()]
            with self.path.open("a", encoding="utf-8") as out:
                out.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        return samples
