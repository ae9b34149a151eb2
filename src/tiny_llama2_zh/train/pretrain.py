"""Pretraining recipe: next-token prediction on pretokenized shards, on transformers' Trainer.

    tinyllm pretrain --config configs/pretrain/demo.yaml data.train=... train.max_steps=200

Writes under `train.output_dir` (see `train/runner.py`): the resolved config (`config.yaml`), `metrics.jsonl`,
`loss.png`, Trainer checkpoints (`checkpoint-N/`), TensorBoard logs, `samples.jsonl`, `summary.json`, and the
final model with its tokenizer in `final/` (a `save_pretrained` folder).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator
from transformers.integrations import is_deepspeed_zero3_enabled

from tiny_llama2_zh.data.pretokenized import MixedPretrainDataset, PretrainDataset, expand_token_files
from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.eval.perplexity import evaluate_loss
from tiny_llama2_zh.infer.generate import SamplingOptions, generate_text
from tiny_llama2_zh.model import TinyLlama2Config, TinyLlama2ForCausalLM
from tiny_llama2_zh.presets import count_parameters, flops_per_token, preset_config
from tiny_llama2_zh.tokenizer import load_tokenizer, tokenizer_fingerprint
from tiny_llama2_zh.train.callbacks import SamplesCallback
from tiny_llama2_zh.train.runner import StageRun, training_arguments

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
    fused_loss_chunk_rows: int = 256  # 128-512 measured alike on CPU, 5-9% faster than 1024 (benchmarks)


@dataclass
class DataOptions:
    """The `data:` section: tokenizer folder and pretokenized shards (`tinyllm data prepare` / `data tokenize`)."""

    tokenizer: str
    train: str | list[str]  # a .bin, a glob of shards (train-*.bin), or a list of them to mix
    validation: str | None = None  # a .bin or a glob (validation-*.bin)
    train_weights: list[float] | None = None  # mixing weights when `train` is a list (default: by size)
    seq_len: int = 256
    eval_blocks: int = 200  # validation blocks per evaluation (a fixed, deterministic subset)


@dataclass
class PretrainConfig:
    data: DataOptions
    # Any option of transformers' TrainingArguments (validated by it), over this project's defaults
    # (`train/runner.py: project_defaults`). `output_dir` is required.
    train: dict[str, Any]
    model: ModelOptions = field(default_factory=ModelOptions)
    sample_prompts: list[str] = field(default_factory=lambda: list(SEED_PROMPTS))
    sample_max_new_tokens: int = 60
    peak_tflops: float | None = None  # the accelerator's peak, for MFU; None: looked up for known GPUs
    resume: bool = False  # continue from the newest complete checkpoint in train.output_dir


def build_model_config(options: ModelOptions, tokenizer) -> TinyLlama2Config:
    """The model's config: the size preset, the `model:` overrides, and the tokenizer's vocabulary and special ids."""
    return preset_config(
        options.size,
        vocab_size=len(tokenizer),
        hidden_size=options.hidden_size,
        num_hidden_layers=options.num_hidden_layers,
        num_attention_heads=options.num_attention_heads,
        num_key_value_heads=options.num_key_value_heads,
        max_position_embeddings=options.max_position_embeddings,
        multiple_of=options.multiple_of,
        dropout=options.dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def pretrain_arguments(config: PretrainConfig) -> TrainingArguments:
    # evaluation keeps losses only, never (tokens x vocab) logits in memory
    return training_arguments(TrainingArguments, config.train, "train", prediction_loss_only=True)


def pretrain(config: PretrainConfig, callbacks: list[TrainerCallback] | None = None) -> dict | None:
    """Run the recipe. Returns the summary on the main process (None on the others). Everything is validated
    (options, tokenizer, data) before the run folder is touched."""
    args = pretrain_arguments(config)
    tokenizer = load_tokenizer(config.data.tokenizer)
    fingerprint = tokenizer_fingerprint(tokenizer)
    model_config = build_model_config(config.model, tokenizer)
    if config.data.seq_len > model_config.max_position_embeddings:
        raise UsageError(
            f"data.seq_len {config.data.seq_len} exceeds the model context {model_config.max_position_embeddings}"
        )
    train_dataset = training_data(config.data, fingerprint, args.seed)
    eval_dataset = None
    if config.data.validation:
        validation = PretrainDataset(
            _existing(config.data.validation, "data.validation"), config.data.seq_len, expected_fingerprint=fingerprint
        )
        eval_dataset = Subset(validation, range(min(config.data.eval_blocks, len(validation))))

    run = StageRun("pretrain", config, args, resume=config.resume)
    torch.manual_seed(args.seed)
    model = TinyLlama2ForCausalLM(model_config)
    model.fused_loss_chunk_rows = config.model.fused_loss_chunk_rows or None
    samples = SamplesCallback(
        config.sample_prompts, continuation_sampler(tokenizer, config), run.output_dir / "samples.jsonl"
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=run.callbacks(samples, callbacks),
    )
    run.attach(trainer, flops_per_token(model_config, config.data.seq_len), config.peak_tflops, fixed_shapes=True)

    def validation_loss() -> dict[str, float]:
        # Our own evaluator, not trainer.evaluate(): evaluating through the Trainer before train() marks the model
        # as prepared by accelerate, which then skips wrapping it in DistributedDataParallel (transformers 5.23 /
        # accelerate 1.15: ranks trained apart under torchrun).
        return {"eval_loss": evaluate_loss(trainer.model, eval_dataset, args.per_device_eval_batch_size).loss}

    initial = run.evaluate_before(validation_loss) if eval_dataset is not None else None
    output = run.train(trainer)
    final = run.evaluate_after(output.global_step, validation_loss) if eval_dataset is not None else None
    return run.finish(
        trainer,
        tokenizer,
        {
            "parameters": count_parameters(model_config),
            "initial_validation_loss": initial["eval_loss"] if initial else None,
            "final_validation_loss": final["eval_loss"] if final else None,
        },
    )


def _existing(pattern: str, key: str) -> str:
    """A data path that exists (or a glob that matches), else an error that says which command makes it."""
    try:
        paths = expand_token_files(pattern)
    except FileNotFoundError:
        paths = []
    missing = [path for path in paths if not Path(path).is_file()]
    if not paths or missing:
        raise FileNotFoundError(
            f"{key}: {missing[0] if missing else pattern} does not exist. Make the shards with `tinyllm data prepare "
            "--tokenizer DIR --output DIR --source ...` (train-*.bin, validation-*.bin) or one file with "
            "`tinyllm data tokenize`"
        )
    return pattern


def training_data(data: DataOptions, fingerprint: str, seed: int) -> PretrainDataset | MixedPretrainDataset:
    paths = [data.train] if isinstance(data.train, str) else data.train
    datasets = [
        PretrainDataset(_existing(path, "data.train"), data.seq_len, expected_fingerprint=fingerprint) for path in paths
    ]
    if len(datasets) == 1 and data.train_weights is None:
        return datasets[0]
    weights = data.train_weights or [float(len(d)) for d in datasets]
    return MixedPretrainDataset(datasets, weights, seed=seed)


def continuation_sampler(tokenizer, config: PretrainConfig):
    """Seeded top-p continuations of the sample prompts (the seed project shows the same during training)."""
    options = SamplingOptions(
        max_new_tokens=config.sample_max_new_tokens, temperature=0.8, top_p=0.9, repetition_penalty=1.1
    )

    def sample(model, prompt: str) -> str:
        return generate_text(model, tokenizer, prompt, options, synced_gpus=is_deepspeed_zero3_enabled())

    return sample
