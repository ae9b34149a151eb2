"""Reading corpus files: damaged input becomes counted, located bad records (file, line/record/row, reason),
never a traceback and never a silently empty source; quoted TSV; baike without sections; empty SFT and
preference records."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tiny_llama2_zh.data.sources import BadInputError, BadRecords, get_source, read_records


def read(name: str, path: Path, bad: BadRecords | None = None) -> list[dict]:
    return list(read_records(get_source(name), [path], bad if bad is not None else BadRecords()))


def corrupt_parquet(path: Path, rows: list[dict], row_group: int) -> Path:
    """A snappy parquet of 10-row groups whose data page in `row_group` is damaged so that pyarrow's
    `iter_batches` raises `OSError: Corrupt snappy compressed data` (the bytes flipped are found by trying:
    where snappy notices depends on the compressed stream)."""
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10, compression="snappy", use_dictionary=False)
    original = path.read_bytes()
    chunk = pq.ParquetFile(path).metadata.row_group(row_group).column(1)
    for start in range(chunk.data_page_offset + chunk.total_compressed_size - 8, chunk.data_page_offset, -3):
        data = bytearray(original)
        for k in range(start, start + 4):
            data[k] ^= 0xFF
        path.write_bytes(bytes(data))
        try:
            list(pq.ParquetFile(path).iter_batches(row_groups=[row_group]))
        except OSError as error:
            if "snappy" in str(error).lower():
                return path
    raise AssertionError("no byte flip in the data page made snappy fail")


def test_a_corrupt_parquet_page_is_a_located_bad_record_and_the_other_row_groups_are_kept(tmp_path):
    rows = [{"INSTRUCTION": f"问题{i}：如何学习？", "RESPONSE": f"回答{i}：" + "多做题。" * 40} for i in range(30)]
    path = corrupt_parquet(tmp_path / "train-00000-of-00005.parquet", rows, row_group=1)
    bad = BadRecords()
    records = read("zhihu_kol", path, bad)
    assert [r["text"].split("：")[0] for r in records] == [f"问题{i}" for i in [*range(10), *range(20, 30)]]
    assert bad.counts == {"unreadable parquet data": 1}
    assert bad.examples[0].startswith(f"{path}: row 11: unreadable parquet data (Corrupt snappy compressed data")
    assert "rows 11-20 of row group 1 are lost" in bad.examples[0]
    with pytest.raises(BadInputError, match=r"row 11: unreadable parquet data"):
        read("zhihu_kol", path, BadRecords(strict=True))


def test_an_unreadable_parquet_file_is_one_error_naming_it(tmp_path):
    path = tmp_path / "train-00001-of-00005.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file at all")
    bad = BadRecords()
    with pytest.raises(BadInputError, match=rf"{path}: nothing could be read .*unreadable parquet file"):
        read("zhihu_kol", path, bad)
    assert bad.counts == {"unreadable parquet file": 1}


def test_a_non_string_field_is_a_bad_record(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": 12345}\n{"text": "好的文本"}\n{"text": ["列表"]}\n', encoding="utf-8")
    bad = BadRecords()
    assert read("jsonl", path, bad) == [{"text": "好的文本"}]
    assert bad.counts == {"unexpected value": 2}
    assert bad.examples[0].startswith(f"{path}:1: unexpected value: field text is int, not a string")
    sft = tmp_path / "firefly.jsonl"
    sft.write_text('{"input": "问", "target": 42}\n{"input": "问", "target": "答"}\n', encoding="utf-8")
    bad = BadRecords()
    assert len(read("firefly", sft, bad)) == 1
    assert bad.examples[0].startswith(f"{sft}:1: unexpected value: field messages[1].content is int")


def test_an_invalid_unicode_escape_is_a_bad_record(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "半个表情\\ud83d"}\n{"text": "好的"}\n', encoding="utf-8")
    bad = BadRecords()
    assert read("jsonl", path, bad) == [{"text": "好的"}]
    assert "lone surrogate" in bad.examples[0]


def test_baike_with_null_sections_keeps_title_and_summary(tmp_path):
    path = tmp_path / "563w_baidubaike.json"
    rows = [
        {"title": "数学", "summary": "一门学科", "sections": None},
        {"title": "物理", "summary": "研究物质", "sections": [{"title": "定义", "content": "研究物质运动"}]},
        {"title": "化学"},
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert read("baidubaike", path, BadRecords(strict=True)) == [
        {"text": "数学\n一门学科"},
        {"text": "物理\n研究物质\n定义\n研究物质运动"},
        {"text": "化学"},
    ]


def test_a_json_array_names_the_record_of_a_missing_field(tmp_path):
    path = tmp_path / "wikipedia-cn-20230720-filtered.json"
    rows = [{"completion": "甲", "source": "s"}, {"source": "s"}, {"completion": "丙", "source": "s"}]
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=4), encoding="utf-8")
    bad = BadRecords()
    assert read("wikipedia_cn", path, bad) == [{"text": "甲"}, {"text": "丙"}]
    assert bad.examples == [
        f"{path}: record 2 (line 6): missing field completion; wikipedia_cn expects {{completion}} "
        "(pleisto/wikipedia-cn-20230720-filtered: one JSON array of {completion, source})"
    ]


def test_a_non_utf8_byte_in_a_json_array_costs_one_record_not_the_file(tmp_path):
    path = tmp_path / "wikipedia-cn-20230720-filtered.json"
    data = (
        '[\n  {"completion": "第一条", "source": "s"},\n  {"completion": "坏'.encode()
        + b"\xff"
        + '字节", "source": "s"},\n  {"completion": "第三条", "source": "s"}\n]\n'.encode()
    )
    path.write_bytes(data)
    bad = BadRecords()
    assert read("wikipedia_cn", path, bad) == [{"text": "第一条"}, {"text": "第三条"}]
    offset = data.index(b"\xff")
    assert bad.examples == [f"{path}: record 2 (line 3): not UTF-8: byte 0xff at byte offset {offset}"]


def test_a_truncated_json_array_keeps_the_records_before_the_damage(tmp_path):
    path = tmp_path / "wiki.json"
    path.write_text('[{"completion": "第一条"}, {"completion": "第二条"}, {"completion": "第三', encoding="utf-8")
    bad = BadRecords()
    assert read("wikipedia_cn", path, bad) == [{"text": "第一条"}, {"text": "第二条"}]
    assert bad.examples[0].startswith(f"{path}: record 3 (line 1): malformed JSON array: Unterminated string")


def test_a_non_empty_file_that_yields_nothing_is_an_error_naming_it(tmp_path):
    path = tmp_path / "wiki.json"
    path.write_text(json.dumps([{"text": "字段名不对"}] * 3, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(BadInputError, match=rf"{path}: nothing could be read .*record 1 \(line 1\): missing field"):
        read("wikipedia_cn", path)
    everything_bad = tmp_path / "latin1.json"
    everything_bad.write_bytes(b'[{"completion": "caf\xe9"}]')
    expected = r"first problem: record 1 \(line 1\): not UTF-8: byte 0xe9 at byte offset 20\)"
    with pytest.raises(BadInputError, match=expected):
        read("wikipedia_cn", everything_bad)


def test_tsv_is_read_with_quoting_rules(tmp_path):
    path = tmp_path / "zhihu_3k_rlfh.tsv"
    path.write_text(
        "prompt\tchosen\trejected\tquestion_id\tupvotes_chosen\tupvotes_rejected\n"
        '"怎么看""内卷""？"\t"第一段。\n第二段，含\t制表符。"\t坏答\t1\t10\t1\n'
        "普通问题\t好答\t坏答\t2\t5\t0\n"
        "少一列\t好答\t3\t5\t0\n",
        encoding="utf-8",
    )
    bad = BadRecords()
    assert read("zhihu_rlhf_3k", path, bad) == [
        {"prompt": '怎么看"内卷"？', "chosen": "第一段。\n第二段，含\t制表符。", "rejected": "坏答"},
        {"prompt": "普通问题", "chosen": "好答", "rejected": "坏答"},
    ]
    assert bad.examples == [f"{path}:5: malformed TSV: 5 columns, the header has 6"]  # line 5: row 2 spans 2-3


def test_empty_sft_and_preference_records_are_dropped_and_counted(tmp_path):
    belle = tmp_path / "belle.json"
    rows = [
        {"instruction": "翻译", "input": "你好", "output": "Hello"},
        {"instruction": "翻译", "input": "", "output": "  \n"},
        {"instruction": " ", "input": "", "output": "答"},
    ]
    belle.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    bad = BadRecords(strict=True)  # well-formed but empty: skipped, counted, not a reason to stop
    assert len(read("belle", belle, bad)) == 1
    assert bad.counts == {"empty reply": 1, "empty prompt": 1}
    assert bad.examples[0] == f"{belle}:2: empty reply"

    cvalues = tmp_path / "train.jsonl"
    rows = [
        {"prompt": "问", "pos_resp": "好答", "neg_resp": "坏答"},
        {"prompt": "问", "pos_resp": "", "neg_resp": "坏答"},
        {"prompt": "问", "pos_resp": "好答", "neg_resp": "\t"},
        {"prompt": "  ", "pos_resp": "好答", "neg_resp": "坏答"},
        {"prompt": "问", "pos_resp": "同一个答案", "neg_resp": "同一个答案 "},
    ]
    cvalues.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    bad = BadRecords()
    assert read("cvalues", cvalues, bad) == [{"prompt": "问", "chosen": "好答", "rejected": "坏答"}]
    assert bad.counts == {"empty chosen": 1, "empty rejected": 1, "empty prompt": 1, "chosen equals rejected": 1}


# ------------------------------------------------------------------------------------ real shapes (issue 21)
def test_belle_3_5m_conversations_become_chat_messages(tmp_path):
    path = tmp_path / "train_3.5M_CN.json"
    rows = [
        {
            "id": "1",
            "conversations": [
                {"from": "human", "value": "你好"},
                {"from": "assistant", "value": "你好！有什么可以帮你？"},
                {"from": "human", "value": "讲个笑话"},
                {"from": "assistant", "value": "从前有座山。"},
            ],
        },
        {"id": "2", "conversations": [{"from": "gpt", "value": "未知角色"}]},
        {"id": "3", "conversations": "不是列表"},
        {"id": "4"},
    ]
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n", encoding="utf-8")
    bad = BadRecords()
    records = read("belle_conversations", path, bad)
    assert records == [
        {
            "messages": [
                {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好！有什么可以帮你？"},
                {"role": "user", "content": "讲个笑话"},
                {"role": "assistant", "content": "从前有座山。"},
            ]
        }
    ]
    assert bad.counts == {"unexpected value": 2, "missing field conversations": 1}
    assert "speaker 'gpt' is neither human nor assistant" in bad.examples[0]


def test_question_response_preference_pairs(tmp_path):
    path = tmp_path / "reward.jsonl"
    rows = [
        {"question": "如何学习？", "response_chosen": "多读书，多练习。", "response_rejected": "不用学。"},
        {"question": "如何学习？", "response_chosen": "一样", "response_rejected": "一样"},
        {"question": "缺字段", "response_chosen": "好"},
    ]
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n", encoding="utf-8")
    bad = BadRecords()
    expected = {"prompt": "如何学习？", "chosen": "多读书，多练习。", "rejected": "不用学。"}
    assert read("preference_qa", path, bad) == [expected]
    assert bad.counts == {"chosen equals rejected": 1, "missing field response_rejected": 1}


def test_wikipedia_cn_as_json_lines_reads_like_the_json_array(tmp_path):
    rows = [{"completion": f"条目{i}：中文维基百科的一篇文章。", "source": "wikipedia.zh2307"} for i in range(3)]
    lines = tmp_path / "wikipedia-cn.jsonl"
    lines.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n", encoding="utf-8")
    array = tmp_path / "wikipedia-cn-20230720-filtered.json"
    array.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    assert read("wikipedia_cn", lines) == read("wikipedia_cn", array) == [{"text": row["completion"]} for row in rows]


def test_replies_opening_with_whitespace_are_stripped_counted_and_reported(tmp_path, capsys):
    """Belle's school_math answers open with newlines: prepared, the reply starts with its first word, and the
    summary says how many were stripped."""
    from tiny_llama2_zh.cli import main

    school_math = tmp_path / "school_math_0.25M.json"
    rows = [
        {"instruction": f"小明有{i}个苹果，又买了3个，现在有几个？", "input": "", "output": f"\n\n 解：{i}+3={i + 3}。"}
        for i in range(6)
    ] + [{"instruction": "1+1等于几？", "input": "", "output": "2"}]
    school_math.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    assert main(["data", "prepare", "--output", str(tmp_path / "sft"), "--source", "belle", str(school_math)]) == 0
    assert "reply stripped of leading whitespace: 6 records (kept)" in capsys.readouterr().out
    replies = [
        json.loads(line)["messages"][-1]["content"]
        for split in ("train", "test")
        for line in (tmp_path / "sft" / f"sft-{split}.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert sorted(replies) == sorted([f"解：{i}+3={i + 3}。" for i in range(6)] + ["2"])
    report = json.loads((tmp_path / "sft" / "prepare_report.json").read_text(encoding="utf-8"))
    assert report["repaired"] == {"reply stripped of leading whitespace": 6}
    pairs = tmp_path / "pairs.jsonl"
    pair = {"prompt": "问", "chosen": "\n好的回答", "rejected": " 坏的回答"}
    pairs.write_text(json.dumps(pair, ensure_ascii=False) + "\n", encoding="utf-8")
    bad = BadRecords()
    assert read("rlhf_reward_zh", pairs, bad) == [{"prompt": "问", "chosen": "好的回答", "rejected": "坏的回答"}]
    assert bad.repaired == {"reply stripped of leading whitespace": 1} and bad.total == 0
