"""`tinyllm eval tasks`: the scorers on handcrafted replies, reading task files, the whole command on a tiny
random model, the bag-of-words baseline on the real sentiment split, and pass@k on a model whose replies are known."""

import argparse
import itertools
import json
import math
import unicodedata
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from bigram_model import BigramModel
from conftest import save_tiny_model
from tiny_llama2_zh.data.hashing import is_validation
from tiny_llama2_zh.data.tasks import TASKS
from tiny_llama2_zh.data.tasks.pinyin import PINYIN_PROMPT, SyllableCounts, pinyin_counts, pinyin_metrics
from tiny_llama2_zh.data.tasks.segmentation import (
    SEGMENTATION_PROMPT,
    segmentation_counts,
    segmentation_f1,
    segmentation_metrics,
)
from tiny_llama2_zh.data.tasks.sentiment import SENTIMENT_PROMPT, sentiment_exact, sentiment_label, sentiment_metrics
from tiny_llama2_zh.eval import tasks as eval_tasks
from tiny_llama2_zh.eval.tasks import (
    add_arguments,
    evaluate_tasks,
    item_text,
    label_set,
    limit_rows,
    markdown_table,
    pass_at_k,
    read_task_file,
    run,
    sampled_replies,
)
from tiny_llama2_zh.loading import load_model


# ------------------------------------------------------------------------------------------------ scorers
@pytest.mark.parametrize(
    ("reply", "label", "exact"),
    [
        ("正面", "正面", True),
        ("  “正面”。\n", "正面", True),  # punctuation and whitespace around the label
        ("正 面", "正面", False),  # whitespace inside is removed for the label, not for exact match
        ("正面，这条评论很满意", "正面", False),  # extra text after the label
        ("情感：负面", "负面", False),  # text before the label
        ("负面，不是正面", "负面", False),  # both named: the first counts
        ("这条评论很好", None, False),  # no label at all
        ("", None, False),
        ("ＰＯＳ正面", "正面", False),
    ],
)
def test_sentiment_label_and_exact(reply, label, exact):
    assert sentiment_label(reply) == label
    assert sentiment_exact("正面" if label is None else label, reply) is exact


def test_sentiment_metrics_counts_wrong_and_missing_labels():
    metrics = sentiment_metrics(["正面", "负面", "负面", "正面"], ["正面", "正面", "负面。", "不知道"])
    assert metrics == {"accuracy": 0.5, "exact": 0.5, "says_positive": 0.5, "no_label": 1}


def test_segmentation_right_reply_scores_one():
    counts = segmentation_counts("在 这 辞旧迎新 的", "在  这\t辞旧迎新 的\n")  # any whitespace separates words
    assert (counts.correct, counts.predicted, counts.gold, counts.exact, counts.same_characters) == (
        4,
        4,
        4,
        True,
        True,
    )
    assert segmentation_f1("在 这 辞旧迎新 的", "在 这 辞旧迎新 的") == 1.0


def test_segmentation_wrong_boundaries_score_by_span():
    # "在这" merges two reference words: its span [0, 2) matches none; 辞旧迎新 [2, 6) and 的 [6, 7) still match
    counts = segmentation_counts("在 这 辞旧迎新 的", "在这 辞旧迎新 的")
    assert (counts.correct, counts.predicted, counts.gold, counts.exact) == (2, 3, 4, False)
    assert segmentation_f1("在 这 辞旧迎新 的", "在这 辞旧迎新 的") == pytest.approx(
        2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2)
    )
    # every character its own word: only the single-character reference words are right
    assert segmentation_counts("在 这 辞旧迎新 的", "在 这 辞 旧 迎 新 的").correct == 3


def test_segmentation_changed_characters_earn_nothing_for_the_changed_words():
    changed = segmentation_counts("在 这 辞旧迎新 的", "在 那 辞旧迎新 的")  # same spans, 那 is not 这
    assert (changed.correct, changed.same_characters) == (3, False)
    inserted = segmentation_counts("在 这 辞旧迎新 的", "在 这里 辞旧迎新 的")  # one character more: later spans shift
    assert (inserted.correct, inserted.predicted, inserted.same_characters) == (1, 4, False)
    trailing = segmentation_counts("在 这 辞旧迎新 的", "在 这 辞旧迎新 的 。 好的")  # extra text after the answer
    assert (trailing.correct, trailing.predicted, trailing.exact) == (4, 6, False)


def test_segmentation_empty_reply_and_micro_average():
    empty = segmentation_counts("在 这 辞旧迎新 的", "")
    assert (empty.correct, empty.predicted, empty.gold) == (0, 0, 4)
    assert segmentation_f1("在 这 辞旧迎新 的", "") == 0.0
    # micro-average (SIGHAN): counts are summed over rows before dividing, so a long sentence weighs more
    metrics = segmentation_metrics(["在 这 辞旧迎新 的", "我 祝 大家"], ["在 这 辞旧迎新 的", ""])
    assert metrics["precision"] == 1.0
    assert metrics["recall"] == pytest.approx(4 / 7)
    assert metrics["f1"] == pytest.approx(2 * (4 / 7) / (1 + 4 / 7))
    assert metrics["exact"] == 0.5
    assert metrics["changed_characters"] == 1


@pytest.mark.parametrize(
    ("reply", "matched", "total", "exact"),
    [
        ("dì qū", 2, 2, True),
        ("  dì   qū ", 2, 2, True),
        (unicodedata.normalize("NFD", "dì qū"), 2, 2, True),  # combining tone marks are the same syllables
        ("dì qu", 1, 2, False),  # wrong tone
        ("qū dì", 0, 2, False),  # right syllables, wrong order: position-wise
        ("dì", 1, 2, False),  # too few syllables
        ("dì qū qū", 2, 3, False),  # too many: the denominator is the longer one
        ("dì qū。", 1, 2, False),  # extra text stuck to a syllable
        ("", 0, 2, False),
        ("Dì Qū", 0, 2, False),  # no case folding
    ],
)
def test_pinyin_counts(reply, matched, total, exact):
    assert pinyin_counts("dì qū", reply) == SyllableCounts(matched, total, exact)


def test_pinyin_metrics_sum_over_rows():
    metrics = pinyin_metrics(["dì qū", "fú wù", "zhōng huá rén mín"], ["dì qū", "fú", "zhōng huá rén mín gòng"])
    assert metrics["exact"] == pytest.approx(1 / 3)
    assert metrics["syllable_accuracy"] == pytest.approx((2 + 1 + 4) / (2 + 2 + 5))
    assert metrics["wrong_length"] == 2


def test_references_score_perfectly():
    """The scoring is honest at the top: the references themselves get every metric at 1."""
    assert sentiment_metrics(["正面", "负面"], ["正面", "负面"])["accuracy"] == 1.0
    seg = ["在 这 辞旧迎新 的 美好 时刻", "要 尊重 群众 的 意愿"]
    assert segmentation_metrics(seg, seg)["f1"] == segmentation_metrics(seg, seg)["exact"] == 1.0
    pinyin = ["dì qū", "fú wù"]
    assert pinyin_metrics(pinyin, pinyin)["exact"] == pinyin_metrics(pinyin, pinyin)["syllable_accuracy"] == 1.0


@pytest.mark.parametrize("name", list(TASKS))
def test_every_registered_task_is_complete_and_consistent(name):
    """What each entry of the registry must provide, checked on its own generated examples: answers the task can
    check, that score 1 by every metric in the table, by the GRPO checkers and by the format check; wrong answers
    that score below 1; a trivial baseline scored by the same metrics."""
    task = TASKS[name]
    examples = list(itertools.islice(task.examples(), 40))
    assert len(examples) == 40 and all(example.answer != example.wrong_answer for example in examples)
    if task.open_ended:
        # no right answer to score 1: the pairs put the wanted replies first, and the judge's metrics see it
        pairs = task.pairs(list(itertools.islice(task.examples(), 400)))
        chosen = task.metrics([], [pair["chosen"] for pair in pairs])
        rejected = task.metrics([], [pair["rejected"] for pair in pairs])
        # review: 44.5 % of the first 200 positive reviews read as positive, 1.5 % of the negative ones
        assert len(pairs) >= 100 and chosen[task.headline] >= rejected[task.headline] + 0.3
        assert all(task.well_formed("", pair["chosen"]) == 1.0 for pair in pairs)
        return
    answers, wrong = [e.answer for e in examples], [e.wrong_answer for e in examples]
    assert all(task.answer_problem(answer) is None for answer in answers)
    assert task.headline == task.columns[0][0]
    right, worse = task.metrics(answers, answers), task.metrics(answers, wrong)
    assert all(right[metric] == 1.0 for metric, _ in task.columns)
    assert worse[task.headline] < 1.0
    assert all(task.correct(a, a) == 1.0 and task.well_formed(a, a) == 1.0 for a in answers)
    assert all(task.correct(a, w) < 1.0 for a, w in zip(answers, wrong))
    replies, method = task.baseline(answers, answers, [example.prompt for example in examples])
    assert len(replies) == len(answers) and method
    assert 0.0 <= task.metrics(answers, replies)[task.headline] <= 1.0


# -------------------------------------------------------------------------------------------- task files
SENTIMENT_TEST = [
    ("这本书真的很值得推荐", "正面"),
    ("物流很快，包装完好", "正面"),
    ("质量太差了，不推荐", "负面"),
    ("用了两天就坏了", "负面"),
    ("客服态度很差", "负面"),
    ("完全不值这个价", "负面"),
]
SENTIMENT_TRAIN = [("非常满意", "正面"), ("太失望了", "负面"), ("一般般，不会再买", "负面"), ("很差劲", "负面")]
SEGMENTATION_TEST = ["在 这 辞旧迎新 的 美好 时刻", "要 尊重 群众 的 意愿", "我 祝 大家 新年 快乐", "关心 群众 生活"]
PINYIN_TEST = [("地区", "dì qū"), ("服务", "fú wù"), ("中国", "zhōng guó"), ("人民", "rén mín")]
PINYIN_TRAIN = [("发展", "fā zhǎn"), ("国家", "guó jiā"), ("中心", "zhōng xīn"), ("中央", "zhōng yāng")]


def _conversation(prompt: str, answer: str) -> str:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return json.dumps({"messages": messages}, ensure_ascii=False)


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_task_data(folder: Path) -> Path:
    """A few rows per task in `build_tasks`'s format (building the real tasks takes ~20 s)."""
    _write(
        folder / "sentiment/sft-test.jsonl",
        [_conversation(SENTIMENT_PROMPT.format(review=r), a) for r, a in SENTIMENT_TEST],
    )
    _write(
        folder / "sentiment/sft-train.jsonl",
        [_conversation(SENTIMENT_PROMPT.format(review=r), a) for r, a in SENTIMENT_TRAIN],
    )
    segmentation = [
        _conversation(SEGMENTATION_PROMPT.format(sentence="".join(s.split())), s) for s in SEGMENTATION_TEST
    ]
    _write(folder / "segmentation/sft-test.jsonl", segmentation)
    _write(folder / "pinyin/sft-test.jsonl", [_conversation(PINYIN_PROMPT.format(word=w), p) for w, p in PINYIN_TEST])
    _write(folder / "pinyin/sft-train.jsonl", [_conversation(PINYIN_PROMPT.format(word=w), p) for w, p in PINYIN_TRAIN])
    return folder


def test_read_task_file_counts_and_names_malformed_lines(tmp_path):
    good = _conversation(SENTIMENT_PROMPT.format(review="很好"), "正面")
    lines = [
        good,
        "{not json",
        json.dumps({"text": "no messages"}),
        json.dumps({"messages": [{"role": "user", "content": "只有问题"}]}),
        json.dumps({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "正面"}]}),
        _conversation(SENTIMENT_PROMPT.format(review="还行"), "中性"),  # not a label of the task
        _conversation(SENTIMENT_PROMPT.format(review="还行"), "  "),
        "",  # blank lines are not rows and not problems
        "[1, 2]",
        good,
    ]
    path = tmp_path / "sft-test.jsonl"
    _write(path, lines)
    with path.open("ab") as file:
        file.write(b'{"messages": "\xff\xfe"}\n')  # not UTF-8
    read = read_task_file(path, "sentiment")
    assert [row.line for row in read.rows] == [1, 10]
    assert read.rows[0].prompt == SENTIMENT_PROMPT.format(review="很好") and read.rows[0].reference == "正面"
    assert read.skipped == 8
    assert read.problems[0].startswith(f"{path}:2: malformed line (JSONDecodeError)")
    assert read.problems[3].startswith(f"{path}:5: unknown role 'bot'")
    assert len(read.problems) == eval_tasks.PROBLEMS_KEPT


def test_limit_is_deterministic_nested_and_spread_over_the_file(tmp_path):
    rows = [_conversation(SENTIMENT_PROMPT.format(review=f"评论{i}"), "正面" if i < 50 else "负面") for i in range(100)]
    _write(tmp_path / "sft-test.jsonl", rows)
    read = read_task_file(tmp_path / "sft-test.jsonl", "sentiment")
    ten, twenty = limit_rows(read.rows, 10), limit_rows(read.rows, 20)
    assert [r.line for r in ten] == [r.line for r in limit_rows(read.rows, 10)]  # deterministic
    assert {r.line for r in ten} < {r.line for r in twenty}  # a larger limit keeps the smaller one's rows
    assert [r.line for r in twenty] == sorted(r.line for r in twenty)  # file order kept
    assert {r.reference for r in twenty} == {"正面", "负面"}  # not just the first block of the file
    assert limit_rows(read.rows, 1000) == read.rows


# ------------------------------------------------------------------------------------------------ command
@pytest.fixture(scope="module")
def model_dir(small_tokenizer, tmp_path_factory) -> Path:
    return save_tiny_model(small_tokenizer, tmp_path_factory.mktemp("model"), max_position_embeddings=256)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def _cells(line: str) -> list[str]:
    """A markdown table row's cells, without the padding that aligns the columns."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_command_writes_table_json_and_markdown(model_dir, tmp_path, capsys):
    data = write_task_data(tmp_path / "tasks")
    output = tmp_path / "eval"
    run(_args("--model", str(model_dir), "--baseline-model", str(model_dir), "--data", str(data),
              "--output", str(output), "--limit", "5", "--max-new-tokens", "6"))  # fmt: skip
    printed = capsys.readouterr().out
    table = [_cells(line) for line in printed.splitlines() if line.startswith("|")]
    assert table[0][:6] == ["model", "sentiment acc", "sentiment exact", "seg F1", "seg exact", "pinyin exact"]
    assert [row[0] for row in table[2:]] == [
        "trivial baseline",
        eval_tasks.BAG_OF_WORDS,
        f"{model_dir} (baseline)",
        str(model_dir),
    ]

    result = json.loads((output / "tasks.json").read_text(encoding="utf-8"))
    assert set(result["tasks"]) == {"sentiment", "segmentation", "pinyin"}
    assert result["tasks"]["sentiment"]["rows"] == 5 and result["tasks"]["sentiment"]["available_rows"] == 6
    assert result["tasks"]["segmentation"]["rows"] == 4  # fewer rows than the limit: all of them
    assert [row["kind"] for row in result["rows"]] == ["baseline", "baseline", "baseline-model", "model"]
    assert set(result["rows"][1]["tasks"]) == {"sentiment"}  # the only classification: labels, a train split
    for row in result["rows"][:1] + result["rows"][2:]:
        assert set(row["tasks"]) == {"sentiment", "segmentation", "pinyin"}
        for task, scored in row["tasks"].items():
            assert scored["rows"] == result["tasks"][task]["rows"]
            assert set(scored["metrics"]) >= {column[1] for column in eval_tasks.TABLE_COLUMNS if column[0] == task}
            assert all(0.0 <= v <= 1.0 for k, v in scored["metrics"].items() if isinstance(v, float))
            assert scored["examples"] and set(scored["examples"][0]) == {"prompt", "reference", "reply"}
    model_row = result["rows"][3]["tasks"]["sentiment"]
    assert model_row["max_new_tokens"] == 6 and model_row["prompts_too_long"] == 0
    assert result["sampling"] is None and "pass_at_k" not in model_row  # no --samples: nothing sampled

    # the majority baseline: 负面 (3 of 4 train rows), scored on exactly the evaluated rows
    baseline = result["rows"][0]["tasks"]
    evaluated = [
        row.reference for row in limit_rows(read_task_file(data / "sentiment/sft-test.jsonl", "sentiment").rows, 5)
    ]
    assert baseline["sentiment"]["method"].startswith("majority class 负面")
    assert baseline["sentiment"]["metrics"]["accuracy"] == pytest.approx(evaluated.count("负面") / len(evaluated))
    assert baseline["segmentation"]["examples"][0]["reply"] == "在 这 辞 旧 迎 新 的 美 好 时 刻"
    assert baseline["pinyin"]["examples"][0]["reply"] == "zhōng zhōng"  # the train split's most frequent syllable

    markdown = (output / "tasks.md").read_text(encoding="utf-8")
    assert markdown_table(result) in markdown and "SIGHAN" in markdown and "## Example replies" in markdown
    examples = markdown.split("## Example replies", 1)[1].splitlines()[1:]
    # a random model's replies hold newlines and control bytes: each example must still be a single line
    assert all(line.startswith(("- ", "## ")) or not line for line in examples)
    assert sum(line.startswith("- ") for line in examples) == 2 * 3 * eval_tasks.EXAMPLES_PER_TASK
    assert f"- {eval_tasks.BAG_OF_WORDS}, sentiment: scikit-learn logistic regression on the TF-IDF of the review" in (
        markdown
    )


def test_a_model_that_answers_right_scores_one(model_dir, tmp_path, monkeypatch):
    """The pipeline end to end with an oracle in place of generation: replies must come back to their own rows
    (generation runs sorted by prompt length, in batches) and score 1 everywhere."""
    data = write_task_data(tmp_path / "tasks")
    references = {}
    for task in ("sentiment", "segmentation", "pinyin"):
        for row in read_task_file(data / task / "sft-test.jsonl", task).rows:
            references[row.prompt] = row.reference

    def oracle(model, tokenizer, conversations, max_new_tokens, batch_size=32):
        assert len(conversations) <= 2  # batches of --batch-size
        return [references[conversation[-1]["content"]] for conversation in conversations]

    monkeypatch.setattr("tiny_llama2_zh.infer.generate.greedy_replies", oracle)
    result = evaluate_tasks([model_dir], data, batch_size=2, show_progress=False)
    scored = result["rows"][-1]["tasks"]
    assert scored["sentiment"]["metrics"]["accuracy"] == scored["sentiment"]["metrics"]["exact"] == 1.0
    assert scored["segmentation"]["metrics"]["f1"] == scored["segmentation"]["metrics"]["exact"] == 1.0
    assert scored["pinyin"]["metrics"]["exact"] == scored["pinyin"]["metrics"]["syllable_accuracy"] == 1.0
    assert result["rows"][0]["tasks"]["segmentation"]["metrics"]["f1"] < 1.0  # the per-character baseline is not


def test_prompts_longer_than_the_context_score_zero_without_failing(model_dir, tmp_path):
    data = tmp_path / "tasks"
    long_review = "这本书的内容非常丰富，" * 40
    rows = [_conversation(SENTIMENT_PROMPT.format(review=review), "正面") for review in (long_review, "很好")]
    _write(data / "sentiment/sft-test.jsonl", rows)
    warnings = []
    result = evaluate_tasks([model_dir], data, max_new_tokens=4, show_progress=False, warn=warnings.append)
    scored = result["rows"][1]["tasks"]["sentiment"]
    assert scored["prompts_too_long"] == 1 and scored["examples"][0]["reply"] == ""
    assert "no trivial baseline for sentiment" in warnings[0]  # no train split here
    assert any("do not fit the context" in warning for warning in warnings)
    assert "—" in markdown_table(result)  # the baseline row has no sentiment score


def test_bad_input_is_a_clear_error_or_a_counted_skip(model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing-folder is not a folder"):
        evaluate_tasks([model_dir], tmp_path / "missing-folder")
    with pytest.raises(FileNotFoundError, match="not a saved model folder"):
        evaluate_tasks([tmp_path / "no-model"], tmp_path)
    with pytest.raises(ValueError, match="--limit must be at least 1"):
        evaluate_tasks([model_dir], tmp_path, limit=0)

    (tmp_path / "data/segmentation").mkdir(parents=True)  # a task folder without sft-test.jsonl
    with pytest.raises(ValueError, match=r"holds no usable task.*segmentation/sft-test.jsonl does not exist"):
        evaluate_tasks([model_dir], tmp_path / "data")

    _write(
        tmp_path / "data/pinyin/sft-test.jsonl", ["{broken", _conversation(PINYIN_PROMPT.format(word="地区"), "dì qū")]
    )
    warnings = []
    result = evaluate_tasks([model_dir], tmp_path / "data", max_new_tokens=4, show_progress=False, warn=warnings.append)
    assert set(result["tasks"]) == {"pinyin"} and "segmentation" in result["skipped_tasks"]
    assert result["tasks"]["pinyin"]["skipped_lines"] == 1
    assert any("pinyin/sft-test.jsonl:1: malformed line (JSONDecodeError)" in warning for warning in warnings)


# ------------------------------------------------------------------------------------- bag-of-words baseline
def test_label_set_and_item_text():
    assert label_set(["正面", "负面", "负面", "正面", "负面"]) == ("正面", "负面")
    assert label_set(["正面", "负面"]) is None  # each label seen once: not enough to call them labels
    assert label_set(["正面"] * 8) is None  # one answer is no classification
    assert label_set([s for s in SEGMENTATION_TEST] * 2) == tuple(sorted(SEGMENTATION_TEST))  # repeated: labels
    assert label_set([f"{n}" for n in range(11)] * 3) is None  # more than MAX_LABELS
    assert item_text(SENTIMENT_PROMPT, SENTIMENT_PROMPT.format(review="物流很快")) == "物流很快"
    assert item_text(SENTIMENT_PROMPT, "别的问题") == "别的问题"  # not the template's prompt: the whole of it
    assert item_text("{a} and {b}", "x and y") == "x and y"  # two fields: no single item


def test_bag_of_words_beats_the_majority_label_on_the_real_sentiment_split(tmp_path):
    """The real sentiment task, split as `tinyllm data tasks` splits it (by a hash of the prompt): the baseline
    must read the reviews, not just the label prior."""
    folder = tmp_path / "tasks" / "sentiment"
    splits: dict[str, list[str]] = {"train": [], "test": []}
    for example in TASKS["sentiment"].examples():
        split = "test" if is_validation(example.prompt, 50) else "train"
        splits[split].append(_conversation(example.prompt, example.answer))
    _write(folder / "sft-train.jsonl", splits["train"])
    _write(folder / "sft-test.jsonl", splits["test"])
    tasks, _ = eval_tasks.load_task_data(tmp_path / "tasks", None, print)
    task = tasks["sentiment"]
    references = [row.reference for row in task.rows]
    replies, method = eval_tasks.bag_of_words_baseline("sentiment", task)
    assert len(replies) == len(references) > 500 and "character 1-3-grams" in method
    accuracy = TASKS["sentiment"].metrics(references, replies)["accuracy"]
    trivial, _ = TASKS["sentiment"].baseline(references, [row.reference for row in task.train.rows])
    majority = TASKS["sentiment"].metrics(references, trivial)["accuracy"]
    assert accuracy > 0.75 and accuracy > majority + 0.2, (accuracy, majority)
    assert eval_tasks.bag_of_words_baseline("segmentation", task) is not None  # any task whose answers are labels
    assert eval_tasks.bag_of_words_baseline("pinyin", eval_tasks.TaskData("pinyin", task.test, None, task.rows)) is None


# ------------------------------------------------------------------------------------------------ pass@k
def test_pass_at_k_is_chen_et_al_s_unbiased_estimator():
    def numerically_stable(n: int, c: int, k: int) -> float:  # the paper's own code (Chen et al. 2021, Fig. 3)
        return 1.0 if n - c < k else 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))

    for n, c, k in itertools.product(range(1, 9), range(9), range(1, 9)):
        if c <= n and k <= n:
            assert pass_at_k(n, c, k) == pytest.approx(numerically_stable(n, c, k))
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0  # k = n: any right reply
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4) and pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - 3/10
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_sampling_score_counts_by_hand():
    asked = [{"role": "user", "content": "评论"}]
    rows = [eval_tasks.TaskRow(asked, ref, line) for line, ref in enumerate(["正面", "负面", "正面", "负面"])]
    greedy = ["正面", "正面", "负面", "负面"]  # rows 0 and 3 right
    sampled = [
        ["负面", "负面", "负面"],  # 0 right
        ["负面", "正面", "不知道"],  # 1 right
        ["正面。", "正面", "负面"],  # 2 right
        ["负面", "负面", "负面"],  # 3 right
    ]
    score = eval_tasks.sampling_score("sentiment", rows, greedy, sampled, 3, 1.0, 7)
    assert score["pass_at_1"] == 0.5
    assert score["pass_at_k"] == 0.75  # rows 1, 2 and 3 have a right reply
    assert score["sampled_pass_at_1"] == pytest.approx((0 + 1 / 3 + 2 / 3 + 1) / 4)
    assert score["rows_by_right_replies"] == [1, 1, 1, 1]
    assert (score["samples"], score["temperature"], score["seed"]) == (3, 1.0, 7)
    # partial credit is not a pass: a segmentation with one wrong boundary has F1 < 1
    row, near = eval_tasks.TaskRow(asked, "要 尊重 群众", 0), "要 尊重群众"
    score = eval_tasks.sampling_score("segmentation", [row], [near], [[near, row.reference]], 2, 1.0, 0)
    assert (score["pass_at_1"], score["pass_at_k"], score["rows_by_right_replies"]) == (0.0, 1.0, [0, 1, 0])


@pytest.fixture(scope="module")
def label_model(small_tokenizer, tmp_path_factory) -> BigramModel:
    """Replies 负面 or 正面 to any prompt, 负面 first (greedy) and with probability sigmoid(1) = 0.73 at T = 1."""
    model = BigramModel(small_tokenizer, {"负面": 1.0, "正面": 0.0})
    model.folder = model.save(tmp_path_factory.mktemp("label_model"))
    return model


def test_pass_at_k_of_a_model_whose_replies_are_known(label_model, tmp_path):
    data = write_task_data(tmp_path / "tasks")
    references = [row.reference for row in read_task_file(data / "sentiment/sft-test.jsonl", "sentiment").rows]
    negative = references.count("负面") / len(references)  # the greedy reply is always 负面
    greedy_only = evaluate_tasks([label_model.folder], data, show_progress=False)
    result = evaluate_tasks(
        [label_model.folder], data, samples=8, seed=5, sample_tasks=["sentiment"], batch_size=4, show_progress=False
    )
    assert result["sampling"] == {"samples": 8, "temperature": 1.0, "seed": 5, "tasks": ["sentiment"]}
    scored = result["rows"][-1]["tasks"]
    assert "pass_at_k" not in scored["segmentation"]  # --sample-task sentiment only
    sampling = scored["sentiment"]["pass_at_k"]
    assert sampling["pass_at_1"] == scored["sentiment"]["metrics"]["accuracy"] == pytest.approx(negative)
    # the greedy replies are those of a run without sampling: sampling draws from its own RNG stream
    assert greedy_only["rows"][-1]["tasks"]["sentiment"]["examples"] == scored["sentiment"]["examples"]

    # the same replies, drawn again with the same seed, counted by hand
    model, tokenizer = load_model(label_model.folder, "cpu")
    state = torch.random.get_rng_state()
    with tqdm(disable=True) as progress:
        replies = sampled_replies(model, tokenizer, read_task_file(data / "sentiment/sft-test.jsonl", "sentiment").rows,
                                  8, 1.0, scored["sentiment"]["max_new_tokens"], 4, 5, progress)  # fmt: skip
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    assert {reply for row in replies for reply in row} == {"正面", "负面"}  # each reply one label, then eos
    hand = sum(any(reply == ref for reply in row) for row, ref in zip(replies, references)) / len(references)
    assert sampling["pass_at_k"] == pytest.approx(hand) and hand >= sampling["pass_at_1"]
    right = [sum(reply == ref for reply in row) for row, ref in zip(replies, references)]
    assert sampling["sampled_pass_at_1"] == pytest.approx(sum(right) / (8 * len(references)))
    assert sampling["examples"][0]["replies"] == replies[0]
    assert sampling["pass_at_k"] > sampling["pass_at_1"]  # 正面 is sampled too: the two 正面 rows can be solved

    # at a low temperature sampling is greedy decoding: pass@K = pass@1
    cold = evaluate_tasks([label_model.folder], data, samples=4, temperature=0.02, show_progress=False)
    for task, scored in cold["rows"][-1]["tasks"].items():
        assert scored["pass_at_k"]["pass_at_k"] == scored["pass_at_k"]["pass_at_1"], task
    table = markdown_table(result)
    assert "sentiment pass@1" in table and "sentiment pass@8" in table and "segmentation pass@8" not in table


def test_sampling_options_are_checked(model_dir, tmp_path):
    data = write_task_data(tmp_path / "tasks")
    for kwargs, message in (
        ({"samples": -1}, "--samples must be at least 0"),
        ({"samples": 4, "temperature": 0.0}, "--temperature must be a number above 0"),
        ({"sample_tasks": ["sentiment"]}, "--sample-task needs --samples"),
        ({"samples": 2, "sample_tasks": ["sentimnet"]}, "--sample-task sentimnet: no such task"),
    ):
        with pytest.raises(ValueError, match=message):
            evaluate_tasks([model_dir], data, **kwargs)
    args = _args("--model", str(model_dir), "--data", str(data), "--samples", "2", "--sample-task", "pinyin")
    assert (args.samples, args.temperature, args.seed, args.sample_task) == (2, 1.0, 1337, ["pinyin"])
    quiet = evaluate_tasks([model_dir], data, max_new_tokens=2, bag_of_words=False, show_progress=False)
    assert [row["name"] for row in quiet["rows"]] == ["trivial baseline", str(model_dir)]  # for quantize's report
