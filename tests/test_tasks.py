"""The demo tasks as `tinyllm data tasks` builds them: the generated addition task (exact answers, held out by value,
near-miss wrong answers, the no-carry baseline), label-balanced sentiment preference pairs, and the --tasks option."""

import json
from collections import Counter
from pathlib import Path

import pytest

from tiny_llama2_zh import demo
from tiny_llama2_zh.cli import main
from tiny_llama2_zh.data.tasks import DEFAULT_TASKS, TASKS, build_tasks
from tiny_llama2_zh.data.tasks.addition import (
    ADDITION_PROMPT,
    addition_examples,
    addition_metrics,
    near_misses,
    operands,
    sum_without_carries,
)
from tiny_llama2_zh.data.tasks.column_addition import (
    COLUMN_ADDITION_PROMPT,
    column_addition_examples,
    column_addition_metrics,
    slip,
    stated_sum,
    working,
)
from tiny_llama2_zh.data.tasks.numerals import (
    NUMERALS_PROMPT,
    chinese_numeral,
    numerals_examples,
    numerals_metrics,
    slips,
    without_zeros,
)
from tiny_llama2_zh.data.tasks.review import REVIEW_PROMPT, review_metrics
from tiny_llama2_zh.data.tasks.sentiment import SENTIMENT_PROMPT, sentiment_examples
from tiny_llama2_zh.data.tasks.simplified import (
    SIMPLIFIED_PROMPT,
    simplified_examples,
    simplified_metrics,
    simplify,
    traditional,
    traditional_to_simplified,
)
from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.eval.tasks import load_task_data


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    """The tasks but segmentation, built once through the CLI (segmentation's People's Daily parse is slow)."""
    folder = tmp_path_factory.mktemp("tasks")
    names = "addition,column_addition,numerals,simplified,sentiment,review"
    assert main(["data", "tasks", "--output", str(folder), "--tasks", names]) == 0
    return folder, json.loads((folder / "stats.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- addition
def test_addition_answers_are_the_sums_of_distinct_pairs_of_two_digit_numbers():
    examples = list(addition_examples())
    assert len(examples) == 4000 and examples == list(addition_examples())  # deterministic
    pairs = [operands(example.prompt) for example in examples]
    assert len(set(pairs)) == len(pairs)
    assert all(
        example.prompt == ADDITION_PROMPT.format(expression=f"{a}+{b}") for example, (a, b) in zip(examples, pairs)
    )
    assert all(example.answer == str(a + b) for example, (a, b) in zip(examples, pairs))
    assert {len(str(n)) for pair in pairs for n in pair} == {2}
    assert {len(example.answer) for example in examples} == {2, 3}
    wider = list(addition_examples(count=300, min_digits=2, max_digits=3))
    assert {len(example.answer) for example in wider} == {2, 3, 4}
    three_digit = list(addition_examples(count=50, min_digits=3, max_digits=3))
    assert all(len(str(n)) == 3 for example in three_digit for n in operands(example.prompt))


def test_addition_wrong_answers_are_near_misses_never_the_sum():
    assert near_misses(58, 67) == [25, 115, 124, 126, 135, 225]  # carries dropped: 115 (units), 25 (tens)
    assert near_misses(11, 22) == [23, 32, 34, 43]  # no carry: one digit one off
    for example in addition_examples(count=2000, min_digits=2, max_digits=3):
        a, b = operands(example.prompt)
        assert example.wrong_answer != example.answer
        assert int(example.wrong_answer) in near_misses(a, b)
    # a dropped carry inside the number is also one digit one off; a dropped final carry shortens the sum
    wider = addition_examples(count=2000, min_digits=2, max_digits=3)
    shorter = Counter(len(e.wrong_answer) < len(e.answer) for e in wider)
    assert shorter[True] > 100 and shorter[False] > 1000


def test_addition_is_held_out_by_unordered_pair(built):
    folder, stats = built
    train = read_jsonl(folder / "addition" / "sft-train.jsonl")
    test = read_jsonl(folder / "addition" / "sft-test.jsonl")
    assert (stats["addition"]["train"], stats["addition"]["test"]) == (len(train), len(test))
    assert 3700 <= len(train) <= 3900 and 100 <= len(test) <= 300
    train_pairs = {frozenset(operands(row["messages"][0]["content"])) for row in train}
    test_pairs = {frozenset(operands(row["messages"][0]["content"])) for row in test}
    assert not train_pairs & test_pairs  # neither a+b nor its twin b+a
    ordered_train = [operands(row["messages"][0]["content"]) for row in train]
    assert set(pair[::-1] for pair in ordered_train) & set(ordered_train)  # twins exist, and they stay on one side
    pairs = read_jsonl(folder / "addition" / "preference-test.jsonl")
    assert [p["chosen"] for p in pairs] == [row["messages"][1]["content"] for row in test]


def test_addition_metrics_checkers_and_no_carry_baseline():
    task = TASKS["addition"]
    references = ["125", "102", "99", "1000"]
    replies = ["125", " １０２\n", "98", "1OOO"]  # full-width digits count (NFKC); a letter O is no number
    metrics = addition_metrics(references, replies)
    assert metrics["exact"] == 0.5 and metrics["not_a_number"] == 1
    assert metrics["digit_accuracy"] == (3 + 3 + 1 + 0) / (3 + 3 + 2 + 4)
    assert addition_metrics(["125"], ["0125"])["exact"] == 0.0  # a leading zero is not the answer
    assert task.correct("125", "125") == 1.0 and task.correct("125", "124") == 0.0
    assert task.correct("125", "答：125") == 0.0 and task.well_formed("125", "答：125") == 0.0
    assert task.well_formed("125", "7") == 1.0 and task.well_formed("125", "07") == 0.0
    assert task.answer_problem("125") is None and "whole number" in task.answer_problem("12.5")
    assert (
        sum_without_carries(58, 67) == 15 and sum_without_carries(701, 34) == 735 and sum_without_carries(55, 45) == 90
    )
    prompts = [ADDITION_PROMPT.format(expression=e) for e in ("58+67", "701+34", "55+45")]
    replies, method = task.baseline(["125", "735", "100"], [], prompts)
    assert replies == ["15", "735", "90"] and "without carries" in method
    assert task.baseline(["125"], []) is None  # it needs the prompts
    examples = list(addition_examples())
    replies, _ = task.baseline([e.answer for e in examples], [], [e.prompt for e in examples])
    exact = task.metrics([e.answer for e in examples], replies)["exact"]
    assert 0.1 < exact < 0.4  # right exactly when no column carries: neither zero nor the task solved


# ------------------------------------------------------------------------------------------ column addition
def test_column_addition_works_each_column_from_the_units_and_states_the_sum():
    assert working(358, 467) == "8+7=15\n5+6+1=12\n3+4+1=8\n得数825"
    assert working(707, 443) == "7+3=10\n0+4+1=5\n7+4=11\n得数1150"  # the last carry opens the sum
    assert working(0, 0) == "0+0=0\n得数0"
    # a slip is carried through: the forgotten carry's column and every line after it, and the sum
    assert working(358, 467, forget_carry_into=1) == "8+7=15\n5+6=11\n3+4+1=8\n得数815"
    assert working(111, 222, one_too_high=0) == "1+2=4\n1+2=3\n1+2=3\n得数334"
    assert slip(358, 467) == working(358, 467, forget_carry_into=1)  # the first carry that goes into a column
    assert slip(512, 613) == working(512, 613, one_too_high=0)  # only the top column carries: into no column
    examples = list(column_addition_examples())
    assert len(examples) == 4000 and examples == list(column_addition_examples())  # deterministic
    pairs = [operands(example.prompt) for example in examples]
    assert len(set(pairs)) == len(pairs) and {len(str(n)) for pair in pairs for n in pair} == {3}
    assert all(e.prompt == COLUMN_ADDITION_PROMPT.format(expression=f"{a}+{b}") for e, (a, b) in zip(examples, pairs))
    assert all(stated_sum(e.answer) == str(a + b) for e, (a, b) in zip(examples, pairs))
    assert all(e.answer == working(a, b) for e, (a, b) in zip(examples, pairs))
    # the wrong working states a wrong sum, and differs from the right one in its working, not only its last line
    assert all(stated_sum(e.wrong_answer) != stated_sum(e.answer) for e in examples)
    assert all(e.wrong_answer.splitlines()[:-1] != e.answer.splitlines()[:-1] for e in examples)
    assert all(e.split_key == f"{min(a, b)}+{max(a, b)}" for e, (a, b) in zip(examples, pairs))  # held out by value


def test_column_addition_metrics_checkers_and_no_carry_baseline(built):
    task = TASKS["column_addition"]
    right = working(358, 467)
    references = [right, right, right, right]
    replies = [right + "\n", "8+7=15\n5+6=11\n3+4=7\n得数825", "8+7=15\n5+6+1=12", "得数 ８２５"]
    metrics = column_addition_metrics(references, replies)
    # the sum counts whatever the working (the second reply's working is wrong), a reply with no sum line does not
    assert metrics["exact"] == 0.75 and metrics["working_exact"] == 0.25 and metrics["no_sum"] == 1
    assert task.correct(right, "得数825") == 1.0 and task.correct(right, "得数815") == 0.0
    assert task.correct(right, "得数825\n得数1") == 0.0  # the last line is the answer
    assert task.partial(right, "得数815") == pytest.approx(2 / 3) and task.partial(right, "825") == 0.0
    assert task.well_formed(right, "x\n得数7") == 1.0 and task.well_formed(right, "825") == 0.0
    assert task.answer_problem(right) is None and "得数" in task.answer_problem("825")
    prompts = [COLUMN_ADDITION_PROMPT.format(expression=e) for e in ("358+467", "701+234")]
    replies, method = task.baseline([right, working(701, 234)], [], prompts)
    assert replies == ["得数715", "得数935"] and "without carries" in method
    folder, stats = built
    train, test = (
        {frozenset(operands(row["messages"][0]["content"])) for row in read_jsonl(folder / "column_addition" / name)}
        for name in ("sft-train.jsonl", "sft-test.jsonl")
    )
    assert not train & test and 3700 <= len(train) <= 3900 and 100 <= stats["column_addition"]["test"] <= 300


# ---------------------------------------------------------------------------------------------- numerals
def test_chinese_numerals_follow_the_written_standard_for_zeros_tens_twos_and_wan():
    written = {
        0: "零", 7: "七", 10: "十", 15: "十五", 20: "二十", 100: "一百", 101: "一百零一", 110: "一百一十",
        115: "一百一十五", 305: "三百零五", 1000: "一千", 1001: "一千零一", 1005: "一千零五", 1010: "一千零一十",
        1050: "一千零五十", 1100: "一千一百", 1500: "一千五百", 2018: "二千零一十八", 2222: "二千二百二十二",
        10_000: "一万", 100_000: "十万", 150_000: "十五万", 100_010: "十万零一十", 100_500: "十万零五百",
        1_000_500: "一百万零五百", 1_010_000: "一百零一万", 10_001_000: "一千万一千", 10_050_000: "一千零五万",
        20_180_305: "二千零一十八万零三百零五", 30_000_005: "三千万零五", 99_999_999: "九千九百九十九万九千九百九十九",
    }  # fmt: skip
    assert {number: chinese_numeral(number) for number in written} == written
    assert without_zeros(305) == "三百五" and without_zeros(1050) == "一千五十" and without_zeros(1500) == "一千五百"
    assert without_zeros(100_500) == "十万五百"
    with pytest.raises(UsageError, match="0 to 99999999"):
        chinese_numeral(100_000_000)


def test_numerals_examples_are_distinct_zero_rich_and_their_slips_are_wrong():
    examples = list(numerals_examples())
    assert len(examples) == 4000 and examples == list(numerals_examples())  # deterministic
    numbers = [int(example.split_key) for example in examples]
    assert len(set(numbers)) == len(numbers) and {len(str(n)) for n in numbers} == {3, 4, 5, 6, 7, 8}
    assert all(e.prompt == NUMERALS_PROMPT.format(number=n) for e, n in zip(examples, numbers))
    assert all(e.answer == chinese_numeral(n) for e, n in zip(examples, numbers))
    with_zero = sum("零" in e.answer for e in examples) / len(examples)
    assert 0.5 < with_zero < 0.9  # zeros inside a number are common, not rare as for uniformly drawn digits
    assert slips(305) == [
        "三百一十五",
        "三百五",
        "三百零六",
        "三百零四",
        "三百零零五",
        "三零五",
        "二百零五",
        "四百零五",
    ]
    assert all(e.wrong_answer in slips(n) and e.wrong_answer != e.answer for e, n in zip(examples, numbers))


def test_numerals_metrics_checkers_and_no_zero_baseline(built):
    task = TASKS["numerals"]
    metrics = numerals_metrics(["三百零五", "一千五百", "十五"], ["三百零五\n", "一千五", "15"])
    assert metrics["exact"] == pytest.approx(1 / 3) and metrics["not_a_numeral"] == 1
    assert metrics["char_similarity"] == pytest.approx((1 + 6 / 7 + 0) / 3)
    assert task.correct("一千零五", " 一千零五 ") == 1.0 and task.correct("一千零五", "一千五") == 0.0
    assert task.partial("一千零五", "一千五") == pytest.approx(6 / 7)
    assert task.well_formed("一千零五", "一千五") == 1.0 and task.well_formed("一千零五", "1005") == 0.0
    assert task.answer_problem("三百零五") is None and "Chinese numerals" in task.answer_problem("305")
    prompts = [NUMERALS_PROMPT.format(number=n) for n in (305, 1500, 1050)]
    replies, method = task.baseline(["三百零五", "一千五百", "一千零五十"], [], prompts)
    assert replies == ["三百五", "一千五百", "一千五十"] and "no 零" in method
    assert task.baseline(["三百零五"], []) is None  # it needs the prompts
    folder, stats = built
    train = {row["messages"][0]["content"] for row in read_jsonl(folder / "numerals" / "sft-train.jsonl")}
    test = {row["messages"][0]["content"] for row in read_jsonl(folder / "numerals" / "sft-test.jsonl")}
    assert not train & test and 3700 <= len(train) <= 3900 and stats["numerals"]["test"] == len(test)


# -------------------------------------------------------------------------------------------- simplified
def test_simplified_idioms_are_written_in_traditional_characters_that_the_table_maps_back():
    table = traditional_to_simplified()
    assert table["馬"] == "马" and table["當"] == "当" and len(table) > 2500
    assert all(len(old) == len(new) == 1 and old != new for old, new in table.items())
    assert traditional("一马当先") == "一馬當先" and simplify("一馬當先") == "一马当先"
    examples = list(simplified_examples())
    assert examples == list(simplified_examples()) and len(examples) > 20_000  # deterministic, every idiom usable
    words = [example.answer for example in examples]
    assert len(set(words)) == len(words) and all(len(word) == 4 for word in words)
    for example in examples:
        written = example.prompt.rsplit("成语：", 1)[1]
        assert example.prompt == SIMPLIFIED_PROMPT.format(idiom=written) and example.split_key == example.answer
        assert written != example.answer and simplify(written) == example.answer  # something to convert, exactly
        assert simplify(example.answer) == example.answer  # no character of the answer is itself rewritten
        slipped = [i for i, (w, a) in enumerate(zip(example.wrong_answer, example.answer)) if w != a]
        assert len(slipped) == 1 and example.wrong_answer[slipped[0]] == written[slipped[0]]  # one left unconverted


def test_simplified_metrics_checkers_and_unconverted_baseline(built):
    task = TASKS["simplified"]
    metrics = simplified_metrics(["一马当先", "哀兵必胜", "挨风缉缝"], ["一马当先\n", "哀兵必勝", "挨风"])
    assert metrics["exact"] == pytest.approx(1 / 3) and metrics["char_accuracy"] == pytest.approx((4 + 3 + 2) / 12)
    assert task.correct("一马当先", " 一马当先 ") == 1.0 and task.correct("一马当先", "一馬当先") == 0.0
    assert task.partial("一马当先", "一馬当先") == pytest.approx(3 / 4) and task.partial("一马当先", "") == 0.0
    assert task.well_formed("一马当先", "一馬当先") == 1.0 and task.well_formed("一马当先", "一马当") == 0.0
    assert task.answer_problem("一马当先") is None and "Han" in task.answer_problem("1+1")
    prompts = [SIMPLIFIED_PROMPT.format(idiom=idiom) for idiom in ("一馬當先", "哀兵必勝")]
    replies, method = task.baseline(["一马当先", "哀兵必胜"], [], prompts)
    assert replies == ["一馬當先", "哀兵必勝"] and "unconverted" in method
    folder, stats = built
    train = {row["messages"][1]["content"] for row in read_jsonl(folder / "simplified" / "sft-train.jsonl")}
    test = {row["messages"][1]["content"] for row in read_jsonl(folder / "simplified" / "sft-test.jsonl")}
    assert not train & test and len(test) == stats["simplified"]["test"] > 1000 and len(train) > 20_000


# --------------------------------------------------------------------------------------------- sentiment
def test_sentiment_preference_pairs_are_label_balanced_and_sft_keeps_every_example(built):
    folder, stats = built
    examples = list(sentiment_examples())
    sft = {split: read_jsonl(folder / "sentiment" / f"sft-{split}.jsonl") for split in ("train", "test")}
    assert len(sft["train"]) + len(sft["test"]) == len(examples)  # SFT files unchanged: every example
    for split in ("train", "test"):
        pairs = read_jsonl(folder / "sentiment" / f"preference-{split}.jsonl")
        labels = Counter(pair["chosen"] for pair in pairs)
        assert labels["正面"] == labels["负面"] > 100
        assert stats["sentiment"]["preference"][split] == len(pairs)
        sft_labels = Counter(row["messages"][1]["content"] for row in sft[split])
        dropped = stats["sentiment"]["dropped_for_balance"][split]
        assert dropped == {"负面": sft_labels["负面"] - sft_labels["正面"]} and dropped["负面"] > 0
        sft_prompts = [row["messages"][0]["content"] for row in sft[split]]
        kept = [pair["prompt"] for pair in pairs]
        kept_set = set(kept)
        assert kept_set <= set(sft_prompts) and kept == [p for p in sft_prompts if p in kept_set]  # in file order
    assert "dropped_for_balance" not in stats["addition"]  # only classification tasks are balanced


# ------------------------------------------------------------------------------------------------ review
def test_review_is_split_as_sentiment_and_pairs_a_positive_over_a_negative_review(built):
    folder, stats = built
    prefix = SENTIMENT_PROMPT.format(review="")
    labels = {}
    for split in ("train", "test"):
        for row in read_jsonl(folder / "sentiment" / f"sft-{split}.jsonl"):
            labels[row["messages"][0]["content"].removeprefix(prefix)] = (split, row["messages"][1]["content"])
    for split in ("train", "test"):
        reviews = [row["messages"][1]["content"] for row in read_jsonl(folder / "review" / f"sft-{split}.jsonl")]
        # every review, good and bad, taught as written; each in the split the sentiment task put it in
        assert {labels[review][0] for review in reviews} == {split}
        assert Counter(labels[review][1] for review in reviews)["正面"] > 100
        pairs = read_jsonl(folder / "review" / f"preference-{split}.jsonl")
        assert len(pairs) == stats["review"]["preference"][split] > 100
        assert all(pair["prompt"] == REVIEW_PROMPT for pair in pairs)
        assert {(labels[p["chosen"]], labels[p["rejected"]]) for p in pairs} == {((split, "正面"), (split, "负面"))}


def test_review_judge_reads_plain_praise_and_complaints_and_eval_tasks_leaves_review_to_sampling(built):
    folder, _ = built
    replies = ["质量很好，物流也快，非常满意，推荐购买！", "太差了，用了两天就坏了，非常失望。"]
    assert review_metrics(["", ""], replies)["positive"] == 0.5
    assert TASKS["review"].correct("", replies[0]) == 1.0 and TASKS["review"].correct("", replies[1]) == 0.0
    tasks, skipped = load_task_data(folder, limit=5, warn=print)
    assert "review" not in tasks and "open-ended" in skipped["review"] and {"sentiment", "addition"} <= set(tasks)


# -------------------------------------------------------------------------------------------------- CLI
def test_data_tasks_builds_the_named_tasks_and_refuses_unknown_names(built, tmp_path, capsys):
    folder, stats = built
    assert set(stats) == {"addition", "column_addition", "numerals", "simplified", "sentiment", "review"}
    assert sorted(path.name for path in folder.iterdir()) == [
        "addition",
        "column_addition",
        "numerals",
        "review",
        "sentiment",
        "simplified",
        "stats.json",
    ]
    assert main(["data", "tasks", "--output", str(tmp_path / "x"), "--tasks", "addition,poetry"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'poetry'" in err and "pinyin" in err and not (tmp_path / "x").exists()


def test_default_tasks_are_the_demos_and_pinyin_is_built_when_named(tmp_path):
    assert set(DEFAULT_TASKS) == set(demo.TASKS) and "pinyin" not in DEFAULT_TASKS and "pinyin" in TASKS
    assert demo.GRPO_TASK == "addition" and set(demo.SFT_MIX) <= set(DEFAULT_TASKS)
    counts = build_tasks(tmp_path, names=["pinyin"])
    assert set(counts) == {"pinyin"} and counts["pinyin"]["train"] > 1000
