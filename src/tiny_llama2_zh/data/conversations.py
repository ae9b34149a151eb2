"""Chat conversations for supervised fine-tuning: `{"messages": [{"role", "content"}, ...]}` JSON Lines (what
`tinyllm data prepare --source belle|firefly|tigerbot_sft` and `tinyllm data tasks` write), checked one by one.

A conversation that a chat template would render into something a model should not learn is skipped and counted,
never trained on: an unknown role, two assistant turns in a row, an empty reply, no reply at all, a malformed line.
One longer than `max_length` tokens (with the template) is skipped, or cut from the left by whole turns
(`too_long: truncate_left`), keeping the last reply.
"""

import glob
from pathlib import Path
from typing import Literal

from transformers import PreTrainedTokenizerBase

from tiny_llama2_zh.data.jsonl import ReadReport, read_jsonl
from tiny_llama2_zh.tokenizer import CHAT_ROLES, chat_ids

TooLong = Literal["skip", "truncate_left"]


def expand_paths(patterns: str | list[str], kind: str = "chat") -> list[Path]:
    """Files named directly or by glob (`data/sft/*/sft-train.jsonl`); a pattern that matches nothing is an error."""
    paths: list[Path] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        matched = sorted(glob.glob(pattern)) if any(char in pattern for char in "*?[") else [pattern]
        if not matched or not all(Path(p).is_file() for p in matched):
            raise FileNotFoundError(
                f"{pattern} does not exist; make {kind} data with `tinyllm data tasks` or `tinyllm data prepare "
                + (
                    "--source belle|firefly|tigerbot_sft`"
                    if kind == "chat"
                    else "--source rlhf_reward_zh|zhihu_rlhf_3k|cvalues`"
                )
            )
        paths += map(Path, matched)
    return paths


def problem(messages: object) -> str | None:
    """Why a `messages` value cannot be trained on, or None."""
    if not isinstance(messages, list) or not messages:
        return "no messages list"
    previous = None
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return "a message without string content"
        role = message.get("role")
        if role not in CHAT_ROLES:
            return f"unknown role {role!r}"
        if role == "assistant" and previous == "assistant":
            return "two assistant turns in a row"
        if role == "assistant" and not message["content"].strip():
            return "empty reply"
        previous = role
    if not any(message["role"] == "assistant" for message in messages):
        return "no assistant reply"
    return None


def _length(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> int:
    return len(chat_ids(tokenizer, messages))


def fit(tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_length: int) -> list[dict] | None:
    """Drop whole turns from the left (a system message stays) until the conversation fits; None if even the
    last exchange is too long. The result still ends with an assistant reply."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    while turns:
        if _length(tokenizer, [*system, *turns]) <= max_length:
            return [*system, *turns]
        turns = turns[1:]
        while turns and turns[0]["role"] == "assistant":
            turns = turns[1:]
    return None


def load_conversations(
    patterns: str | list[str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    too_long: TooLong = "skip",
    limit: int | None = None,
) -> tuple[list[dict], ReadReport]:
    """The trainable conversations of the files (`[{"messages": [...]}, ...]`) and the report. `limit` caps each
    file (the first `limit` usable conversations of every file), so every source of a mix is represented."""
    report = ReadReport()
    kept: list[dict] = []
    for line in read_jsonl(expand_paths(patterns), report, limit):
        record = line.value
        messages = record.get("messages") if isinstance(record, dict) else None
        reason = problem(messages)
        if reason is not None:
            report.skip(line.where, reason)
            continue
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if messages[-1]["role"] != "assistant":  # trailing user turns teach nothing
            messages = messages[: max(i for i, m in enumerate(messages) if m["role"] == "assistant") + 1]
        if _length(tokenizer, messages) > max_length:
            fitted = fit(tokenizer, messages, max_length) if too_long == "truncate_left" else None
            if fitted is None:
                report.skip(line.where, f"longer than max_length {max_length}")
                continue
            messages = fitted
            report.truncated += 1
        kept.append({"messages": messages})
        report.kept += 1
    return kept, report


def load_prompts(
    patterns: str | list[str],
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_length: int,
    limit: int | None = None,
) -> tuple[list[dict], ReadReport]:
    """Prompts for reinforcement learning (PPO, RLOO, GRPO): from chat files (`{"messages"}`: everything before
    the last assistant reply) or from preference files (`{"prompt"}`). Rows are `{"prompt": [messages], "source":
    folder name, "reference": the reply the file holds (the chosen one), or None}`; `limit` caps each file.
    A prompt longer than `max_prompt_length` tokens with the template is skipped and counted."""
    report = ReadReport(unit="prompts")
    rows: list[dict] = []
    for line in read_jsonl(expand_paths(patterns), report, limit):
        record, where = line.value, line.where
        if isinstance(record, dict) and "messages" in record:
            reason = problem(record["messages"])
            if reason is not None:
                report.skip(where, reason)
                continue
            messages = record["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
            reference = messages[last]["content"]
        elif isinstance(record, dict) and isinstance(record.get("prompt"), str) and record["prompt"].strip():
            prompt = [{"role": "user", "content": record["prompt"]}]
            reference = record.get("chosen") if isinstance(record.get("chosen"), str) else None
        else:
            report.skip(where, "neither {messages} nor a {prompt} string")
            continue
        if not prompt or prompt[-1]["role"] != "user":
            report.skip(where, "no user turn before the reply")
            continue
        if len(chat_ids(tokenizer, prompt, generation_prompt=True)) > max_prompt_length:
            report.skip(where, f"prompt longer than {max_prompt_length} tokens")
            continue
        rows.append({"prompt": prompt, "source": line.path.parent.name, "reference": reference})
        report.kept += 1
    return rows, report
