"""Validation loss and perplexity of a causal LM on pretokenized blocks (`tinyllm eval ppl`, and every training
stage's evaluation before and after)."""

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm
from transformers import PreTrainedModel, default_data_collator

from tiny_llama2_zh.data.pretokenized import PretrainDataset
from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.loading import load_model
from tiny_llama2_zh.tensors import eval_mode
from tiny_llama2_zh.tokenizer import tokenizer_fingerprint


@dataclass
class PerplexityResult:
    loss: float  # mean cross-entropy per predicted token, nats
    perplexity: float
    tokens: int
    blocks: int


def perplexity(loss: float) -> float:
    """exp(loss), capped at exp(50) so that a diverged run's record stays a finite JSON number."""
    return math.exp(min(loss, 50.0))


@torch.inference_mode()
def mean_token_loss(model: PreTrainedModel, batches: Iterable[dict], show_progress: bool = False) -> tuple[float, int]:
    """(mean loss per predicted token, number of predicted tokens) over labelled batches, weighting each batch by
    the tokens it predicts (labels other than -100 after the shift); the model is evaluated in eval mode."""
    total_loss, total_tokens = 0.0, 0
    with eval_mode(model):
        for batch in tqdm(batches, desc="evaluate", disable=not show_progress):
            batch = {key: value.to(model.device) if hasattr(value, "to") else value for key, value in batch.items()}
            predicted = int((batch["labels"][:, 1:] != -100).sum())
            if predicted:
                total_loss += float(model(**batch).loss) * predicted
                total_tokens += predicted
    if not total_tokens:
        raise UsageError("nothing to evaluate: the data holds no tokens to predict")
    return total_loss / total_tokens, total_tokens


def evaluate_loss(
    model: PreTrainedModel, dataset: Dataset, batch_size: int = 8, show_progress: bool = False
) -> PerplexityResult:
    """Token-weighted mean loss over every block of `dataset` (each block predicts seq_len - 1 tokens)."""
    if len(dataset) == 0:
        raise UsageError("nothing to evaluate: the dataset holds no blocks")
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=default_data_collator)
    loss, tokens = mean_token_loss(model, loader, show_progress)
    return PerplexityResult(loss=loss, perplexity=perplexity(loss), tokens=tokens, blocks=len(dataset))


def evaluate_perplexity(
    model_dir: str | Path,
    data: str | Path,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_blocks: int | None = None,
) -> PerplexityResult:
    if max_blocks is not None and max_blocks < 1:
        raise UsageError(f"--max-blocks must be at least 1, got {max_blocks}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    model, tokenizer = load_model(model_dir)
    seq_len = seq_len or model.config.max_position_embeddings
    if seq_len > model.config.max_position_embeddings:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's context of {model.config.max_position_embeddings}")
    dataset: Dataset = PretrainDataset(data, seq_len, expected_fingerprint=tokenizer_fingerprint(tokenizer))
    if max_blocks is not None:
        dataset = Subset(dataset, range(min(max_blocks, len(dataset))))
    return evaluate_loss(model, dataset, batch_size, show_progress=True)
