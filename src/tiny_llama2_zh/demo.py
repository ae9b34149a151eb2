"""The end-to-end demo: embedded corpus -> tokenizer -> .bin -> pretraining on CPU -> samples, in one folder.

Every stage is the real one the CLI runs on its own; this module only chains them and times them.
"""

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path

from tiny_llama2_zh.config import load_config
from tiny_llama2_zh.data.demo_corpus import build_demo_corpus
from tiny_llama2_zh.data.pretokenized import write_token_file
from tiny_llama2_zh.tokenizer import iter_texts, train_bpe_tokenizer
from tiny_llama2_zh.train.pretrain import PretrainConfig, pretrain

# The shipped recipes are package data (the repository's `configs/` links here), so the demo runs from any install.
PACKAGE_CONFIGS = Path(str(files("tiny_llama2_zh") / "configs"))
DEMO_CONFIG = PACKAGE_CONFIGS / "pretrain" / "demo.yaml"
DEMO_VOCAB_SIZE = 4096


@dataclass
class DemoReport:
    output_dir: str
    stage_seconds: dict[str, float] = field(default_factory=dict)
    corpus: dict = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    parameters: dict[str, int] = field(default_factory=dict)
    initial_validation_loss: float | None = None
    final_validation_loss: float | None = None
    samples: dict[str, str] = field(default_factory=dict)

    def markdown(self) -> str:
        lines = [
            "# tiny-llama2-zh demo",
            "",
            f"- corpus: {self.corpus['train']['documents']:,} train / {self.corpus['validation']['documents']:,} "
            f"validation documents ({self.corpus['train']['characters']:,} / "
            f"{self.corpus['validation']['characters']:,} characters)",
            f"- tokens: {self.tokens['train']:,} train / {self.tokens['validation']:,} validation",
            f"- model: {self.parameters['total']:,} parameters "
            f"({self.parameters['non_embedding']:,} without embedding)",
            f"- validation loss: {self.initial_validation_loss:.3f} before training -> "
            f"{self.final_validation_loss:.3f} after",
            "- wall time: " + ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in self.stage_seconds.items()),
            "",
            "## Sampled continuations (seeded; temperature 0.8, top-p 0.9, repetition penalty 1.1)",
            "",
        ]
        for prompt, continuation in self.samples.items():
            lines += [f"- **{prompt}**{continuation}", ""]
        return "\n".join(lines)


def run_demo(
    output_dir: str | Path,
    config_path: str | Path = DEMO_CONFIG,
    overrides: list[str] | None = None,
    force: bool = False,
) -> DemoReport:
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        if not force:
            raise FileExistsError(
                f"{output_dir} already holds a demo run; choose another --output, or pass --force to replace it"
            )
        print(f"--force: removing the earlier demo run in {output_dir}")
        shutil.rmtree(output_dir)
    if not Path(config_path).is_file():
        raise FileNotFoundError(f"demo config {config_path} not found")
    report = DemoReport(output_dir=str(output_dir))
    total = time.perf_counter()

    def timed(stage: str, started: float) -> None:
        report.stage_seconds[stage] = round(time.perf_counter() - started, 2)
        print(f"[demo] {stage}: {report.stage_seconds[stage]:.1f}s")

    started = time.perf_counter()
    stats = build_demo_corpus(output_dir / "corpus")
    report.corpus = asdict(stats)
    print(f"[demo] {stats.summary()}")
    timed("corpus", started)

    started = time.perf_counter()
    tokenizer = train_bpe_tokenizer([output_dir / "corpus" / "train.jsonl"], DEMO_VOCAB_SIZE, output_dir / "tokenizer")
    timed("tokenizer", started)

    started = time.perf_counter()
    for split in ("train", "validation"):
        manifest = write_token_file(
            iter_texts([output_dir / "corpus" / f"{split}.jsonl"]),
            tokenizer,
            output_dir / "data" / f"{split}.bin",
            sources=["demo"],
            total=getattr(stats, split).documents,
        )
        report.tokens[split] = manifest.num_tokens
    timed("tokenize", started)

    started = time.perf_counter()
    config = load_config(
        PretrainConfig,
        config_path,
        [
            f"data.tokenizer={output_dir / 'tokenizer'}",
            f"data.train={output_dir / 'data' / 'train.bin'}",
            f"data.validation={output_dir / 'data' / 'validation.bin'}",
            f"train.output_dir={output_dir / 'pretrain'}",
            *(overrides or []),
        ],
    )
    result = pretrain(config)
    timed("pretrain", started)
    report.stage_seconds["total"] = round(time.perf_counter() - total, 2)

    report.parameters = result["parameters"]
    report.initial_validation_loss = result["initial_validation_loss"]
    report.final_validation_loss = result["final_validation_loss"]
    report.samples = result["samples"]
    (output_dir / "summary.json").write_text(json.dumps(asdict(report), indent=2, ensure_ascii=False) + "\n")
    (output_dir / "summary.md").write_text(report.markdown() + "\n", encoding="utf-8")
    return report
