"""DPO and GRPO: the reward checkers on right, wrong and malformed replies; a reward function that raises; both
recipes end to end on a tiny model, with what they report."""

import json
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from test_rl import assert_shipped_folder_is_pickle_free
from tiny_llama2_zh.config import load_config
from tiny_llama2_zh.data.tasks.pinyin import pinyin_correct
from tiny_llama2_zh.data.tasks.segmentation import segmentation_correct
from tiny_llama2_zh.data.tasks.sentiment import sentiment_correct
from tiny_llama2_zh.runfiles import panel_series
from tiny_llama2_zh.train.rewards import (
    REWARD_FUNCTIONS,
    RewardErrors,
    answer_problem,
    correctness_reward,
    format_reward,
    guarded,
    partial_credit_reward,
)

REVIEWS = ["这本书很好看", "质量太差了", "物流很快", "包装破损", "非常满意", "不推荐购买", "孩子很喜欢", "用了两天就坏"]


# ------------------------------------------------------------------------------------------- reward checkers
@pytest.mark.parametrize(
    ("checker", "reference", "reply", "expected"),
    [
        (sentiment_correct, "正面", "正面", 1.0),
        (sentiment_correct, "正面", "情感：正面。", 1.0),
        (sentiment_correct, "正面", "负面", 0.0),
        (sentiment_correct, "负面", "", 0.0),
        (sentiment_correct, "负面", "我不知道", 0.0),
        (segmentation_correct, "我 爱 北京", "我 爱 北京", 1.0),
        (segmentation_correct, "我 爱 北京", "我爱 北京", pytest.approx(0.4)),  # 1 of 2 predicted, 1 of 3 gold
        (segmentation_correct, "我 爱 北京", "", 0.0),
        (segmentation_correct, "我 爱 北京", "他 爱 北京", pytest.approx(2 / 3)),  # a changed character costs its word
        (pinyin_correct, "zhōng guó", "zhōng guó", 1.0),
        (pinyin_correct, "zhōng guó", "zhōng guǒ", 0.5),
        (pinyin_correct, "zhōng guó", "zhōng guó rén", pytest.approx(2 / 3)),
        (pinyin_correct, "zhōng guó", "中国", 0.0),
    ],
)
def test_correctness_checkers(checker, reference, reply, expected):
    assert checker(reference, reply) == expected


def test_format_and_correctness_reward_functions_dispatch_on_the_task():
    completions = [
        [{"role": "assistant", "content": text}] for text in ("“正面”。", "正面吧", "我 爱 北京", "zhong1 guo2")
    ]
    tasks = ["sentiment", "sentiment", "segmentation", "pinyin"]
    answers = ["正面", "负面", "我 爱 北京", "zhōng guó"]
    assert format_reward(None, completions, task=tasks, answer=answers) == [1.0, 0.0, 1.0, 0.0]
    assert correctness_reward(None, completions, task=tasks, answer=answers) == [1.0, 0.0, 1.0, 0.0]


def test_partial_credit_pays_addition_by_digits_right_and_other_tasks_by_their_checker():
    completions = ["125", "115", "52", "x", "正面"]
    tasks = ["addition", "addition", "addition", "addition", "sentiment"]
    answers = ["125", "125", "125", "125", "正面"]
    rewards = partial_credit_reward(None, completions, task=tasks, answer=answers)
    assert rewards == [1.0, 2 / 3, 0.0, 0.0, 1.0]  # 52 vs 125 by place: 2-5, 5-2 and nothing for the hundreds


def test_grpo_rewards_are_named_from_the_registry_and_a_typo_is_refused():
    from tiny_llama2_zh.config import ConfigError
    from tiny_llama2_zh.train.grpo import GRPORecipeConfig

    path = REPO_ROOT / "configs" / "grpo" / "demo.yaml"
    assert load_config(GRPORecipeConfig, path, ["rewards=[correctness,partial_credit]"]).rewards == [
        "correctness",
        "partial_credit",
    ]
    assert set(REWARD_FUNCTIONS) == {"correctness", "format", "partial_credit"}
    with pytest.raises(ConfigError, match="partial_credit"):
        load_config(GRPORecipeConfig, path, ["rewards=[correctnes]"])


def test_answers_that_cannot_be_checked_are_named():
    assert answer_problem("sentiment", "正面") is None and answer_problem("pinyin", "zhōng guó") is None
    assert "not one of" in answer_problem("sentiment", "好")
    assert "tone-marked" in answer_problem("pinyin", "zhong guo 1")
    assert "no checker" in answer_problem("poetry", "床前明月光")
    assert answer_problem("segmentation", " ") == "no reference answer"


def test_a_reward_function_that_raises_is_counted_and_names_the_prompt(capsys):
    def picky(prompts, completions, **columns):
        if "坏" in completions[0]:
            raise ValueError("cannot score this")
        return [1.0]

    errors = RewardErrors()
    reward = guarded(picky, errors)
    prompts = [[{"role": "user", "content": "第一题"}], [{"role": "user", "content": "第二题"}]]
    assert reward(prompts, ["好", "坏"], task=["a", "b"]) == [1.0, None]
    assert errors.counts == {"picky": 1} and "第二题" in errors.examples[0] and "ValueError" in errors.examples[0]
    assert "picky raised ValueError: cannot score this on prompt" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- DPO
def write_pairs(path: Path, count: int, offset: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"prompt": f"评论{offset + i}：{REVIEWS[i % len(REVIEWS)]}", "chosen": "好的", "rejected": "不好"}
        for i in range(count)
    ]
    rows.append({"prompt": "同一个", "chosen": "一样", "rejected": "一样"})  # dropped and counted
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def dpo_recipe(model_dir, tmp_path, *extra):
    from tiny_llama2_zh.train.dpo import DPORecipeConfig

    overrides = [
        f"model.init_from={model_dir}",
        "model.reward_model=null",
        f"data.train={write_pairs(tmp_path / 'train' / 'toy' / 'preference-train.jsonl', 64)}",
        f"data.validation={write_pairs(tmp_path / 'test' / 'toy' / 'preference-test.jsonl', 16, offset=1000)}",
        f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=20",
        "train.per_device_train_batch_size=8",
        "train.learning_rate=3e-3",
        "train.warmup_steps=0",
        "train.logging_steps=5",
        "train.eval_steps=10",
        "train.save_steps=10",
        "train.report_to=[]",
        "train.max_length=64",
        "reply_max_new_tokens=4",
        *extra,
    ]
    return load_config(DPORecipeConfig, REPO_ROOT / "configs" / "dpo" / "demo.yaml", overrides)


@pytest.fixture(scope="module")
def tiny_reward_dir(tiny_model_dir, tmp_path_factory):
    from tiny_llama2_zh.tokenizer import load_tokenizer
    from tiny_llama2_zh.train.reward import load_reward_model

    folder = tmp_path_factory.mktemp("tiny_reward")
    tokenizer = load_tokenizer(tiny_model_dir)
    load_reward_model(str(tiny_model_dir), tokenizer.pad_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_dpo_learns_held_out_preferences_and_reports_replies(tiny_model_dir, tiny_reward_dir, tmp_path):
    from tiny_llama2_zh.train.dpo import dpo

    result = dpo(dpo_recipe(tiny_model_dir, tmp_path, f"model.reward_model={tiny_reward_dir}"))
    assert result["initial"]["accuracy"] == 0.5 and result["initial"]["margin"] == 0.0  # policy == reference
    assert result["final"]["accuracy"] == 1.0 and result["final"]["per_source"]["toy"]["pairs"] == 16
    assert result["data"]["train"]["skipped"] == {"chosen equals rejected": 1}
    assert set(result["replies"]) == {"sft", "dpo"} and result["replies"]["sft"]["eval_kl"] == 0.0
    assert result["replies"]["dpo"]["eval_kl"] != 0.0
    run = tmp_path / "run"
    evaluations = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evaluations if "eval_accuracy" in r][:3] == [0, 10, 20]
    assert (run / "loss.png").is_file()
    panels = dict(panel_series(evaluations))  # eval_accuracy is charted as pairs ranked right, not answers right
    assert {"train batches", "held out"} <= {label for _, label, _ in panels["pair accuracy"]}
    assert "held-out task accuracy (greedy)" not in panels
    assert any(line.startswith("| DPO implicit reward ") for line in (run / "dpo_eval.md").read_text().splitlines())
    assert_shipped_folder_is_pickle_free(run / "final")


def test_dpo_with_lora_trains_adapters_against_the_adapter_free_reference(tiny_model_dir, tmp_path):
    from tiny_llama2_zh.train.dpo import dpo

    result = dpo(dpo_recipe(tiny_model_dir, tmp_path, "model.lora={r: 4, alpha: 8, dropout: 0.0}", "train.max_steps=4"))
    assert result["lora"] and 0 < result["parameters"]["trainable"] < result["parameters"]["total"] / 5
    assert result["final"]["accuracy"] > 0.5 and (tmp_path / "run" / "final" / "adapter_config.json").is_file()
    assert_shipped_folder_is_pickle_free(tmp_path / "run" / "final")


CONVERSATIONS = [  # multi-turn prompts: the last user turn alone would be the same question for both
    [
        {"role": "user", "content": "评论：这本书很好看"},
        {"role": "assistant", "content": "正面"},
        {"role": "user", "content": "那这一条呢？"},
    ],
    [
        {"role": "user", "content": "评论：质量太差了"},
        {"role": "assistant", "content": "负面"},
        {"role": "user", "content": "那这一条呢？"},
    ],
]


def write_conversation_pairs(path: Path, count: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"prompt": CONVERSATIONS[i % 2], "chosen": ["正面", "负面"][i % 2], "rejected": ["负面", "正面"][i % 2]}
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_dpo_trains_on_and_scores_replies_to_the_whole_conversation(tiny_model_dir, tiny_reward_dir, tmp_path):
    from transformers import TrainerCallback

    from tiny_llama2_zh.data.preferences import load_preferences
    from tiny_llama2_zh.tokenizer import chat_ids, load_tokenizer
    from tiny_llama2_zh.train.dpo import dpo, reward_prompt_rows

    tokenizer = load_tokenizer(tiny_model_dir)
    held_out = write_conversation_pairs(tmp_path / "conversations" / "test" / "toy" / "preference-test.jsonl", 8)
    rows, _ = load_preferences(str(held_out), tokenizer, max_length=64)
    # the reward model scores replies to each distinct held-out conversation, earlier turns included
    expected = [{"prompt": conversation, "source": "toy"} for conversation in CONVERSATIONS]
    assert reward_prompt_rows(rows, limit=10) == expected

    class SeenPrompts(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            self.prompt_ids = [list(ids) for ids in train_dataloader.dataset["prompt_ids"]]

    seen = SeenPrompts()
    train = write_conversation_pairs(tmp_path / "conversations" / "train" / "toy" / "preference-train.jsonl", 16)
    config = dpo_recipe(
        tiny_model_dir, tmp_path, f"data.train={train}", f"data.validation={held_out}", "train.max_steps=1",
        f"model.reward_model={tiny_reward_dir}",
    )  # fmt: skip
    result = dpo(config, callbacks=[seen])
    whole = [chat_ids(tokenizer, conversation, generation_prompt=True) for conversation in CONVERSATIONS]
    assert all(ids in seen.prompt_ids for ids in whole) and set(result["replies"]) == {"sft", "dpo"}


# ------------------------------------------------------------------------------------------------- GRPO
def test_grpo_recipe_runs_with_checkable_prompts_only(tiny_model_dir, tmp_path):
    from tiny_llama2_zh.train.grpo import GRPORecipeConfig, grpo

    folder = tmp_path / "tasks" / "sentiment"
    folder.mkdir(parents=True)
    rows = [
        {"messages": [{"role": "user", "content": f"判断：{r}"}, {"role": "assistant", "content": label}]}
        for r, label in zip(REVIEWS, ["正面", "负面"] * 4, strict=True)
    ]
    rows.append({"messages": [{"role": "user", "content": "判断：还行"}, {"role": "assistant", "content": "中性"}]})
    (folder / "sft-train.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    overrides = [
        f"model.init_from={tiny_model_dir}",
        f"data.prompts={folder / 'sft-train.jsonl'}",
        f"data.validation={folder / 'sft-train.jsonl'}",
        f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=2",
        "train.per_device_train_batch_size=8",
        "train.num_generations=4",
        "train.max_completion_length=4",
        "train.logging_steps=1",
        "train.eval_steps=0",
        "train.save_steps=2",
        "train.report_to=[]",
        "eval_max_new_tokens=4",
    ]
    result = grpo(load_config(GRPORecipeConfig, REPO_ROOT / "configs" / "grpo" / "demo.yaml", overrides))
    assert result["steps"] == 2 and result["prompts"]["kept"] == 8
    assert result["prompts"]["unchecked"] == {"sentiment answer '中性' is not one of ('正面', '负面')": 1}
    assert {"eval_accuracy", "eval_reward", "eval_sentiment_accuracy"} <= result["final"].keys()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("reward_std" in r for r in records) and result["reward_errors"]["counts"] == {}
    # the curves chart each reward function's mean and the held-out accuracy as the task's, not as pairs
    panels = dict(panel_series(records))
    rewards = {label for _, label, _ in panels["rewards of sampled replies (mean)"]}
    assert {"sum of the rewards", "correctness_reward", "format_reward"} <= rewards
    assert "held-out task accuracy (greedy)" in panels and "pair accuracy" not in panels
    assert_shipped_folder_is_pickle_free(tmp_path / "run" / "final")


@pytest.mark.parametrize(
    "path", sorted([*(REPO_ROOT / "configs").glob("dpo/*.yaml"), *(REPO_ROOT / "configs").glob("grpo/*.yaml")])
)
def test_shipped_dpo_and_grpo_configs_are_valid_and_say_how_to_run_them(path):
    from tiny_llama2_zh.train.dpo import DPORecipeConfig, dpo_arguments
    from tiny_llama2_zh.train.grpo import GRPORecipeConfig, grpo_arguments

    stage = path.parent.name
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith(f"# tinyllm {stage} --config configs/{stage}/{path.name}")
    if stage == "dpo":
        assert dpo_arguments(load_config(DPORecipeConfig, path)).beta > 0
    else:
        args = grpo_arguments(load_config(GRPORecipeConfig, path))
        assert args.per_device_train_batch_size % args.num_generations == 0
