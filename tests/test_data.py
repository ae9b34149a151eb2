import json
from pathlib import Path

import numpy as np
import pytest

from tiny_llama2_zh.data.demo_corpus import build_demo_corpus, strip_pos_tags
from tiny_llama2_zh.data.pretokenized import (
    Manifest,
    PretrainDataset,
    manifest_path,
    read_tokens,
    token_dtype,
    write_token_file,
)
from tiny_llama2_zh.tokenizer import load_tokenizer


def test_strip_pos_tags():
    assert strip_pos_tags("迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w") == "迈向充满希望的新世纪——"
    assert strip_pos_tags("１/m  张/q  ）/w\n") == "１张）"


def test_demo_corpus_is_deterministic_and_split_cleanly(demo_corpus, tmp_path):
    build_demo_corpus(tmp_path)
    for name in ("train.jsonl", "validation.jsonl", "stats.json"):
        assert (tmp_path / name).read_bytes() == (demo_corpus / name).read_bytes()
    train = [json.loads(line) for line in (demo_corpus / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    validation = [
        json.loads(line) for line in (demo_corpus / "validation.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert not {r["text"] for r in train} & {r["text"] for r in validation}
    assert {r["source"] for r in train} == {"peoples_daily_1998", "reviews_positive", "reviews_negative"}
    stats = json.loads((demo_corpus / "stats.json").read_text())
    assert stats["train"]["documents"] == len(train) > 30_000
    assert stats["train"]["characters"] == sum(len(r["text"]) for r in train)
    assert 0.01 < len(validation) / (len(train) + len(validation)) < 0.03  # 20 per mille by hash
    assert not any("/" in r["text"] and r["source"] == "peoples_daily_1998" and "/n " in r["text"] for r in train)


def test_token_dtype_choice():
    assert token_dtype(64798) == np.uint16  # ChatGLM3 fits
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_token_file_round_trip(small_tokenizer, corpus_texts, tmp_path):
    tokenizer = load_tokenizer(small_tokenizer)
    texts = corpus_texts[:200]
    manifest = write_token_file(iter(texts), tokenizer, tmp_path / "val.bin", sources=["test"], batch_size=64)
    assert manifest == Manifest.read(tmp_path / "val.bin")
    assert manifest.dtype == "uint16" and manifest.num_documents == 200
    assert manifest.bos_token_id == tokenizer.bos_token_id and manifest.format.endswith("-v2")
    tokens = read_tokens(tmp_path / "val.bin")
    assert len(tokens) == manifest.num_tokens == (tmp_path / "val.bin").stat().st_size // 2
    eos_positions = np.flatnonzero(tokens == tokenizer.eos_token_id)
    assert len(eos_positions) == 200 and eos_positions[-1] == len(tokens) - 1
    documents = np.split(np.asarray(tokens), eos_positions[:-1] + 1)
    assert all(d[0] == tokenizer.bos_token_id and d[-1] == tokenizer.eos_token_id for d in documents)
    assert [tokenizer.decode(d[1:-1].tolist()) for d in documents] == texts
    assert not (tmp_path / "val.bin.tmp").exists()


def test_uint32_file_for_a_large_vocabulary(small_tokenizer, tmp_path):
    tokenizer = load_tokenizer(small_tokenizer)
    extra = [f"<extra_{i}>" for i in range(65536 - len(tokenizer) + 10)]
    tokenizer.add_tokens(extra)
    assert len(tokenizer) > 65536
    text = f"测试{extra[-1]}"
    manifest = write_token_file([text], tokenizer, tmp_path / "big.bin")
    assert manifest.dtype == "uint32"
    tokens = read_tokens(tmp_path / "big.bin").tolist()
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokens == [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    assert max(tokens) > 65535


def test_a_crash_while_writing_leaves_no_complete_looking_file(small_tokenizer, tmp_path):
    def texts():
        yield "第一篇"
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_token_file(texts(), load_tokenizer(small_tokenizer), tmp_path / "x.bin", batch_size=1)
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "x.bin.json").exists()
    assert not (tmp_path / "x.bin.tmp").exists()


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("crash_renaming", ["x.bin", "x.bin.json"])
def test_a_crash_while_publishing_never_leaves_a_manifest_for_another_bin(
    small_tokenizer, tmp_path, monkeypatch, overwrite, crash_renaming
):
    """The process dies as a finished file is moved into place (the .bin's rename or the manifest's), over nothing
    or over an earlier file of another length: a manifest that is left must describe the .bin beside it."""
    tokenizer = load_tokenizer(small_tokenizer)
    path = tmp_path / "x.bin"
    if overwrite:
        write_token_file(["旧的文件"] * 3, tokenizer, path)
    real_replace = Path.replace

    def dying_replace(self, target):
        if Path(target).name == crash_renaming:
            raise KeyboardInterrupt("killed")
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        write_token_file(["新的文件，更长一些"] * 5, tokenizer, path)
    monkeypatch.undo()
    if manifest_path(path).exists():
        assert path.exists()
        assert len(read_tokens(path)) == Manifest.read(path).num_tokens  # the count the manifest's writer saw
    else:
        with pytest.raises(FileNotFoundError, match=r"x\.bin\.json is missing"):  # a .bin alone is refused
            read_tokens(path)
    assert not (tmp_path / "x.bin.tmp").exists()


def test_pretrain_dataset_blocks_cover_every_pair_once(small_tokenizer, corpus_texts, tmp_path):
    tokenizer = load_tokenizer(small_tokenizer)
    write_token_file(corpus_texts[:50], tokenizer, tmp_path / "d.bin")
    tokens = np.asarray(read_tokens(tmp_path / "d.bin")).astype(np.int64)
    dataset = PretrainDataset(tmp_path / "d.bin", seq_len=33)
    assert len(dataset) == (len(tokens) - 1) // 32
    pairs = []
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["input_ids"].shape == (33,) and item["input_ids"] is item["labels"]
        x, y = item["input_ids"][:-1], item["labels"][1:]  # what the model's shifted loss compares
        pairs += list(zip(x.tolist(), y.tolist()))
    expected = list(zip(tokens[:-1].tolist(), tokens[1:].tolist()))[: len(pairs)]
    assert pairs == expected and len(pairs) == len(dataset) * 32
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_pretrain_dataset_refuses_another_tokenizer(small_tokenizer, tmp_path):
    write_token_file(["一些文字"] * 20, load_tokenizer(small_tokenizer), tmp_path / "d.bin")
    with pytest.raises(ValueError, match="re-run"):
        PretrainDataset(tmp_path / "d.bin", seq_len=8, expected_fingerprint="0000000000000000")
    with pytest.raises(FileNotFoundError, match=r"missing\.bin\.json is missing"):
        PretrainDataset(tmp_path / "missing.bin", seq_len=8)


def test_files_without_bos_are_refused_with_the_command_to_run(small_tokenizer, tmp_path):
    write_token_file(["一些文字"] * 20, load_tokenizer(small_tokenizer), tmp_path / "d.bin")
    manifest = json.loads((tmp_path / "d.bin.json").read_text())
    manifest["format"] = "tiny-llama2-zh/pretokenized-v1"  # as written before every document had a bos
    del manifest["bos_token_id"], manifest["inputs_hash"]
    (tmp_path / "d.bin.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"no bos token before each document; re-run `tinyllm data prepare`"):
        PretrainDataset(tmp_path / "d.bin", seq_len=8)


def test_a_tokenizer_without_bos_is_refused(small_tokenizer, tmp_path):
    tokenizer = load_tokenizer(small_tokenizer)
    tokenizer.bos_token = None
    with pytest.raises(ValueError, match="the tokenizer has no bos token"):
        write_token_file(["一些文字"], tokenizer, tmp_path / "d.bin")
    assert not list(tmp_path.iterdir())
