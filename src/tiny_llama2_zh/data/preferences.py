"""Preference pairs for reward modelling and DPO: `{"prompt", "chosen", "rejected"}` JSON Lines (what
`tinyllm data prepare --source rlhf_reward_zh|zhihu_rlhf_3k|cvalues` and `tinyllm data tasks` write), checked
one by one and turned into TRL's conversational preference format.

`prompt` is a user message (a string) or a list of chat messages ending with a user turn; `chosen` and `rejected`
are the two replies. A pair that teaches nothing or cannot be rendered is skipped and counted, never trained on:
a malformed line, a missing or non-string field, an empty reply, chosen equal to rejected, a side longer than
`max_length` tokens with the chat template. Each pair carries its `source`: the name of the folder its file is in
(`runs/demo/tasks/sentiment/preference-test.jsonl` -> `sentiment`), so that results are reported per source.
"""

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from tiny_llama2_zh.data.conversations import expand_paths, problem
from tiny_llama2_zh.data.jsonl import ReadReport, read_jsonl
from tiny_llama2_zh.tokenizer import chat_ids

Message = dict[str, str]


def source_name(path: Path) -> str:
    return path.parent.name or path.stem


def _prompt_messages(prompt: object) -> list[Message] | str:
    """The prompt as chat messages, or why it cannot be one."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}] if prompt.strip() else "empty prompt"
    if isinstance(prompt, list):
        reason = problem([*prompt, {"role": "assistant", "content": "x"}])
        if reason is not None:
            return f"prompt: {reason}"
        if prompt[-1]["role"] == "assistant":
            return "prompt ends with an assistant turn"
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    return "prompt is neither a string nor a list of messages"


def _reply(value: object) -> str | None:
    """A reply given as a string or as one assistant message (TRL's conversational format)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0].get("content") if value[0].get("role") == "assistant" else None
    return value if isinstance(value, str) else None


def load_preferences(
    patterns: str | list[str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    limit: int | None = None,
) -> tuple[list[dict], ReadReport]:
    """The usable pairs of the files as `{"prompt": [messages], "chosen": [assistant message], "rejected": [...],
    "source": str}` rows, and the report. `limit` caps each file (its first `limit` usable pairs)."""
    report = ReadReport(unit="pairs")
    rows: list[dict] = []
    for line in read_jsonl(expand_paths(patterns, kind="preference"), report, limit):
        record, where = line.value, line.where
        if not isinstance(record, dict) or not {"prompt", "chosen", "rejected"} <= record.keys():
            report.skip(where, "not a {prompt, chosen, rejected} record")
            continue
        prompt = _prompt_messages(record["prompt"])
        chosen, rejected = _reply(record["chosen"]), _reply(record["rejected"])
        if isinstance(prompt, str):
            report.skip(where, prompt)
            continue
        if chosen is None or rejected is None:
            report.skip(where, "chosen or rejected is not a string")
            continue
        if not chosen.strip() or not rejected.strip():
            report.skip(where, "empty reply")
            continue
        if chosen.strip() == rejected.strip():
            report.skip(where, "chosen equals rejected")
            continue
        longest = max(
            len(chat_ids(tokenizer, [*prompt, {"role": "assistant", "content": reply}])) for reply in (chosen, rejected)
        )
        if longest > max_length:
            report.skip(where, f"longer than max_length {max_length}")
            continue
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "source": source_name(line.path),
            }
        )
        report.kept += 1
    return rows, report


def load_preference_splits(
    data, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[list[dict], ReadReport, list[dict], ReadReport]:
    """A recipe's `data:` section (train, validation, max_train_examples, max_validation_examples) as training
    and held-out pairs with their reports, printed; either side empty is an error."""
    from tiny_llama2_zh.config import ConfigError

    train, train_report = load_preferences(data.train, tokenizer, max_length, data.max_train_examples)
    print(f"train pairs: {train_report.summary()}")
    for example in train_report.examples[:5]:
        print(f"  skipped {example}")
    held_out, held_out_report = load_preferences(data.validation, tokenizer, max_length, data.max_validation_examples)
    print(f"held-out pairs: {held_out_report.summary()}")
    if not train or not held_out:
        raise ConfigError(f"data.{'train' if not train else 'validation'}: no usable preference pair")
    return train, train_report, held_out, held_out_report
