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
from transformers import Trainer, default_data_collator
from transformers.trainer_utils import get_last_checkpoint

from tiny_llama2_zh.config import save_config
from tiny_llama2_zh.data.pretokenized import PretrainDataset
from tiny_llama2_zh.generate import SamplingOptions, generate_text
from tiny_llama2_zh.model import TinyLlama2ForCausalLM
from tiny_llama2_zh.plot import plot_loss_curves
from tiny_llama2_zh.presets import count_parameters, preset_config
from tiny_llama2_zh.tokenizer import load_tokenizer, tokenizer_fingerprint
from tiny_llama2_zh.train.common import MetricsFileCallback, TrainOptions, training_arguments

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


@dataclass
class DataOptions:
    """The `data:` section: tokenizer folder and pretokenized files (`tinyllm data tokenize`)."""

    tokenizer: str
    train: str
    validation: str | None = None
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


def pretrain(config: PretrainConfig) -> PretrainResult:
    output_dir = Path(config.train.output_dir)
    last_checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
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

    train_dataset = PretrainDataset(config.data.train, config.data.seq_len, expected_fingerprint=fingerprint)
    eval_dataset = None
    if config.data.validation:
        validation = PretrainDataset(config.data.validation, config.data.seq_len, expected_fingerprint=fingerprint)
        eval_dataset = Subset(validation, range(min(config.data.eval_blocks, len(validation))))

    args = training_arguments(config.train)
    tokens_per_step = (
        config.data.seq_len * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
        callbacks=[MetricsFileCallback(output_dir / "metrics.jsonl", tokens_per_step)],
    )
    initial_loss = None
    if eval_dataset is not None and last_checkpoint is None:
        initial_loss = trainer.evaluate()["eval_loss"]

    started = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=last_checkpoint if config.resume else None)
    train_seconds = time.perf_counter() - started
    final_loss = trainer.evaluate()["eval_loss"] if eval_dataset is not None else None

    final_dir = output_dir / "final"
    trainer.save_model(str(final_dir))
    result = None
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(final_dir))
        samples = _write_samples(
            trainer.model, tokenizer, config, output_dir / "samples.jsonl", train_output.global_step
        )
        plot_loss_curves(output_dir)
        result = PretrainResult(
            output_dir=str(output_dir),
            final_model_dir=str(final_dir),
            parameters=count_parameters(model_config),
            steps=train_output.global_step,
            train_seconds=round(train_seconds, 2),
            tokens_seen=train_output.global_step * tokens_per_step,
            initial_validation_loss=initial_loss,
            final_validation_loss=final_loss,
            samples=samples,
        )
        (output_dir / "summary.json").write_text(json.dumps(asdict(result), indent=2, ensure_ascii=False) + "\n")
    return result


def _write_samples(model, tokenizer, config: PretrainConfig, path: Path, step: int) -> dict[str, str]:
    """Greedy continuations of the sample prompts, appended to samples.jsonl with the step."""
    model.eval()
    options = SamplingOptions(max_new_tokens=config.sample_max_new_tokens, repetition_penalty=1.1)
    samples = {prompt: generate_text(model, tokenizer, prompt, options) for prompt in config.sample_prompts}
    with path.open("a", encoding="utf-8") as out:
        for prompt, text in samples.items():
            out.write(json.dumps({"step": step, "prompt": prompt, "continuation": text}, ensure_ascii=False) + "\n")
    return samples
