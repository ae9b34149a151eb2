"""Pretraining recipe: next-token prediction on a pretokenized `.bin`, on transformers' Trainer.

    tinyllm pretrain --config configs/pretrain/demo.yaml data.train=... train.max_steps=200

Writes under `train.output_dir`: the resolved config (`config.yaml`), `metrics.jsonl`, `loss.png`,
Trainer checkpoints (`checkpoint-N/`), TensorBoard logs, `samples.jsonl`, and the final model with its
tokenizer in `final/` (a `save_pretrained` folder).
"""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Subset
from transformers import TrainerCallback, default_data_collator
from transformers.integrations import is_deepspeed_zero3_enabled

from tiny_llama2_zh.config import save_config
from tiny_llama2_zh.data.pretokenized import MixedPretrainDataset, PretrainDataset
from tiny_llama2_zh.evaluate import evaluate_loss
from tiny_llama2_zh.generate import SamplingOptions, generate_text
from tiny_llama2_zh.model import TinyLlama2ForCausalLM
from tiny_llama2_zh.plot import plot_loss_curves
from tiny_llama2_zh.presets import count_parameters, flops_per_token, preset_config
from tiny_llama2_zh.tokenizer import load_tokenizer, tokenizer_fingerprint
from tiny_llama2_zh.train.common import (
    CopyConfigToCheckpoints,
    GuardedTrainer,
    MetricsFileCallback,
    TrainOptions,
    checkpoint_step,
    latest_complete_checkpoint,
    peak_flops,
    training_arguments,
)

# The seed project's sample prompts (a Tang poem and a book blurb).
SEED_PROMPTS = ["床前明月光，疑是地上霜。举头望明月，", "《小王子》是一本畅销童话书，它讲述了："]


@dataclass
class ModelOptions:
    """The `model:` section: a size preset, with any field overridden (transformers' Llama names)."""

    size: str = "9m"
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    max_position_embeddings: int | None = None
    multiple_of: int | None = None
    dropout: float = 0.0
    # Compute the training loss in row chunks without the full logits tensor (TinyLlama2ForCausalLM's
    # LinearCrossEntropy): same loss, far less memory, faster. 0 turns it off.
    fused_loss_chunk_rows: int = 1024


@dataclass
class DataOptions:
    """The `data:` section: tokenizer folder and pretokenized files (`tinyllm data tokenize`)."""

    tokenizer: str
    train: str | list[str]  # a .bin, a glob of shards (train-*.bin), or a list of them to mix
    validation: str | None = None
    train_weights: list[float] | None = None  # mixing weights when `train` is a list (default: by size)
    seq_len: int = 256
    eval_blocks: int = 200  # validation blocks per evaluation (a fixed, deterministic subset)


@dataclass
class PretrainConfig:
    data: DataOptions
    train: TrainOptions
    model: ModelOptions = field(default_factory=ModelOptions)
    sample_prompts: list[str] = field(default_factory=lambda: list(SEED_PROMPTS))
    sample_max_new_tokens: int = 60
    resume: bool = False  # continue from the newest checkpoint in train.output_dir


@dataclass
class PretrainResult:
    output_dir: str
    final_model_dir: str
    parameters: dict[str, int]
    steps: int
    train_seconds: float
    tokens_seen: int
    initial_validation_loss: float | None
    final_validation_loss: float | None
    samples: dict[str, str]


def pretrain(config: PretrainConfig, callbacks: list[TrainerCallback] | None = None) -> PretrainResult | None:
    """Run the recipe. Returns the result on the main process (None on the others)."""
    output_dir = Path(config.train.output_dir)
    checkpoint = latest_complete_checkpoint(output_dir) if config.resume else None
    if (output_dir / "metrics.jsonl").exists() and not config.resume:
        raise FileExistsError(
            f"{output_dir} already holds a run; pass resume=true to continue it, or choose another train.output_dir"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir / "config.yaml")

    tokenizer = load_tokenizer(config.data.tokenizer)
    fingerprint = tokenizer_fingerprint(tokenizer)
    model_config = preset_config(
        config.model.size,
        vocab_size=len(tokenizer),
        hidden_size=config.model.hidden_size,
        num_hidden_layers=config.model.num_hidden_layers,
        num_attention_heads=config.model.num_attention_heads,
        num_key_value_heads=config.model.num_key_value_heads,
        max_position_embeddings=config.model.max_position_embeddings,
        multiple_of=config.model.multiple_of,
        dropout=config.model.dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if config.data.seq_len > model_config.max_position_embeddings:
        raise ValueError(
            f"data.seq_len {config.data.seq_len} exceeds the model context {model_config.max_position_embeddings}"
        )
    torch.manual_seed(config.train.seed)
    model = TinyLlama2ForCausalLM(model_config)
    model.fused_loss_chunk_rows = config.model.fused_loss_chunk_rows or None

    train_dataset = training_data(config.data, fingerprint, config.train.seed)
    eval_dataset = None
    if config.data.validation:
        validation = PretrainDataset(config.data.validation, config.data.seq_len, expected_fingerprint=fingerprint)
        eval_dataset = Subset(validation, range(min(config.data.eval_blocks, len(validation))))

    args = training_arguments(config.train)
    resume_step = checkpoint_step(checkpoint) if checkpoint else (0 if config.resume else None)
    metrics_file = MetricsFileCallback(output_dir / "metrics.jsonl", resume_step=resume_step)
    trainer = GuardedTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=[
            metrics_file,
            CopyConfigToCheckpoints(output_dir / "config.yaml"),
            SamplesCallback(config, output_dir / "samples.jsonl"),
            *(callbacks or []),
        ],
    )
    trainer.tokens_per_step = (
        config.data.seq_len
        * args.per_device_train_batch_size
        * args.gradient_accumulation_steps
        * trainer.accelerator.num_processes
    )
    trainer.flops_per_token = flops_per_token(model_config, config.data.seq_len)
    trainer.peak_flops = peak_flops(config.train)
    # Our own evaluator, not trainer.evaluate(): evaluating through the Trainer before train() marks the model
    # as prepared by accelerate, which then skips wrapping it in DistributedDataParallel (seen with
    # transformers 5.23 / accelerate 1.15: ranks trained apart under torchrun).
    initial_loss = None
    if eval_dataset is not None and checkpoint is None:
        initial = evaluate_loss(model, eval_dataset, args.per_device_eval_batch_size)
        initial_loss = initial.loss
        if trainer.is_world_process_zero():
            metrics_file.write({"step": 0, "eval_loss": initial.loss, "eval_perplexity": initial.perplexity})

    if checkpoint is not None:
        print(f"resuming from {checkpoint}")
    started = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - started
    final_loss = None
    if eval_dataset is not None:
        final_loss = evaluate_loss(trainer.model, eval_dataset, args.per_device_eval_batch_size).loss

    final_dir = output_dir / "final"
    trainer.save_model(str(final_dir))
    # every process generates (ZeRO-3 shards the weights, so a forward pass needs all of them); one writes
    main_process = trainer.is_world_process_zero()
    step = train_output.global_step
    samples = write_samples(
        trainer.model, tokenizer, config, output_dir / "samples.jsonl" if main_process else None, step
    )
    if not main_process:
        return None
    tokenizer.save_pretrained(str(final_dir))
    plot_loss_curves(output_dir)
    result = PretrainResult(
        output_dir=str(output_dir),
        final_model_dir=str(final_dir),
        parameters=count_parameters(model_config),
        steps=step,
        train_seconds=round(train_seconds, 2),
        tokens_seen=step * trainer.tokens_per_step,
        initial_validation_loss=initial_loss,
        final_validation_loss=final_loss,
        samples=samples,
    )
    (output_dir / "summary.json").write_text(json.dumps(asdict(result), indent=2, ensure_ascii=False) + "\n")
    return result


def training_data(data: DataOptions, fingerprint: str, seed: int) -> PretrainDataset | MixedPretrainDataset:
    paths = [data.train] if isinstance(data.train, str) else data.train
    datasets = [PretrainDataset(path, data.seq_len, expected_fingerprint=fingerprint) for path in paths]
    if len(datasets) == 1 and data.train_weights is None:
        return datasets[0]
    weights = data.train_weights or [float(len(d)) for d in datasets]
    return MixedPretrainDataset(datasets, weights, seed=seed)


def write_samples(model, tokenizer, config: PretrainConfig, path: Path | None, step: int) -> dict[str, str]:
    """Seeded top-p samples continuing each sample prompt, appended to `path` (samples.jsonl) with the step, so
    that a person can watch the model learn (the seed project shows the same). `path=None` writes nothing."""
    was_training = model.training
    model.eval()
    options = SamplingOptions(
        max_new_tokens=config.sample_max_new_tokens, temperature=0.8, top_p=0.9, repetition_penalty=1.1
    )
    synced = is_deepspeed_zero3_enabled()
    samples = {
        prompt: generate_text(model, tokenizer, prompt, options, synced_gpus=synced) for prompt in config.sample_prompts
    }
    if path is not None:
        with path.open("a", encoding="utf-8") as out:
            for prompt, text in samples.items():
                record = {"step": step, "prompt": prompt, "continuation": text}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
    model.train(was_training)
    return samples


class SamplesCallback(TrainerCallback):
    """Writes continuations of the sample prompts at every periodic evaluation."""

    def __init__(self, config: PretrainConfig, path: Path):
        self.config, self.path = config, path

    def on_evaluate(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step > 0 and model is not None:
            path = self.path if state.is_world_process_zero else None
            write_samples(model, processing_class, self.config, path, state.global_step)
