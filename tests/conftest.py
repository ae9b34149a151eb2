import os

# Tests never reach a hub: anything that tries fails loudly instead of hanging.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
from pathlib import Path

import pytest
import torch

import tiny_llama2_zh.model  # noqa: F401  (registers the Auto classes)
from tiny_llama2_zh.config import load_config
from tiny_llama2_zh.data.demo_corpus import build_demo_corpus
from tiny_llama2_zh.data.pretokenized import write_token_file
from tiny_llama2_zh.model import TinyLlama2Config
from tiny_llama2_zh.tokenizer import iter_texts, load_tokenizer, train_bpe_tokenizer
from tiny_llama2_zh.train.pretrain import PretrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("TINYLLM_SHARED_DIR", REPO_ROOT.parent / "shared"))
CHATGLM3_MODEL = SHARED_DIR / "tokenizers" / "chatglm3" / "tokenizer.model"


@pytest.fixture(scope="session")
def chatglm3_model_file() -> Path:
    if not CHATGLM3_MODEL.is_file():
        pytest.skip(f"ChatGLM3 tokenizer.model not found at {CHATGLM3_MODEL} (set TINYLLM_SHARED_DIR to its shared/)")
    return CHATGLM3_MODEL


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    build_demo_corpus(folder)
    return folder


@pytest.fixture(scope="session")
def corpus_texts(demo_corpus) -> list[str]:
    lines = (demo_corpus / "validation.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines]


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory, demo_corpus):
    """A 1,024-token BPE trained on the first 3,000 training documents (a few seconds)."""
    sample = tmp_path_factory.mktemp("tokenizer_input") / "sample.jsonl"
    with (demo_corpus / "train.jsonl").open(encoding="utf-8") as lines:
        sample.write_text("".join(line for _, line in zip(range(3000), lines)), encoding="utf-8")
    folder = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer([sample], vocab_size=1024, output_dir=folder)
    return folder


@pytest.fixture(scope="session")
def token_files(small_tokenizer, demo_corpus, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bins")
    tokenizer = load_tokenizer(small_tokenizer)
    lines = (demo_corpus / "train.jsonl").read_text(encoding="utf-8").splitlines()[:400]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_token_file(iter_texts([folder / "train.jsonl"]), tokenizer, folder / "train.bin")
    write_token_file(iter_texts([demo_corpus / "validation.jsonl"]), tokenizer, folder / "validation.bin")
    return {"train": folder / "train.bin", "validation": folder / "validation.bin"}


def smoke_overrides(small_tokenizer, token_files, output_dir, *extra) -> list[str]:
    """Overrides of the demo YAML for a tiny, fast run on the test token files; later `extra` ones win."""
    return [
        f"data.tokenizer={small_tokenizer}",
        f"data.train={token_files['train']}",
        f"data.validation={token_files['validation']}",
        f"train.output_dir={output_dir}",
        "model.hidden_size=32",
        "model.num_hidden_layers=2",
        "data.seq_len=32",
        "data.eval_blocks=4",
        "train.max_steps=2",
        "train.per_device_train_batch_size=2",
        "train.warmup_steps=0",
        "train.logging_steps=1",
        "train.eval_steps=0",
        "train.report_to=[]",
        "sample_max_new_tokens=5",
        *extra,
    ]


def smoke_config(small_tokenizer, token_files, output_dir, *extra) -> PretrainConfig:
    return load_config(
        PretrainConfig,
        REPO_ROOT / "configs" / "pretrain" / "demo.yaml",
        smoke_overrides(small_tokenizer, token_files, output_dir, *extra),
    )


def tiny_config(**overrides) -> TinyLlama2Config:
    """A small random config with grouped-query attention (4 query heads share 2 kv heads)."""
    fields = dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return TinyLlama2Config(**fields)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def lively_model(tokenizer, **overrides):
    """A random tiny model with the tokenizer's vocabulary and special ids and livelier logits than the default
    init (replies are varied text, not one token repeated): for chat, serving and the web page."""
    from tiny_llama2_zh.model import TinyLlama2ForCausalLM

    torch.manual_seed(0)
    config = tiny_config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.3,
        **overrides,
    )
    return TinyLlama2ForCausalLM(config).eval()


def save_tiny_model(tokenizer_dir: Path, folder: Path, **config_overrides) -> Path:
    """A random tiny model with the tokenizer's vocabulary and special ids, saved with it as a model folder."""
    from tiny_llama2_zh.loading import save_model_folder
    from tiny_llama2_zh.model import TinyLlama2ForCausalLM

    tokenizer = load_tokenizer(tokenizer_dir)
    config = tiny_config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **config_overrides,
    )
    torch.manual_seed(0)
    return save_model_folder(TinyLlama2ForCausalLM(config), tokenizer, folder)


@pytest.fixture(scope="session")
def tiny_model_dir(small_tokenizer, tmp_path_factory) -> Path:
    """A stand-in for a pretrained `final/` folder."""
    return save_tiny_model(small_tokenizer, tmp_path_factory.mktemp("tiny_model"), max_position_embeddings=128)
