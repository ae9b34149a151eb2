"""`tinyllm quantize --report`: every method side by side with float32 — size on disk, validation perplexity and
its change, demo-task accuracy, decode tokens/s at batch 1 and prefill tokens/s — for a trained model and for a
size preset's shape (random weights: size and speed only, since perplexity and accuracy of random weights say
nothing).

Speeds are `model.generate` (greedy, a fixed number of new tokens, the path `tinyllm generate` and `chat` take) and
one forward pass over a full context, each the best of a few repeats after a warm-up, on `torch.get_num_threads()`
threads. Run it on a quiet machine: another job on the cores changes every speed figure.
"""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import Subset

from tiny_llama2_zh.eval.markdown import percent, table
from tiny_llama2_zh.quantize.methods import (
    METHODS,
    WEIGHTS_FILE,
    apply_method,
    quantized_tensors,
    refuse_quantized,
    save_quantized,
)

FP32 = "float32"


@dataclass
class ReportRow:
    model: str  # the trained model's label (e.g. "sft") or the preset shape, e.g. "24m (random weights)"
    method: str
    folder: str | None
    size_bytes: int
    perplexity: float | None = None
    perplexity_change: float | None = None  # relative to float32
    tasks: dict[str, float] | None = None  # headline metric per task
    decode_tokens_per_s: float | None = None
    prefill_tokens_per_s: float | None = None


def _weights_size(folder: Path) -> int:
    """Bytes of the weight files (config, tokenizer and code files are the same for every method)."""
    files = [folder / WEIGHTS_FILE] if (folder / WEIGHTS_FILE).is_file() else sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no weight file")
    return sum(file.stat().st_size for file in files)


@torch.inference_mode()
def decode_speed(model, prompt_tokens: int = 16, new_tokens: int = 64, repeats: int = 3) -> float:
    """Tokens/s of greedy `generate` at batch 1 (best of `repeats`), exactly `new_tokens` each time."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (1, prompt_tokens), generator=generator)
    kwargs = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        best = min(best, time.perf_counter() - start)
    return new_tokens / best


@torch.inference_mode()
def prefill_speed(model, repeats: int = 3) -> float:
    """Tokens/s of one forward pass over a full context at batch 1 (best of `repeats`)."""
    length = model.config.max_position_embeddings
    ids = torch.randint(5, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    model(ids)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(ids)
        best = min(best, time.perf_counter() - start)
    return length / best


def _perplexity(model, tokenizer, validation: Path, max_blocks: int) -> float:
    from tiny_llama2_zh.data.pretokenized import PretrainDataset
    from tiny_llama2_zh.eval.perplexity import evaluate_loss
    from tiny_llama2_zh.tokenizer import tokenizer_fingerprint

    dataset = PretrainDataset(
        validation, model.config.max_position_embeddings, expected_fingerprint=tokenizer_fingerprint(tokenizer)
    )
    return evaluate_loss(model, Subset(dataset, range(min(max_blocks, len(dataset)))), batch_size=8).perplexity


def _task_headlines(folders: list[Path], tasks_dir: Path, limit: int) -> dict[str, dict[str, float]]:
    from tiny_llama2_zh.eval.tasks import TABLE_COLUMNS, evaluate_tasks

    headline = {}  # the first TABLE_COLUMNS metric of each task
    for task, metric, header in TABLE_COLUMNS:
        headline.setdefault(task, (metric, header))
    result = evaluate_tasks(
        folders, tasks_dir, limit, show_progress=False, warn=lambda message: None, bag_of_words=False
    )
    scores = {}
    for row in result["rows"]:
        if row["kind"] == "model":
            scores[row["path"]] = {
                headline[task][1]: scored["metrics"][headline[task][0]] for task, scored in row["tasks"].items()
            }
    return scores


def _label(folder: Path) -> str:
    """A short row label: the run folder's name for RUN/final (e.g. "sft"), else the folder's own name."""
    return folder.parent.name if folder.name == "final" else folder.name


def quantize_report(
    model_dirs: list[str | Path],
    output_dir: str | Path,
    methods: list[str] | None = None,
    group_size: int = 32,
    validation: str | Path | None = None,
    max_blocks: int = 32,
    tasks_dir: str | Path | None = None,
    tasks_models: list[str | Path] | None = None,
    limit: int = 100,
    shape: str | None = "24m",
    progress=print,
    decode_tokens: int = 64,
    repeats: int = 3,
) -> dict:
    """Quantise each model folder with every method into OUTPUT/<label>-<method>/, measure each against its float32
    original, and the same for the `shape` preset with random weights; write OUTPUT/quantize_report.{json,md}.
    Task accuracy is measured for `tasks_models` (default: every model) when `tasks_dir` is given."""
    from tiny_llama2_zh.loading import load_model

    methods = methods or list(METHODS)
    for model_dir in model_dirs:
        refuse_quantized(model_dir, "quantize --report")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows: list[ReportRow] = []
    vocab_size = None
    for model_dir in map(Path, model_dirs):
        label = _label(model_dir)
        folders = {FP32: model_dir}
        for method in methods:
            progress(f"quantize: {label} {method}")
            model, tokenizer = load_model(model_dir, "cpu")
            quantized = apply_method(model, method, group_size)
            folders[method] = save_quantized(
                quantized, tokenizer, output_dir / f"{label}-{method}", method, group_size, model_dir
            )
        with_tasks = tasks_dir and (
            tasks_models is None or model_dir.resolve() in {Path(m).resolve() for m in tasks_models}
        )
        accuracy = _task_headlines(list(folders.values()), Path(tasks_dir), limit) if with_tasks else {}
        model_rows = []
        for method, folder in folders.items():
            progress(f"measure: {label} {method}")
            model, tokenizer = load_model(folder, "cpu")
            vocab_size = len(tokenizer)
            row = ReportRow(label, method, str(folder), _weights_size(folder))
            if validation:
                row.perplexity = _perplexity(model, tokenizer, Path(validation), max_blocks)
                row.perplexity_change = row.perplexity / model_rows[0].perplexity - 1 if model_rows else 0.0
            row.tasks = accuracy.get(str(folder.resolve()))
            row.decode_tokens_per_s = decode_speed(model, new_tokens=decode_tokens, repeats=repeats)
            row.prefill_tokens_per_s = prefill_speed(model, repeats=repeats)
            model_rows.append(row)
        rows += model_rows
    if shape and vocab_size:
        speed = {"decode_tokens": decode_tokens, "repeats": repeats}
        rows += _shape_rows(shape, vocab_size, methods, group_size, output_dir / f"shape-{shape}", progress, **speed)
    report = {
        "sources": [str(folder) for folder in model_dirs],
        "validation": str(validation) if validation else None,
        "validation_blocks": max_blocks if validation else None,
        "tasks": str(tasks_dir) if tasks_dir else None,
        "task_rows": limit if tasks_dir else None,
        "threads": torch.get_num_threads(),
        "group_size": group_size,
        "rows": [asdict(row) for row in rows],
    }
    (output_dir / "quantize_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (output_dir / "quantize_report.md").write_text(markdown_table(report) + "\n", encoding="utf-8")
    return report


def _shape_rows(
    shape: str, vocab_size: int, methods: list[str], group_size: int, folder: Path, progress, decode_tokens, repeats
) -> list[ReportRow]:
    from safetensors.torch import save_file

    from tiny_llama2_zh.model import TinyLlama2ForCausalLM
    from tiny_llama2_zh.presets import preset_config

    name = f"{shape} (random weights)"
    torch.manual_seed(0)
    rows = []
    for method in [FP32, *methods]:
        progress(f"measure: {shape} {method}")
        model = TinyLlama2ForCausalLM(preset_config(shape, vocab_size)).eval()
        if method == FP32:
            model.save_pretrained(folder / FP32)
            size = _weights_size(folder / FP32)
        else:
            apply_method(model, method, group_size)
            (folder / method).mkdir(parents=True, exist_ok=True)
            save_file(quantized_tensors(model), folder / method / WEIGHTS_FILE)
            size = _weights_size(folder / method)
        decode = decode_speed(model, new_tokens=decode_tokens, repeats=repeats)
        rows.append(
            ReportRow(name, method, None, size, None, None, None, decode, prefill_speed(model, repeats=repeats))
        )
    return rows


def _ratio(size: int, reference: int) -> str:
    return f"{reference / size:.2f}x" if size != reference else "1x"


def markdown_table(report: dict) -> str:
    task_headers = sorted({header for row in report["rows"] for header in (row["tasks"] or {})})
    header = ["model", "method", "weights on disk", "smaller", "perplexity", "change", *task_headers]
    header += ["decode tok/s (batch 1)", "prefill tok/s"]
    rows = []
    reference: dict[str, int] = {}
    for row in report["rows"]:
        reference.setdefault(row["model"], row["size_bytes"])
        cells = [
            row["model"],
            row["method"],
            f"{row['size_bytes'] / 1e6:.2f} MB",
            _ratio(row["size_bytes"], reference[row["model"]]),
            f"{row['perplexity']:.2f}" if row["perplexity"] is not None else "—",
            f"{100 * row['perplexity_change']:+.2f}%" if row["perplexity_change"] is not None else "—",
            *(percent(row["tasks"].get(h)) if row["tasks"] else "—" for h in task_headers),
            f"{row['decode_tokens_per_s']:.0f}",
            f"{row['prefill_tokens_per_s']:.0f}",
        ]
        rows.append(cells)
    notes = [
        "",
        f"Speeds on {report['threads']} threads; perplexity on {report['validation_blocks']} validation blocks of "
        f"{report['validation']}; task metrics on the first {report['task_rows']} test rows of {report['tasks']}.",
        "Methods: "
        + "; ".join(f"{name} ({method.library}): {method.summary}" for name, method in METHODS.items())
        + f"; int4 group size {report['group_size']}.",
    ]
    return "\n".join([table(header, rows, left=2), *notes])
