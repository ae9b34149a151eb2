"""Decode speed: the lean decode loop (infer/decode.py) against transformers' `generate` on the same weights.

    python benchmarks/decode_speed.py --model runs/demo/sft/final
    python benchmarks/decode_speed.py --preset 24m --vocab-size 64798        # random init, ChatGLM3's vocabulary

Greedy decoding of `--new-tokens` tokens after a `--prompt-tokens` prompt, with no stop token (both run the full
length), timed end to end (prefill included), best of `--repeats` runs after one warm-up. Prints tokens/s for
`model.generate` at batch 1, for the lean loop at batch 1 and, as aggregate tokens/s, at larger batches, and
checks that both produce the same tokens. Single-threaded by default (`--threads`), the setting that matters for
a server answering several clients on a small CPU; pass --threads 0 for torch's default.
"""

import argparse
import statistics
import time

import torch

from tiny_llama2_zh.infer.decode import LeanDecoder, greedy_generate


def build_model(args):
    if args.model:
        from tiny_llama2_zh.loading import load_model

        model, tokenizer = load_model(args.model, "cpu")
        return model, f"{args.model} (vocab {len(tokenizer):,})"
    from tiny_llama2_zh.model import TinyLlama2ForCausalLM
    from tiny_llama2_zh.presets import preset_config

    config = preset_config(args.preset, args.vocab_size)
    torch.manual_seed(0)
    return TinyLlama2ForCausalLM(config).eval(), f"random-init {args.preset} (vocab {args.vocab_size:,})"


def timed(function, repeats: int) -> tuple[float, object]:
    function()  # warm-up: allocations, first-call dispatch
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="saved model folder")
    source.add_argument("--preset", help="a size preset (tiny_llama2_zh.presets), random init")
    parser.add_argument("--vocab-size", type=int, default=64798, help="vocabulary for --preset (default: ChatGLM3's)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (default: 16)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence (default: 128)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8], help="lean-loop batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the best is kept")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1; 0 = torch's default)")
    parser.add_argument("--pytorch-ops", action="store_true", help="the lean loop without its C step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, description = build_model(args)
    config = model.config
    if args.prompt_tokens + args.new_tokens > config.max_position_embeddings:
        raise SystemExit(f"prompt + new tokens exceed the model's context of {config.max_position_embeddings}")
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, config.vocab_size, (max(args.batch_sizes), args.prompt_tokens), generator=generator)
    print(
        f"model: {description}; {torch.get_num_threads()} thread(s); prompt {args.prompt_tokens}, "
        f"{args.new_tokens} new tokens, best of {args.repeats}"
    )

    model.generation_config.eos_token_id = None  # run the full length, as the lean loop does without stop ids

    @torch.inference_mode()
    def hf_generate():
        ids = prompts[:1]
        output = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        return output[0, args.prompt_tokens :].tolist()

    hf_seconds, hf_tokens = timed(hf_generate, args.repeats)
    hf_rate = args.new_tokens / hf_seconds
    print(f"transformers generate, batch 1: {hf_rate:8.1f} tok/s")

    max_len = args.prompt_tokens + args.new_tokens
    decoder = LeanDecoder(model, max_batch=max(args.batch_sizes), max_len=max_len, native=not args.pytorch_ops)
    print(f"lean decode loop: {'the C step' if decoder.native else 'PyTorch operations'}")
    rates = {}
    for batch in args.batch_sizes:
        rows = prompts[:batch].tolist()
        seconds, outputs = timed(lambda rows=rows: greedy_generate(decoder, rows, args.new_tokens), args.repeats)
        rates[batch] = batch * args.new_tokens / seconds
        label = "tok/s" if batch == 1 else "tok/s aggregate"
        print(f"lean decode loop, batch {batch}: {rates[batch]:8.1f} {label} ({rates[batch] / hf_rate:.1f}x generate)")
        if batch == 1:
            same = outputs[0] == hf_tokens
            print(f"  same greedy tokens as generate: {same}")

    # per-step latency of the lean loop at batch 1 (no prefill), the figure that bounds a streamed reply's pace
    decoder.reset()
    decoder.prefill(0, prompts[0].tolist())
    token = torch.tensor([1])
    steps = []
    for _ in range(min(64, args.new_tokens - 1)):
        start = time.perf_counter()
        decoder.step(token)
        steps.append(time.perf_counter() - start)
    decoder.reset()
    print(f"lean decode step, batch 1: median {statistics.median(steps) * 1000:.2f} ms")


if __name__ == "__main__":
    main()
