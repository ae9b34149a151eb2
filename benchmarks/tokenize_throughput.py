"""Tokenization at corpus scale: the seed's approach vs our pipeline vs the tokenizer library's upper bound.

    python benchmarks/tokenize_throughput.py --size-mb 300            # the demo corpus, replicated to 300 MB
    python benchmarks/tokenize_throughput.py --size-mb 100 300 --only seed ours   # memory growth
    python benchmarks/tokenize_throughput.py --size-mb 10 --only ours raw-spm --repeat 3   # a quick ratio

With --repeat N the methods run N times, interleaved (ours, raw-spm, ours, raw-spm, ...), so that a machine whose
speed drifts slows every method alike; the summary compares each method's best run. When both `ours` and
`raw-spm` ran, it prints the ratio the README quotes: our pipeline's MB/s as a share of SentencePiece's own batch
encoding. Small inputs understate it: `ours` includes loading the tokenizer folder and hashing it for the shard
manifests (about 2 s on this machine), which raw-spm does not do.

Methods, each in a fresh child process (the parent only coordinates). Peak RSS is the whole pipeline's: the sum over
the child and all its worker processes, sampled every 200 ms (psutil), at its highest.
  seed       the seed project's loop: per-document `tokenizer.encode`, `all_tokens += tokens`, one `np.array`
             at the end, written as one .bin
  ours       `tinyllm data prepare`'s tokenization stage: batches encoded by SentencePiece's threaded batch
             encoder (the converted ChatGLM3 folder carries its model), streamed to shards
  ours-hf    the same pipeline encoding with the `tokenizers` library in worker processes (the path for our own
             BPE tokenizers)
  raw        upper bound of the `tokenizers` library: batch encoding over the whole input on all cores,
             results thrown away (no eos, no conversion, no writing)
  raw-spm    upper bound of SentencePiece: its batch encoding on all cores, results thrown away
Tokenizer: ChatGLM3's, converted from ../shared/tokenizers/chatglm3/tokenizer.model (or --tokenizer DIR).
"""

import argparse
import importlib
import json
import multiprocessing
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
CHATGLM3 = REPO.parent / "shared" / "tokenizers" / "chatglm3" / "tokenizer.model"


def make_input(folder: Path, size_mb: float, corpus: Path) -> Path:
    """The demo corpus' training texts repeated until the JSONL reaches size_mb."""
    lines = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    path = folder / f"input-{size_mb}mb.jsonl"
    written = 0
    with path.open("w", encoding="utf-8") as out:
        while written < size_mb * 2**20:
            for line in lines:
                out.write(line)
                written += len(line.encode("utf-8"))
    return path


def texts(path: Path):
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)["text"]


def run_seed(path: Path, tokenizer_dir: str, output: Path) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    all_tokens = []
    for text in texts(path):
        tokens = tokenizer.encode(text, add_special_tokens=False)
        tokens.append(tokenizer.eos_token_id)
        all_tokens += tokens
    array = np.array(all_tokens, dtype=np.uint16)
    array.tofile(output / "seed.bin")
    return len(array)


def run_ours(path: Path, tokenizer_dir: str, output: Path) -> int:
    from tiny_llama2_zh.data.prepare import PrepareOptions, tokenize_to_shards
    from tiny_llama2_zh.tokenizer import load_tokenizer

    options = PrepareOptions(
        output_dir=str(output), sources=[("jsonl", [str(path)])], tokenizer=tokenizer_dir, workers=os.cpu_count() or 1
    )
    _, tokens, _ = tokenize_to_shards(options, path, output, "train", load_tokenizer(tokenizer_dir))
    return tokens


def run_raw(path: Path, tokenizer_dir: str, output: Path) -> int:
    from transformers import AutoTokenizer

    backend = AutoTokenizer.from_pretrained(tokenizer_dir).backend_tokenizer
    total, batch = 0, []
    for text in texts(path):
        batch.append(text)
        if len(batch) == 4096:
            total += sum(len(e.ids) for e in backend.encode_batch(batch, add_special_tokens=False))
            batch = []
    if batch:
        total += sum(len(e.ids) for e in backend.encode_batch(batch, add_special_tokens=False))
    return total


def run_ours_hf(path: Path, tokenizer_dir: str, output: Path) -> int:
    """Our pipeline forced onto the `tokenizers` library (a copy of the folder without tokenizer.model)."""
    import shutil

    plain = output / "tokenizer-without-sentencepiece"
    shutil.copytree(tokenizer_dir, plain, ignore=shutil.ignore_patterns("tokenizer.model"))
    return run_ours(path, str(plain), output)


def run_raw_spm(path: Path, tokenizer_dir: str, output: Path) -> int:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(CHATGLM3))
    total, batch = 0, []
    for text in texts(path):
        batch.append(text)
        if len(batch) == 4096:
            total += sum(map(len, processor.encode(batch, num_threads=os.cpu_count())))
            batch = []
    if batch:
        total += sum(map(len, processor.encode(batch, num_threads=os.cpu_count())))
    return total


METHODS = {"seed": run_seed, "ours": run_ours, "ours-hf": run_ours_hf, "raw": run_raw, "raw-spm": run_raw_spm}
PIPELINE_IMPORTS = ["tiny_llama2_zh.data.prepare", "tiny_llama2_zh.tokenizer"]
METHOD_IMPORTS = {
    "seed": ["transformers"],
    "ours": PIPELINE_IMPORTS,
    "ours-hf": PIPELINE_IMPORTS,
    "raw": ["transformers"],
    "raw-spm": ["sentencepiece"],
}


def child(method: str, path: str, tokenizer_dir: str, output: str, queue) -> None:
    # the method's Python imports before the clock: they cost seconds on a busy machine and are no part of
    # tokenizing (loading the tokenizer is, and stays timed); only its own, so that peak RSS stays the method's
    for module in METHOD_IMPORTS[method]:
        importlib.import_module(module)
    started = time.perf_counter()
    tokens = METHODS[method](Path(path), tokenizer_dir, Path(output))
    seconds = time.perf_counter() - started
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"tokens": tokens, "seconds": seconds, "main_rss_mb": own / 1024})


class TreeRSS(threading.Thread):
    """The largest sum of resident memory over a process and all its descendants, sampled while it runs."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval, self.peak, self.done = psutil.Process(pid), interval, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            total = 0
            try:
                for process in [self.root, *self.root.children(recursive=True)]:
                    total += process.memory_info().rss
            except psutil.Error:  # a worker that ended between listing and reading
                pass
            self.peak = max(self.peak, total)
            self.done.wait(self.interval)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, nargs="+", default=[300], help="input sizes in MB (default: 300)")
    parser.add_argument("--only", nargs="+", choices=list(METHODS), default=list(METHODS), help="methods to run")
    parser.add_argument("--repeat", type=int, default=1, help="run the methods this many times, interleaved")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: convert ChatGLM3's from ../shared)")
    parser.add_argument(
        "--corpus",
        default=str(REPO / "runs/demo/corpus/train.jsonl"),
        help="JSONL to replicate (default: the demo corpus; run `tinyllm demo` or `data demo` first)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        tokenizer_dir = args.tokenizer
        if tokenizer_dir is None:
            from tiny_llama2_zh.tokenizer import convert_chatglm3

            tokenizer_dir = str(folder / "chatglm3")
            convert_chatglm3(CHATGLM3, tokenizer_dir)
        context = multiprocessing.get_context("spawn")
        print(f"{os.cpu_count()} cores; tokenizer {tokenizer_dir}")
        header = f"{'input':>8} {'method':<6} {'tokens':>13} {'seconds':>8} {'MB/s':>6} {'Mtok/s':>7}"
        print(f"{header} {'peak RSS (all processes)':>25}")
        for size in args.size_mb:
            path = make_input(folder, size, Path(args.corpus))
            best: dict[str, float] = {}
            for repeat in range(args.repeat):
                for method in args.only:
                    output = folder / f"out-{method}-{size}-{repeat}"
                    output.mkdir()
                    seconds = run_method(context, method, path, tokenizer_dir, output, size)
                    best[method] = min(seconds, best.get(method, seconds))
            if "ours" in best and "raw-spm" in best:
                print(
                    f"{size:>6g}MB ours reaches {best['raw-spm'] / best['ours']:.0%} of raw-spm's MB/s "
                    f"(best of {args.repeat}: {best['ours']:.2f} s vs {best['raw-spm']:.2f} s)",
                    flush=True,
                )
            path.unlink()


def run_method(context, method: str, path: Path, tokenizer_dir: str, output: Path, size: float) -> float:
    """Run one method in a fresh child process, print its row, and return its seconds."""
    queue = context.Queue()
    process = context.Process(target=child, args=(method, str(path), tokenizer_dir, str(output), queue))
    process.start()
    sampler = TreeRSS(process.pid)
    sampler.start()
    result = queue.get()
    sampler.done.set()
    process.join()
    rss = max(sampler.peak / 2**20, result["main_rss_mb"])
    print(
        f"{size:>6g}MB {method:<6} {result['tokens']:>13,} {result['seconds']:>8.1f} "
        f"{size / result['seconds']:>6.2f} {result['tokens'] / result['seconds'] / 1e6:>7.2f} "
        f"{rss:>23.0f}MB",
        flush=True,
    )
    return result["seconds"]


if __name__ == "__main__":
    main()
