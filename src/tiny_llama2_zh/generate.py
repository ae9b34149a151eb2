"""Text generation from a saved model folder: greedy or sampled, streamed to the terminal."""

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast, TextStreamer

import tiny_llama2_zh  # noqa: F401  (registers the model with the Auto classes)
from tiny_llama2_zh.tokenizer import load_tokenizer


@dataclass
class SamplingOptions:
    max_new_tokens: int = 100
    temperature: float = 0.0  # 0 means greedy decoding
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 1337


def load_model(path: str | Path, device: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a saved model folder (no config.json)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(str(path)).to(device).eval()
    return model, load_tokenizer(path)


@torch.inference_mode()
def generate_text(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    prompt: str,
    options: SamplingOptions,
    stream: bool = False,
    synced_gpus: bool = False,
) -> str:
    """Continue `prompt` and return the continuation (without the prompt). Pretraining documents carry no bos,
    so neither does the prompt. The seed makes sampled text reproducible."""
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    sampling = options.temperature > 0
    torch.manual_seed(options.seed)
    output = model.generate(
        **inputs,
        max_new_tokens=options.max_new_tokens,
        do_sample=sampling,
        temperature=options.temperature if sampling else None,
        top_p=options.top_p if sampling else None,
        top_k=options.top_k if sampling else None,
        repetition_penalty=options.repetition_penalty,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None,
        synced_gpus=synced_gpus,  # DeepSpeed ZeRO-3: every process steps until all have finished
    )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
