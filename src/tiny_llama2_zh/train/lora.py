"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") through PEFT: the recipe's
`model.lora` options, and merging a trained adapter back into a plain model folder (`tinyllm lora merge`)."""

import json
from dataclasses import dataclass, field
from pathlib import Path

from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.loading import check_model_folder, load_model, save_model_folder

# Every linear layer of the model, by its transformers-Llama name.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraOptions:
    """The `model.lora:` section. Only the adapters train; the base weights stay frozen."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))


def peft_config(options: LoraOptions):
    from peft import LoraConfig

    unknown = sorted(set(options.target_modules) - set(ALL_LINEAR))
    if unknown:
        raise UsageError(f"model.lora.target_modules: {unknown} are not layers of this model; choose from {ALL_LINEAR}")
    if options.r < 1:
        raise UsageError(f"model.lora.r must be at least 1, got {options.r}")
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
    )


def count_trainable(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total}


def merge_adapter(adapter_dir: str | Path, output_dir: str | Path, base_dir: str | Path | None = None) -> Path:
    """base + adapter -> one plain model folder (with the base's tokenizer) that loads like any other: with this
    package imported, or with `trust_remote_code=True` without it, and in TRL."""
    from peft import PeftModel

    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{adapter_dir} holds no adapter_config.json: it is not a LoRA adapter folder")
    base_dir = Path(base_dir or json.loads(config_file.read_text())["base_model_name_or_path"])
    check_model_folder(base_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} is not empty; choose another --output")
    base, tokenizer = load_model(base_dir, device="cpu")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return save_model_folder(merged, tokenizer, output_dir)
