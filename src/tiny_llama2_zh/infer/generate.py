"""Text generation from a saved model folder: greedy or sampled, streamed to the terminal.

Every reply here is decoded by the lean decoder (`infer.decode`, the server's decoder too) whenever it can read the
model: a TinyLlama2ForCausalLM with plain or `tinyllm quantize` weights. `model.generate` remains for what it
cannot read (a PEFT-wrapped model, another architecture) and for DeepSpeed ZeRO-3's `synced_gpus`, where every
process must step until all have finished.
"""

import weakref
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast, TextStreamer

from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.infer.decode import LeanDecoder, Sampler, generate_batch
from tiny_llama2_zh.tokenizer import ROLE_TOKENS, chat_ids


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
    ids = tokenizer(prompt)["input_ids"]
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    output = _generate(model, ids, options, tokenizer.eos_token_id, tokenizer, streamer, synced_gpus)
    return tokenizer.decode(output, skip_special_tokens=True)


def lean_decoder(model: PreTrainedModel, max_batch: int = 1, max_len: int | None = None) -> LeanDecoder | None:
    """A LeanDecoder for `model`, or None when it cannot read it (then `model.generate` decodes)."""
    if type(model).__name__ != "TinyLlama2ForCausalLM":  # also the class of a folder loaded as remote code
        return None
    try:
        return LeanDecoder(model, max_batch=max_batch, max_len=max_len)
    except UsageError:
        return None


# One batch-1 decoder per live model (weak keys: the model's lifetime decides the decoder's), with the weights'
# identity and versions it was built from. Building one copies every float matrix (transposed) and allocates the
# cache: ~0.1 s and 100 MB at the 24m shape, which `chat` paid on every message and `generate` on every call.
_DECODERS: "weakref.WeakKeyDictionary[PreTrainedModel, tuple[tuple, LeanDecoder | None]]" = weakref.WeakKeyDictionary()


def _weights_key(model: PreTrainedModel) -> tuple:
    """What a decoder built from `model` depends on: each parameter's and buffer's identity, version counter
    (bumped by every in-place change: an optimizer step, load_state_dict), device and dtype. A training run that
    samples at each evaluation changes it, so its next sample reads the new weights."""
    tensors = (*model.parameters(), *model.buffers())
    return tuple((id(t), t._version, t.device, t.dtype) for t in tensors)


def shared_decoder(model: PreTrainedModel) -> LeanDecoder | None:
    """The batch-1 LeanDecoder kept for `model` over the whole context (or None when it cannot read the model),
    rebuilt only when the weights changed since it was built. Not thread-safe: one decode at a time per model (the
    server has its own engine and decoder)."""
    key = _weights_key(model)
    cached = _DECODERS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    _DECODERS.pop(model, None)  # free the old copy before making the new one
    decoder = lean_decoder(model)
    _DECODERS[model] = (key, decoder)
    return decoder


def _generate(
    model, ids: list[int], options: SamplingOptions, eos_token_id, tokenizer, streamer=None, synced_gpus=False
) -> list[int]:
    """The new tokens after one unpadded prompt, sampled with `options`: the lean decoder when it reads the model,
    else `model.generate` in a forked RNG state. Both leave the process's random state as it was."""
    decoder = None if synced_gpus else shared_decoder(model)
    if decoder is not None:
        sampler = Sampler(options.temperature, options.top_p, options.top_k, options.repetition_penalty)
        stop_ids = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
        if streamer is not None:
            streamer.put(torch.tensor([ids]))
        on_token = (lambda _, token: streamer.put(torch.tensor([token]))) if streamer is not None else None
        tokens = generate_batch(
            decoder, [ids], options.max_new_tokens, stop_ids, sampler, seed=options.seed, on_token=on_token
        )[0]
        if streamer is not None:
            streamer.end()
        return tokens
    input_ids = torch.tensor([ids], device=model.device)
    sampling = options.temperature > 0
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(options.seed)
        return model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=options.max_new_tokens,
            do_sample=sampling,
            temperature=options.temperature if sampling else None,
            top_p=options.top_p if sampling else None,
            top_k=options.top_k if sampling else None,
            repetition_penalty=options.repetition_penalty,
            eos_token_id=eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
            synced_gpus=synced_gpus,  # DeepSpeed ZeRO-3: every process steps until all have finished
        )[0, len(ids) :].tolist()


# ------------------------------------------------------------------------------------------------- chat
Message = dict[str, str]  # {"role": "system" | "user" | "assistant" | "observation", "content": str}


def turn_end_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Every id that ends an assistant turn: eos (the chat template closes each reply with it) and the role tokens
    that open the next turn (ChatGLM3's convention), in case a model skips the eos."""
    return sorted({tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list(ROLE_TOKENS))})


def chat_prompt_ids(
    tokenizer: PreTrainedTokenizerFast, messages: list[Message], max_prompt_tokens: int
) -> tuple[list[int], int]:
    """The chat template's ids for `messages` plus the assistant prompt, cut to `max_prompt_tokens` by dropping
    whole turns from the oldest (a system message stays). Returns (ids, number of messages dropped). A single
    turn that alone is too long is an error, never cut mid-token."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    dropped = 0
    while True:
        ids = chat_ids(tokenizer, [*system, *turns], generation_prompt=True)
        if len(ids) <= max_prompt_tokens:
            return ids, dropped
        if len(turns) <= 1:
            raise UsageError(
                f"the message is {len(ids)} tokens with the template, more than the {max_prompt_tokens} the model's "
                "context leaves for it; shorten it or lower max_new_tokens"
            )
        turns = turns[1:]
        dropped += 1
        while turns and turns[0]["role"] == "assistant":  # a conversation restarts at a user turn
            turns = turns[1:]
            dropped += 1


@torch.inference_mode()
def generate_reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    messages: list[Message],
    options: SamplingOptions,
    streamer=None,
) -> tuple[str, int]:
    """The assistant's reply to a conversation (through the chat template), and how many old messages were
    dropped to fit the context. `streamer` (a transformers streamer) receives the tokens as they come."""
    context = model.config.max_position_embeddings
    ids, dropped = chat_prompt_ids(tokenizer, messages, context - options.max_new_tokens)
    output = _generate(model, ids, options, turn_end_ids(tokenizer), tokenizer, streamer)
    return tokenizer.decode(output, skip_special_tokens=True).strip(), dropped


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as one left-padded batch (ids, attention mask), so every row's next token is the last column."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


@torch.inference_mode()
def greedy_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    conversations: list[list[Message]],
    max_new_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """Greedy replies to many conversations (for evaluation), `batch_size` at a time: decoded together by the lean
    decoder (each prompt unpadded at its own positions), or by `model.generate` with left padding."""
    replies: list[str] = []
    context = model.config.max_position_embeddings
    decoder = lean_decoder(model, max_batch=max(1, min(batch_size, len(conversations))))
    for start in range(0, len(conversations), batch_size):
        prompts = [
            chat_prompt_ids(tokenizer, c, context - max_new_tokens)[0]
            for c in conversations[start : start + batch_size]
        ]
        if decoder is not None:
            outputs = generate_batch(decoder, prompts, max_new_tokens, turn_end_ids(tokenizer))
            replies += [text.strip() for text in tokenizer.batch_decode(outputs, skip_special_tokens=True)]
            continue
        pad = tokenizer.pad_token_id
        input_ids, attention_mask = left_pad(prompts, pad, model.device)
        width = input_ids.shape[1]
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=turn_end_ids(tokenizer),
            pad_token_id=pad,
        )
        replies += [text.strip() for text in tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)]
    return replies


# ------------------------------------------------------------------------------------------- sampling
def position_ids_of(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded prompt is computed as if unpadded."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample_replies(
    policy: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    end_ids: list[int],
    pad_id: int,
    max_new_tokens: int,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampled replies (KV cache): sequences (B, P + R), their attention mask, and the reply mask (B, R) that
    keeps each reply up to and including its first end-of-turn token (what `generate` appends after it is
    padding). Also returns whether each reply ended."""
    output = policy.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
        eos_token_id=end_ids,
        pad_token_id=pad_id,
    )
    replies = output[:, prompt_ids.shape[1] :]
    is_end = torch.isin(replies, torch.tensor(end_ids, device=replies.device))
    ended = is_end.any(-1)
    first_end = torch.where(ended, is_end.int().argmax(-1), replies.shape[1] - 1)
    reply_mask = (torch.arange(replies.shape[1], device=replies.device)[None, :] <= first_end[:, None]).long()
    replies = torch.where(reply_mask.bool(), replies, pad_id)
    sequences = torch.cat([prompt_ids, replies], dim=1)
    return sequences, torch.cat([prompt_mask, reply_mask], dim=1), reply_mask, ended
