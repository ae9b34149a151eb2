"""`tinyllm export check`: export a model to every format and check each in the runtime that runs it.

The model becomes a plain transformers Llama folder, GGUF files (f32, q8_0) and, where its vocabulary allows,
llama2.c files; each is checked on held-out chat prompts (greedy replies equal ours, token for token) and texts
(token ids equal ours). A runtime that is not installed is reported as such, never as a pass. Writes exports.md.
"""

import json
from pathlib import Path

from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.eval.markdown import table as markdown_table


def pytorch_greedy(model, prompts: list[list[int]], new_tokens: int, stop: list[int]) -> list[list[int]]:
    """Greedy continuation ids of each prompt, cut after the first stop id (the reply's end), batch 1."""
    import torch

    replies = []
    with torch.inference_mode():
        for ids in prompts:
            output = model.generate(
                torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=0
            )[0, len(ids) :].tolist()
            replies.append(output[: next((i + 1 for i, t in enumerate(output) if t in stop), len(output))])
    return replies


def _first_lines(path: Path, count: int, read) -> list:
    """`read(record)` of the first `count` JSON lines of `path`, with file:line on a malformed one."""
    values = []
    with path.open(encoding="utf-8") as lines:
        for number, line in zip(range(1, count + 1), lines):
            try:
                values.append(read(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError, IndexError) as error:
                raise UsageError(f"{path}:{number}: not the expected JSON record ({error})") from error
    return values


def check_exports(
    model_dir: str | Path,
    output_dir: str | Path,
    prompts_file: str | Path,
    texts_file: str | Path,
    prompt_count: int = 8,
    text_count: int = 32,
    new_tokens: int = 24,
) -> str:
    """Export `model_dir` into `output_dir` in every format, check each, write exports.md; returns its table."""
    from transformers import LlamaForCausalLM

    from tiny_llama2_zh.export.gguf import export_gguf
    from tiny_llama2_zh.export.hf_llama import export_hf_llama
    from tiny_llama2_zh.export.llama2c import export_llama2c
    from tiny_llama2_zh.export.llamacpp import llamacpp_missing, run_gguf
    from tiny_llama2_zh.infer.generate import chat_prompt_ids, turn_end_ids
    from tiny_llama2_zh.loading import load_model

    out, source = Path(output_dir), Path(model_dir)
    model, tokenizer = load_model(source, "cpu")
    stop = turn_end_ids(tokenizer)
    conversations = _first_lines(Path(prompts_file), prompt_count, lambda record: record["messages"][:1])
    prompts = [chat_prompt_ids(tokenizer, messages, 200)[0] for messages in conversations]
    expected = pytorch_greedy(model, prompts, new_tokens, stop)
    texts = _first_lines(Path(texts_file), text_count, lambda record: record["text"][:200])
    rows = []

    folder = export_hf_llama(source, out / "hf-llama", overwrite=True)
    llama = LlamaForCausalLM.from_pretrained(folder).eval()  # no remote code: transformers' own Llama
    same = sum(a == b for a, b in zip(pytorch_greedy(llama, prompts, new_tokens, stop), expected))
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    checker = "transformers `LlamaForCausalLM` (no remote code)"
    result = f"greedy replies equal ours: {same}/{len(prompts)}"
    rows.append(("transformers Llama", f"`{folder}`", f"{size / 1e6:.2f} MB", checker, result))
    missing = llamacpp_missing()
    for kind in ("f32", "q8_0"):
        path = export_gguf(source, out / f"{source.parent.name}-{kind}.gguf", kind, overwrite=True)
        if missing:
            result, checker = f"not checked: {missing}", "llama.cpp (not installed)"
        else:
            request = {
                "model": str(path),
                "threads": 2,
                "tokenize": texts,
                "generate": [{"tokens": ids, "maxTokens": new_tokens, "stop": stop} for ids in prompts],
            }
            answer = run_gguf(request)
            ids_equal = sum(got == tokenizer(text)["input_ids"] for got, text in zip(answer["tokens"], texts))
            replies_equal = sum(g["tokens"] == want for g, want in zip(answer["generated"], expected))
            result = f"token ids equal ours: {ids_equal}/{len(texts)} texts; greedy replies equal ours: "
            result += f"{replies_equal}/{len(prompts)}"
            checker = "llama.cpp (node-llama-cpp's prebuilt libllama)"
        rows.append((f"GGUF {kind}", f"`{path}`", f"{path.stat().st_size / 1e6:.2f} MB", checker, result))
    try:
        path, _ = export_llama2c(source, out / f"{source.parent.name}-llama2c.bin", 0, overwrite=True)
        rows.append(
            ("llama2.c v0", f"`{path}`", f"{path.stat().st_size / 1e6:.2f} MB", "(run.c: see the tests)", "written")
        )
    except ValueError as refusal:  # a byte-level BPE vocabulary: run.c's tokenizer cannot hold it
        rows.append(("llama2.c", "—", "—", "refused before writing", str(refusal).split(": ", 1)[-1]))
    table = markdown_table(("format", "file", "size", "checked by", "result"), rows, left=5)
    out.mkdir(parents=True, exist_ok=True)
    (out / "exports.md").write_text(table + "\n", encoding="utf-8")
    return table
