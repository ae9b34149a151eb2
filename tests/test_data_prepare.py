"""`data prepare` end to end: shards bound to the inputs that made them (stale and surplus shards are rebuilt or
removed), every document framed by bos/eos in both writers, bad records counted instead of tracebacks, no
temporary files after a stop, and SFT/preference splits by prompt."""

import json
from pathlib import Path

import numpy as np
import pytest

from tiny_llama2_zh.data.cleaning import CleaningOptions
from tiny_llama2_zh.data.prepare import PrepareOptions, prepare, tokenize_to_shards
from tiny_llama2_zh.data.pretokenized import read_tokens, write_token_file
from tiny_llama2_zh.data.sources import BadInputError
from tiny_llama2_zh.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def documents(corpus_texts) -> list[str]:
    """90 distinct demo-corpus texts that pass cleaning unchanged (long, Chinese, no full-width letters)."""
    chosen = [t for t in corpus_texts if 40 <= len(t) <= 400 and not any("\uff10" <= c <= "\uff5a" for c in t)]
    assert len(chosen) >= 90
    return chosen[:90]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def run(output: Path, files: list[Path], tokenizer: Path, docs_per_shard: int = 10, **extra):
    options = PrepareOptions(
        output_dir=str(output),
        sources=[("jsonl", [str(f) for f in files])],
        tokenizer=str(tokenizer),
        workers=1,
        docs_per_shard=docs_per_shard,
        batch_size=4,
        validation_per_mille=0,
        cleaning=CleaningOptions(near_dedup=False),
        **extra,
    )
    return prepare(options)


def decoded_documents(paths: list[Path], tokenizer) -> list[str]:
    """The documents of token files, in order, checking that each is exactly bos + tokens + eos."""
    texts = []
    for path in paths:
        tokens = np.asarray(read_tokens(path)).astype(np.int64)
        ends = np.flatnonzero(tokens == tokenizer.eos_token_id)
        assert len(ends) and ends[-1] == len(tokens) - 1
        for document in np.split(tokens, ends[:-1] + 1):
            assert document[0] == tokenizer.bos_token_id and document[-1] == tokenizer.eos_token_id
            assert tokenizer.bos_token_id not in document[1:].tolist()
            texts.append(tokenizer.decode(document[1:-1].tolist()))
    return texts


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("train-*.bin"))


def test_reused_output_folder_never_keeps_stale_or_surplus_shards(documents, small_tokenizer, tmp_path, capsys):
    tokenizer = load_tokenizer(small_tokenizer)
    out = tmp_path / "out"
    source_a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in documents[:30]])
    source_b = write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in documents[30:60]])

    run(out, [source_a], small_tokenizer)
    assert decoded_documents(shards(out), tokenizer) == documents[:30]
    capsys.readouterr()

    # another source into the same folder: every shard is rebuilt, and says why
    result = run(out, [source_b], small_tokenizer)
    assert result.shards["train"] == 3 and decoded_documents(shards(out), tokenizer) == documents[30:60]
    printed = capsys.readouterr().out
    for index in range(3):
        assert f"train-0000{index}.bin: rebuilding: made from other inputs or options" in printed

    # the same path, new contents: noticed by size/mtime, cleaned and tokenized again
    write_jsonl(source_b, [{"text": t} for t in documents[60:90]])
    run(out, [source_b], small_tokenizer)
    assert decoded_documents(shards(out), tokenizer) == documents[60:90]
    capsys.readouterr()

    # a larger docs_per_shard: 2 shards now; the third of the earlier run goes, with its manifest, and says so
    result = run(out, [source_b], small_tokenizer, docs_per_shard=25)
    printed = capsys.readouterr().out
    assert result.shards["train"] == 2 and [p.name for p in shards(out)] == ["train-00000.bin", "train-00001.bin"]
    assert not (out / "train-00002.bin.json").exists()
    assert f"{out / 'train-00002.bin'}: removed: a shard of an earlier run" in printed
    assert f"{out / 'train-00002.bin.json'}: removed" in printed
    assert decoded_documents(shards(out), tokenizer) == documents[60:90]

    # the same run again keeps every shard untouched
    before = {p.name: p.stat().st_mtime_ns for p in shards(out)}
    run(out, [source_b], small_tokenizer, docs_per_shard=25)
    assert {p.name: p.stat().st_mtime_ns for p in shards(out)} == before
    assert "rebuilding" not in capsys.readouterr().out


def test_both_writers_frame_every_document_with_bos_and_eos(documents, small_tokenizer, tmp_path):
    tokenizer = load_tokenizer(small_tokenizer)
    corpus = write_jsonl(tmp_path / "cleaned.jsonl", [{"text": t} for t in documents[:40]])
    options = PrepareOptions(
        output_dir=str(tmp_path / "out"), sources=[("jsonl", [str(corpus)])], tokenizer=str(small_tokenizer)
    )
    tokenize_to_shards(options, corpus, tmp_path / "out", "train", tokenizer)
    write_token_file(documents[:40], tokenizer, tmp_path / "reference.bin")
    shard = tmp_path / "out" / "train-00000.bin"
    assert decoded_documents([shard], tokenizer) == documents[:40]
    assert decoded_documents([tmp_path / "reference.bin"], tokenizer) == documents[:40]
    assert shard.read_bytes() == (tmp_path / "reference.bin").read_bytes()


def test_a_tokenizer_without_bos_is_refused_before_cleaning(documents, small_tokenizer, tmp_path):
    tokenizer = load_tokenizer(small_tokenizer)
    tokenizer.bos_token = None
    tokenizer.save_pretrained(str(tmp_path / "no-bos"))
    source = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in documents[:5]])
    with pytest.raises(ValueError, match="the tokenizer has no bos token"):
        run(tmp_path / "out", [source], tmp_path / "no-bos")
    assert not (tmp_path / "out" / "cleaned").exists()


def test_a_non_string_text_is_a_counted_bad_record_not_a_traceback(documents, small_tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", [{"text": documents[0]}, {"text": 12345}, {"text": documents[1]}])
    result = run(tmp_path / "out", [source], small_tokenizer)
    assert result.documents["train"] == 2 and result.bad_records == {"unexpected value": 1}
    assert result.bad_examples[0].startswith(f"{source}:2: unexpected value: field text is int, not a string")


def test_strict_mode_stops_and_leaves_no_temporary_files(documents, small_tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", [{"text": documents[0]}, {"title": "no text"}, {"text": documents[1]}])
    with pytest.raises(BadInputError, match=r"a.jsonl:2: missing field text"):
        run(tmp_path / "pretrain", [source], small_tokenizer, strict=True)
    assert not list((tmp_path / "pretrain").rglob("*.tmp"))

    belle = write_jsonl(tmp_path / "belle.json", [{"instruction": "问", "output": "答"}, {"instruction": "问"}])
    options = PrepareOptions(output_dir=str(tmp_path / "sft"), sources=[("belle", [str(belle)])], strict=True)
    with pytest.raises(BadInputError, match=r"belle.json:2: missing field output"):
        prepare(options)
    assert not list((tmp_path / "sft").rglob("*.tmp"))


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_sft_and_preference_splits_never_share_a_prompt(tmp_path):
    belle = write_jsonl(
        tmp_path / "belle.json",
        [{"instruction": f"问题{i}", "input": "", "output": f"回答{j}"} for i in range(100) for j in range(3)],
    )
    prepare(PrepareOptions(str(tmp_path / "sft"), [("belle", [str(belle)])], validation_per_mille=300))
    train, test = (read_lines(tmp_path / "sft" / f"sft-{split}.jsonl") for split in ("train", "test"))
    train_prompts = {r["messages"][0]["content"] for r in train}
    test_prompts = {r["messages"][0]["content"] for r in test}
    assert train_prompts and test_prompts and not train_prompts & test_prompts
    assert len(train) + len(test) == 300

    cvalues = write_jsonl(
        tmp_path / "train.jsonl",
        [{"prompt": f"问题{i}", "pos_resp": f"好答{j}", "neg_resp": f"坏答{j}"} for i in range(100) for j in range(3)],
    )
    prepare(PrepareOptions(str(tmp_path / "pref"), [("cvalues", [str(cvalues)])], validation_per_mille=300))
    train, test = (read_lines(tmp_path / "pref" / f"preference-{split}.jsonl") for split in ("train", "test"))
    assert {r["prompt"] for r in train} and {r["prompt"] for r in test}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}


def test_empty_and_identical_pairs_are_not_written(tmp_path):
    cvalues = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"prompt": "问", "pos_resp": "好答", "neg_resp": "坏答"},
            {"prompt": "问", "pos_resp": " ", "neg_resp": "坏答"},
            {"prompt": "问", "pos_resp": "一样", "neg_resp": "一样"},
        ],
    )
    result = prepare(PrepareOptions(str(tmp_path / "pref"), [("cvalues", [str(cvalues)])]))
    assert sum(result.documents.values()) == 1
    assert result.bad_records == {"empty chosen": 1, "chosen equals rejected": 1}
