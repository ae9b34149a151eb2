"""Decode speed of a model folder in llama.cpp (its GGUF exports) next to ours (PyTorch `model.generate`).

    python benchmarks/llamacpp_decode.py --model runs/demo/sft/final
    python benchmarks/llamacpp_decode.py --model runs/demo/sft/final --types f32 q8_0 --new-tokens 200 --threads 2

For each GGUF type the folder is exported (`tinyllm export gguf`) into a temporary folder and run greedily in real
llama.cpp: the prebuilt libllama of node-llama-cpp (`npm install` in tests/runtimes/llamacpp, see .ci/run), CPU
only, one sequence. Ours: `model.generate` with the KV cache, greedy, float32, same thread count. Decode tokens/s
counts the tokens after the first (the first comes with the prompt's prefill); `--new-tokens` tokens are made
whatever the model would say (ours: min_new_tokens; llama.cpp: end-of-generation tokens do not stop it). The
best of `--repeats` runs is printed, and whether llama.cpp's greedy tokens equal PyTorch's up to the first eos.
llama.cpp's time includes node-llama-cpp's per-token JavaScript round trip, which dominates for demo-size models.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from tiny_llama2_zh.export.gguf import export_gguf  # noqa: E402
from tiny_llama2_zh.export.llamacpp import llamacpp_missing, run_gguf  # noqa: E402
from tiny_llama2_zh.loading import load_model  # noqa: E402
from tiny_llama2_zh.train.pretrain import SEED_PROMPTS  # noqa: E402


def torch_decode(model, ids: list[int], new_tokens: int, repeats: int) -> tuple[float, list[int]]:
    """Best decode tokens/s of PyTorch generate over `repeats` runs, and its tokens."""
    input_ids = torch.tensor([ids])
    best, tokens = 0.0, []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(input_ids, max_new_tokens=1, do_sample=False)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            out = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            decode = time.perf_counter() - start - prefill
            best = max(best, (new_tokens - 1) / decode)
            tokens = out[0, len(ids) :].tolist()
    return best, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="saved model folder (e.g. runs/demo/sft/final)")
    parser.add_argument("--types", nargs="+", default=["f32", "f16", "q8_0"], help="GGUF types to run")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens to generate per run (default: 128)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per engine; the best is printed (default: 3)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for both")
    parser.add_argument("--prompt", default=SEED_PROMPTS[0], help="prompt to continue")
    args = parser.parse_args()
    missing = llamacpp_missing()
    if missing:
        sys.exit(f"llamacpp_decode: {missing}")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, "cpu")
    ids = tokenizer(args.prompt)["input_ids"]
    context = model.config.max_position_embeddings
    if len(ids) + args.new_tokens > context:
        sys.exit(f"llamacpp_decode: prompt {len(ids)} + {args.new_tokens} new tokens exceed the context {context}")
    ours, our_tokens = torch_decode(model, ids, args.new_tokens, args.repeats)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model {args.model}: {parameters:,} parameters; prompt {len(ids)} tokens, {args.new_tokens} new tokens")
    print(f"{args.threads} threads, best of {args.repeats} (provisional unless the machine was otherwise idle)")
    print(f"{'engine':<22} {'decode tok/s':>12} {'file MiB':>9}  greedy tokens = PyTorch's (to eos)")
    print(f"{'PyTorch generate f32':<22} {ours:>12.1f} {'':>9}")
    with tempfile.TemporaryDirectory() as folder:
        for out_type in args.types:
            path = export_gguf(args.model, Path(folder) / f"model-{out_type}.gguf", out_type)
            job = {"tokens": ids, "maxTokens": args.new_tokens, "stop": []}
            answer = run_gguf(
                {"model": str(path), "threads": args.threads, "contextSize": context, "generate": [job] * args.repeats}
            )
            rate = max((len(g["tokens"]) - 1) / g["decodeSeconds"] for g in answer["generated"])
            theirs = answer["generated"][0]["tokens"]
            # ours may not stop (min_new_tokens masks eos), llama.cpp does not: compared up to llama.cpp's first eos
            end = theirs.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in theirs else len(theirs)
            same = theirs[:end] == our_tokens[:end]
            size = path.stat().st_size / 2**20
            print(f"{'llama.cpp ' + out_type:<22} {rate:>12.1f} {size:>9.1f}  {same}")


if __name__ == "__main__":
    main()
