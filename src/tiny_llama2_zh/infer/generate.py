"""Text generation from a saved model folder: greedy or sampled, streamed to the terminal."""

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast, TextStreamer

from tiny_llama2_zh.errors import UsageError
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
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    output = _generate(model, inputs["input_ids"], options, tokenizer.eos_token_id, tokenizer, streamer, synced_gpus)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _generate(model, input_ids, options: SamplingOptions, eos_token_id, tokenizer, streamer=None, synced_gpus=False):
    """`model.generate` for one unpadded prompt, sampled with `options`, in a forked RNG state."""
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
        )


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
    input_ids = torch.tensor([ids], device=model.device)
    output = _generate(model, input_ids, options, turn_end_ids(tokenizer), tokenizer, streamer)
    return tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True).strip(), dropped


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
    """Greedy replies to many conversations, batched with left padding (for evaluation)."""
    replies: list[str] = []
    context = model.config.max_position_embeddings
    for start in range(0, len(conversations), batch_size):
        prompts = [
            chat_prompt_ids(tokenizer, c, context - max_new_tokens)[0]
            for c in conversations[start : start + batch_size]
        ]
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
