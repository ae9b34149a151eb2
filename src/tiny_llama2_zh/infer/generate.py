"""Text generation from a saved model folder: greedy or sampled, streamed to the terminal."""

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast, TextStreamer


@dataclass
class SamplingOptions:
    max_new_tokens: int = 100
    temperature: float = 0.0  # 0 means greedy decoding
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 1337


@torch.inference_mode()
def generate_text(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    prompt: str,
    options: SamplingOptions,
    stream: bool = False,
    synced_gpus: bool = False,
) -> str:
    """Continue `prompt` and return the continuation (without the prompt). The prompt starts with <s>, as every
    pretraining document does. The seed makes sampled text reproducible, and it is applied inside a forked RNG
    state: sampling in the middle of a training run (the samples at every evaluation) leaves the run's random
    sequence (dropout, data order) exactly as it would be without it."""
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    sampling = options.temperature > 0
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
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
