"""The corpus-scale data pipeline: every adapter on files in its published shape, bad input, cleaning counts,
worker-count determinism, resume, mixing, and the demo tasks."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tiny_llama2_zh.cli import main
from tiny_llama2_zh.data.cleaning import Cleaner, CleaningOptions
from tiny_llama2_zh.data.prepare import PrepareOptions, prepare
from tiny_llama2_zh.data.pretokenized import MixedPretrainDataset, PretrainDataset, read_tokens
from tiny_llama2_zh.data.sources import SOURCES, BadInputError, BadRecords, get_source, read_records
from tiny_llama2_zh.data.tasks import TASKS, build_tasks

WIKI = "数学是研究数量、结构以及空间等概念的一门学科。"
NOVEL = "夜色渐深，少年推开了那扇尘封已久的木门。"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def fixture_file(name: str, folder: Path) -> Path:
    """A small file in exactly the shape the corpus is published in."""
    if name == "wikipedia_cn":
        path = folder / "wikipedia-cn-20230720-filtered.json"
        rows = [{"completion": WIKI, "source": "wikipedia.zh2307"}]
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=4), encoding="utf-8")  # one pretty array
        return path
    if name == "baidubaike":
        return write_jsonl(folder / "563w_baidubaike.json", [
            {"title": "数学", "summary": "一门学科", "sections": [{"title": "历史", "content": "源远流长"}]},
            {"title": "物理", "sections": [{"title": "定义", "content": "研究物质"}]},  # summary missing
        ])  # fmt: skip
    if name == "zhihu_kol":
        return write_parquet(folder / "train-00000-of-00005-a1b2.parquet", [
            {"INSTRUCTION": "如何学习数学？", "RESPONSE": "多做题。", "SOURCE": "Zhihu", "METADATA": "{}"},
        ])  # fmt: skip
    if name == "tigerbot_pretrain":
        return write_parquet(folder / "train-00000-of-00117-c3d4.parquet", [
            {"dataType": "百科", "title": "长城", "content": "长城是古代的军事防御工程。", "uniqueKey": "k",
             "titleUkey": "t", "id": 1},
        ])  # fmt: skip
    if name == "webnovel":
        return write_jsonl(folder / "webnovel_1.jsonl", [{"title": "某书", "chapter": None, "text": NOVEL}])
    if name == "belle":
        return write_jsonl(
            folder / "train_2M_CN.json", [{"instruction": "翻译成英文", "input": "你好", "output": "Hello"}]
        )
    if name == "belle_conversations":
        turns = [{"from": "human", "value": "你好"}, {"from": "assistant", "value": "\n你好！"}]
        return write_jsonl(folder / "train_3.5M_CN.json", [{"id": "1", "conversations": turns}])
    if name == "firefly":
        return write_jsonl(
            folder / "firefly-train-1.1M.jsonl", [{"kind": "Couplet", "input": "上联：春", "target": "下联：秋"}]
        )
    if name == "tigerbot_sft":
        return write_jsonl(
            folder / "tigerbot-alpaca-zh-0.5m.json", [{"instruction": "写一句诗", "input": "", "output": "床前明月光"}]
        )
    if name == "rlhf_reward_zh":
        return write_parquet(
            folder / "train-00000-of-00001.parquet", [{"prompt": "问", "chosen": "好答", "rejected": "坏答"}]
        )
    if name == "zhihu_rlhf_3k":
        path = folder / "zhihu_3k_rlfh.tsv"
        header = "prompt\tchosen\trejected\tquestion_id\tupvotes_chosen\tupvotes_rejected\n"
        path.write_text(header + "问\t好答\t坏答\t42\t10\t1\n", encoding="utf-8")
        return path
    if name == "cvalues":
        row = {"prompt": "问", "pos_resp": "好答", "neg_resp": "坏答", "pos_type": "拒绝为主", "neg_type": "风险回复"}
        return write_jsonl(folder / "train.jsonl", [row])
    if name == "preference_qa":
        return write_jsonl(
            folder / "train.jsonl", [{"question": "问", "response_chosen": "好答", "response_rejected": "坏答"}]
        )
    if name == "text":
        path = folder / "corpus.txt"
        path.write_text(f"{WIKI}\n\n{NOVEL}\n", encoding="utf-8")
        return path
    if name == "jsonl":
        return write_jsonl(folder / "docs.jsonl", [{"text": WIKI}])
    raise KeyError(name)


EXPECTED = {
    "wikipedia_cn": [{"text": WIKI}],
    "baidubaike": [{"text": "数学\n一门学科\n历史\n源远流长"}, {"text": "物理\n定义\n研究物质"}],
    "zhihu_kol": [{"text": "如何学习数学？\n多做题。"}],
    "tigerbot_pretrain": [{"text": "长城\n长城是古代的军事防御工程。"}],
    "webnovel": [{"text": NOVEL}],
    "belle": [
        {"messages": [{"role": "user", "content": "翻译成英文\n你好"}, {"role": "assistant", "content": "Hello"}]}
    ],
    "belle_conversations": [  # the reply's opening newline stripped (data/sources.py)
        {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}
    ],
    "firefly": [{"messages": [{"role": "user", "content": "上联：春"}, {"role": "assistant", "content": "下联：秋"}]}],
    "tigerbot_sft": [
        {"messages": [{"role": "user", "content": "写一句诗"}, {"role": "assistant", "content": "床前明月光"}]}
    ],
    "rlhf_reward_zh": [{"prompt": "问", "chosen": "好答", "rejected": "坏答"}],
    "zhihu_rlhf_3k": [{"prompt": "问", "chosen": "好答", "rejected": "坏答"}],
    "cvalues": [{"prompt": "问", "chosen": "好答", "rejected": "坏答"}],
    "preference_qa": [{"prompt": "问", "chosen": "好答", "rejected": "坏答"}],
    "text": [{"text": WIKI}, {"text": NOVEL}],
    "jsonl": [{"text": WIKI}],
}


def test_every_registered_source_has_a_fixture_and_a_cli_name(capsys):
    assert set(EXPECTED) | {"demo"} == set(SOURCES)
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    assert ", ".join(SOURCES) in " ".join(capsys.readouterr().out.split())  # the help lists the registry


def test_demo_source_and_a_named_jsonl_field(tmp_path):
    demo = list(read_records(get_source("demo"), [], BadRecords(strict=True)))
    assert len(demo) > 50_000 and all(record["text"] for record in demo[:100])
    path = write_jsonl(tmp_path / "docs.jsonl", [{"content": WIKI}])
    assert list(read_records(get_source("jsonl"), [path], BadRecords(strict=True), text_field="content")) == [
        {"text": WIKI}
    ]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_adapter_reads_the_published_shape(name, tmp_path):
    bad = BadRecords(strict=True)
    assert list(read_records(get_source(name), [fixture_file(name, tmp_path)], bad)) == EXPECTED[name]


def test_bad_input_is_skipped_counted_and_located(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        b'{"text": "good one"}\n'
        b'{"text": "broken\n'  # malformed JSON, line 2
        b'{"title": "no text field"}\n'  # missing field, line 3
        b'{"text": "bad byte \xff here"}\n'  # not UTF-8, line 4
        b'{"text": "good two"}\n'
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    bad = BadRecords()
    records = list(read_records(get_source("jsonl"), [path, empty], bad))
    assert records == [{"text": "good one"}, {"text": "good two"}]
    assert bad.counts == {"malformed JSON": 1, "missing field text": 1, "not UTF-8": 1, "empty file": 1}
    assert bad.examples[0].startswith(f"{path}:2: malformed JSON")
    assert bad.examples[1].startswith(f"{path}:3: missing field text; jsonl expects {{text}}")
    assert bad.examples[2] == f"{path}:4: not UTF-8: byte 0xff at column 20"
    assert bad.examples[3] == f"{empty}: empty file"


def test_strict_mode_stops_at_the_first_bad_record(tmp_path):
    path = write_jsonl(tmp_path / "belle.json", [{"instruction": "问"}])  # no output field
    with pytest.raises(BadInputError, match=r"belle.json:1: missing field output; belle expects"):
        list(read_records(get_source("belle"), [path], BadRecords(strict=True)))


def test_cleaning_counts_each_filter():
    base = "人工智能的研究历史有着一条从以推理为重点到以知识为重点再到以学习为重点的自然清晰的脉络。" * 3
    documents = [
        base,
        base,  # exact duplicate
        base[:-3] + "有改动。",  # near duplicate
        "太短了",  # too short
        "This document is written almost entirely in English, 只有几个汉字.",  # low Chinese ratio
        "第一章\n"
        + "请收藏本站：www.example.com\n"
        + "少年推开了那扇尘封已久的木门，屋里弥漫着旧书的气味。",  # ad line
        "哈" * 30 + "这是一段很长的重复字符测试文本内容。",  # repeated characters
        "重复的一行文字在这里出现\n" * 5 + "最后一行",  # repeated lines
        "<p>网页残留的标签&amp;实体应当被清理掉，留下干净的中文正文内容。</p>",  # html remnants
    ]
    cleaner = Cleaner(CleaningOptions(min_chars=20))
    kept = list(cleaner.clean_all(documents))
    removed = {step: entry.documents for step, entry in cleaner.report.removed.items() if entry.documents}
    assert removed == {
        "exact duplicate": 1,
        "near duplicate": 1,
        "too short": 1,
        "low chinese ratio": 1,
        "repeated characters": 1,
        "repeated lines": 1,
    }
    assert cleaner.report.removed["ads"].characters == len("请收藏本站：www.example.com\n")
    assert cleaner.report.ad_removals == {"remember the site": 1}
    assert "网页残留的标签&实体应当被清理掉" in kept[-1] and "<p>" not in kept[-1]
    assert cleaner.report.documents_out == len(kept) == 3


@pytest.fixture(scope="module")
def corpus_file(demo_corpus) -> Path:
    return demo_corpus / "train.jsonl"


def run_prepare(corpus_file, small_tokenizer, output: Path, workers: int) -> dict:
    options = PrepareOptions(
        output_dir=str(output),
        sources=[("jsonl", [str(corpus_file)])],
        tokenizer=str(small_tokenizer),
        workers=workers,
        docs_per_shard=6000,
        batch_size=256,
        cleaning=CleaningOptions(near_dedup=False),
    )
    return json.loads(json.dumps(prepare(options).__dict__))


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}


def test_prepare_is_byte_identical_for_any_worker_count_and_resumes(corpus_file, small_tokenizer, tmp_path):
    one = run_prepare(corpus_file, small_tokenizer, tmp_path / "w1", workers=1)
    two = run_prepare(corpus_file, small_tokenizer, tmp_path / "w2", workers=2)
    assert one["tokens"] == two["tokens"] and one["shards"]["train"] >= 5
    reference = shard_bytes(tmp_path / "w1")
    assert shard_bytes(tmp_path / "w2") == reference
    assert not list((tmp_path / "w2").glob("*.tmp"))

    # A crash leaves: one shard missing, one corrupted after the fact, one half-written temporary file.
    folder = tmp_path / "w2"
    (folder / "train-00001.bin").unlink()
    corrupted = folder / "train-00002.bin"
    data = bytearray(corrupted.read_bytes())
    data[10] ^= 0xFF
    corrupted.write_bytes(bytes(data))
    (folder / "train-00003.bin.tmp").write_bytes(b"half")
    (folder / "train-00004.bin.json.tmp").write_text('{"dtype": ')  # a manifest cut short before its rename
    untouched = folder / "train-00000.bin"
    before = untouched.stat().st_mtime_ns
    again = run_prepare(corpus_file, small_tokenizer, folder, workers=2)
    assert untouched.stat().st_mtime_ns == before  # verified and kept, not rewritten
    assert shard_bytes(folder) == reference and again["tokens"] == one["tokens"]
    assert not list(folder.glob("*.tmp"))

    dataset = PretrainDataset(folder / "train-*.bin", seq_len=64)
    tokens = np.concatenate([np.asarray(read_tokens(p)) for p in sorted(folder.glob("train-*.bin"))])
    assert len(dataset) == sum((len(read_tokens(p)) - 1) // 63 for p in sorted(folder.glob("train-*.bin")))
    assert dataset[0]["input_ids"].tolist() == tokens[:64].tolist()


def test_mixing_weights_are_followed_and_reproducible(small_tokenizer, tmp_path):
    from tiny_llama2_zh.data.pretokenized import write_token_file
    from tiny_llama2_zh.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(small_tokenizer)
    write_token_file(["甲" * 50] * 40, tokenizer, tmp_path / "a.bin")
    write_token_file(["乙" * 50] * 40, tokenizer, tmp_path / "b.bin")
    a, b = PretrainDataset(tmp_path / "a.bin", 16), PretrainDataset(tmp_path / "b.bin", 16)
    mixed = MixedPretrainDataset([a, b], [0.8, 0.2], seed=3, length=2000)
    a_token = a[0]["input_ids"][1]  # a token of "甲" (position 0 is the bos every document starts with)
    from_a = sum(bool((mixed[i]["input_ids"] == a_token).any()) for i in range(0, 2000, 10))
    assert 140 <= from_a <= 180  # about 80% of 200 draws
    again = MixedPretrainDataset([a, b], [0.8, 0.2], seed=3, length=2000)
    assert all(mixed[i]["input_ids"].tolist() == again[i]["input_ids"].tolist() for i in range(0, 2000, 97))


def test_sft_and_preference_sources_are_normalised_and_deduplicated(tmp_path):
    belle = write_jsonl(
        tmp_path / "belle.json", [{"instruction": f"问题{i % 3}", "input": "", "output": "答"} for i in range(6)]
    )
    result = prepare(PrepareOptions(output_dir=str(tmp_path / "sft"), sources=[("belle", [str(belle)])]))
    assert result.kind == "sft" and sum(result.documents.values()) == 3
    assert result.cleaning == {"exact_duplicates_removed": 3}
    lines = (tmp_path / "sft" / "sft-train.jsonl").read_text(encoding="utf-8").splitlines()
    lines += (tmp_path / "sft" / "sft-test.jsonl").read_text(encoding="utf-8").splitlines()
    assert all(json.loads(line)["messages"][1] == {"role": "assistant", "content": "答"} for line in lines)
    with pytest.raises(ValueError, match="mix"):
        prepare(
            PrepareOptions(output_dir=str(tmp_path / "x"), sources=[("belle", [str(belle)]), ("text", [str(belle)])])
        )


def test_demo_tasks_have_checkable_answers_and_disjoint_splits(tmp_path):
    from pypinyin import Style, pinyin

    counts = build_tasks(tmp_path, names=list(TASKS))
    assert set(counts) == set(TASKS) and all(c["train"] > 1000 and c["test"] > 100 for c in counts.values())
    for task in ("sentiment", "segmentation", "pinyin"):
        train = [json.loads(line) for line in (tmp_path / task / "preference-train.jsonl").open(encoding="utf-8")]
        test = [json.loads(line) for line in (tmp_path / task / "preference-test.jsonl").open(encoding="utf-8")]
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
        assert all(r["chosen"] != r["rejected"] for r in train + test)
        sample = test[:50]
        if task == "sentiment":
            assert {r["chosen"] for r in test} == {"正面", "负面"}
        if task == "segmentation":
            assert all(r["chosen"].replace(" ", "") == r["prompt"].split("句子：")[1] for r in sample)
        if task == "pinyin":
            for r in sample:
                word = r["prompt"].split("词语：")[1]
                assert r["chosen"] == " ".join(s[0] for s in pinyin(word, style=Style.TONE))
        sft = [json.loads(line) for line in (tmp_path / task / "sft-test.jsonl").open(encoding="utf-8")]
        if task == "sentiment":  # label-balanced pairs: a subset of the SFT rows (tests/test_tasks.py)
            sft = [m for m in sft if m["messages"][0]["content"] in {r["prompt"] for r in test}]
        assert [m["messages"][1]["content"] for m in sft] == [r["chosen"] for r in test]
    assert os.path.getsize(tmp_path / "stats.json") > 0


def test_sentencepiece_fast_path_gives_the_fast_tokenizers_ids(
    chatglm3_model_file, demo_corpus, small_tokenizer, tmp_path
):
    from tiny_llama2_zh.data.prepare import sentencepiece_processor
    from tiny_llama2_zh.data.pretokenized import write_token_file
    from tiny_llama2_zh.tokenizer import convert_chatglm3, load_tokenizer

    folder = tmp_path / "chatglm3"
    tokenizer = convert_chatglm3(chatglm3_model_file, folder)
    assert sentencepiece_processor(folder, tokenizer) is not None
    lines = (demo_corpus / "validation.jsonl").read_text(encoding="utf-8").splitlines()
    corpus = tmp_path / "cleaned.jsonl"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    options = PrepareOptions(
        output_dir=str(tmp_path / "out"), sources=[("jsonl", [str(corpus)])], tokenizer=str(folder)
    )
    from tiny_llama2_zh.data.prepare import tokenize_to_shards

    tokenize_to_shards(options, corpus, tmp_path / "out", "train", tokenizer)
    texts = [json.loads(line)["text"] for line in lines]
    write_token_file(texts, tokenizer, tmp_path / "reference.bin")  # the transformers fast tokenizer's ids
    assert (tmp_path / "out" / "train-00000.bin").read_bytes() == (tmp_path / "reference.bin").read_bytes()

    # a folder whose SentencePiece model does not match its tokenizer.json is not trusted
    mismatched = tmp_path / "mismatched"
    import shutil

    shutil.copytree(small_tokenizer, mismatched)
    shutil.copyfile(chatglm3_model_file, mismatched / "tokenizer.model")
    assert sentencepiece_processor(mismatched, load_tokenizer(mismatched)) is None


# Texts where a tokenizer pipeline could go wrong: empty and whitespace-only documents (kept: the JSONL line is not
# blank), whitespace SentencePiece collapses or keeps, specials written as plain text, rare characters, and one
# document far longer than a batch's others. Special-token strings are SentencePiece's literal pieces in its path
# (it never matches control symbols in text), so they are compared with SentencePiece's own encode only.
PIPELINE_EDGE_TEXTS = [
    "",
    " ",
    "   \t  ",
    "\n\n",
    " leading and trailing spaces  ",
    "Hello  world\n\t x 😀",
    "𠀀𪚥 rare characters，ＡＢＣ１２３ full-width",
    "line one\r\nline two\u2028line three\u3000end",
]
SPECIAL_TOKEN_TEXTS = ["<s>a</s>", "<|user|>你好<|assistant|>", "[gMASK]sop 开始", "a<unk>b<pad>"]


def test_sentencepiece_shards_hold_sentencepieces_own_ids_for_every_document(
    chatglm3_model_file, demo_corpus, tmp_path
):
    """The SentencePiece path of `tokenize_to_shards` (batches, threads, shards) writes exactly
    bos + SentencePiece's own `encode(text)` + eos for every document, in order, byte-identical for any number of
    workers; for text without special-token strings these are also the fast tokenizer's ids."""
    import sentencepiece as spm

    from tiny_llama2_zh.data.prepare import tokenize_to_shards
    from tiny_llama2_zh.tokenizer import convert_chatglm3

    folder = tmp_path / "chatglm3"
    tokenizer = convert_chatglm3(chatglm3_model_file, folder)
    processor = spm.SentencePieceProcessor(model_file=str(chatglm3_model_file))
    with (demo_corpus / "train.jsonl").open(encoding="utf-8") as lines:
        corpus = [json.loads(line)["text"] for _, line in zip(range(1500), lines)]
    very_long = "\n".join(corpus[:400])  # ~100 k characters in one document
    texts = corpus[:300] + PIPELINE_EDGE_TEXTS + [very_long] + SPECIAL_TOKEN_TEXTS + corpus[300:]
    cleaned = tmp_path / "cleaned.jsonl"
    jsonl = [json.dumps({"text": text}, ensure_ascii=False) for text in texts]
    # blank JSONL lines are not documents; they are skipped, as before
    cleaned.write_text("\n".join(jsonl[:10]) + "\n\n  \n" + "\n".join(jsonl[10:]) + "\n", encoding="utf-8")

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    expected = [token for text in texts for token in [bos, *processor.encode(text), eos]]
    plain = [text for text in texts if text not in SPECIAL_TOKEN_TEXTS]
    assert [processor.encode(text) for text in plain] == [tokenizer.encode(t, add_special_tokens=False) for t in plain]

    shards = {}
    for workers, batch_size in [(1, 64), (2, 7), (2, 4096)]:
        output = tmp_path / f"out-{workers}-{batch_size}"
        options = PrepareOptions(
            output_dir=str(output),
            sources=[("jsonl", [str(cleaned)])],
            tokenizer=str(folder),
            workers=workers,
            batch_size=batch_size,
            docs_per_shard=500,
        )
        documents, tokens, count = tokenize_to_shards(options, cleaned, output, "train", tokenizer)
        assert (documents, tokens, count) == (len(texts), len(expected), 4)
        shards[workers, batch_size] = [p.read_bytes() for p in sorted(output.glob("train-*.bin"))]
        written = np.concatenate([np.asarray(read_tokens(p)) for p in sorted(output.glob("train-*.bin"))])
        assert written.dtype == np.uint16 and written.tolist() == expected
    assert shards[1, 64] == shards[2, 7] == shards[2, 4096]
