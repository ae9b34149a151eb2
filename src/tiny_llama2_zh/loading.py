"""Loading and saving model folders (`save_pretrained` folders with their tokenizer), in one place for every
command: generation, evaluation, the later training stages, export.

A folder loads through transformers' Auto classes: with this package imported they resolve our model class
directly; in a process that never imports it, `trust_remote_code=True` uses the copy of model.py saved beside the
weights. TRL's own loader (`trl.trainer.utils.create_model_from_path`) takes the same folders.

A quantised folder (`tinyllm quantize`) is told apart here, by its `quantization.json`: every command that reads a
folder asks this module what it is, and the ones that need float weights (training, export, quantising again)
refuse it here, without importing the quantisation code.
"""

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

import tiny_llama2_zh.model  # noqa: F401  (registers the model with the Auto classes)
from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.tokenizer import load_tokenizer, tokenizer_fingerprint

QUANTIZATION_FILE = "quantization.json"  # the recipe of a quantised folder: method, group size, float source


def is_quantized_folder(path: str | Path) -> bool:
    return (Path(path) / QUANTIZATION_FILE).is_file()


def refuse_quantized(path: str | Path, needs: str) -> None:
    """A command that reads float weights (training, export, quantise again) refuses a quantised folder, naming its
    source."""
    if is_quantized_folder(path):
        recipe = json.loads((Path(path) / QUANTIZATION_FILE).read_text(encoding="utf-8"))
        raise UsageError(
            f"{path} is a quantised folder ({recipe.get('method')}); {needs} needs a float model folder, e.g. the one "
            f"it was quantised from ({recipe.get('source')})"
        )


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_model_folder(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a saved model folder (no config.json); a training run writes one to RUN_DIR/final"
        )
    return path


def load_model(
    path: str | Path, device: str | None = None, auto_class=AutoModelForCausalLM
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """The model (in eval mode, on `device`) and its tokenizer from a saved folder."""
    path = check_model_folder(path)
    if is_quantized_folder(path):  # `tinyllm quantize` output: its own loader (imported only then), the kernels
        if auto_class is not AutoModelForCausalLM:
            raise UsageError(f"{path} holds a quantised causal LM; this command needs a {auto_class.__name__} folder")
        from tiny_llama2_zh.quantize.methods import load_quantized

        model = load_quantized(path, device or "cpu")
    else:
        model = auto_class.from_pretrained(str(path)).to(device or default_device()).eval()
    tokenizer = load_tokenizer(path)
    if model.config.vocab_size < len(tokenizer):
        raise UsageError(
            f"{path}: the tokenizer has {len(tokenizer)} ids but the model only {model.config.vocab_size}; "
            "the folder mixes a model and a tokenizer that were not trained together"
        )
    return model, tokenizer


def save_model_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: str | Path) -> Path:
    path = Path(path)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def init_tokenizer(init_from: str | Path, expected: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The tokenizer of a folder a stage starts from; with `expected` (the recipe's `model.tokenizer`), refused
    unless it is that tokenizer, naming both fingerprints. A quantised folder is refused: training needs float
    weights."""
    refuse_quantized(init_from, "training")
    tokenizer = load_tokenizer(init_from)
    if expected is not None:
        wanted = tokenizer_fingerprint(load_tokenizer(expected))
        if wanted != tokenizer_fingerprint(tokenizer):
            raise UsageError(
                f"model.init_from {init_from} was made with tokenizer {tokenizer_fingerprint(tokenizer)}, not with "
                f"model.tokenizer {expected} ({wanted})"
            )
    return tokenizer


def same_tokenizer_or_refuse(first: str | Path, second: str | Path) -> None:
    """Two folders used together (a policy and its reward model, init weights and data) must share a tokenizer."""
    a, b = tokenizer_fingerprint(load_tokenizer(first)), tokenizer_fingerprint(load_tokenizer(second))
    if a != b:
        raise UsageError(f"{first} (tokenizer {a}) and {second} (tokenizer {b}) were made with different tokenizers")
