"""The reward model: initialised from an SFT folder, learns a preference it can see, reports per source, scores
replies from the command line, and refuses bad pairs with counts."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import REPO_ROOT
from test_rl import assert_shipped_folder_is_pickle_free
from tiny_llama2_zh.config import load_config
from tiny_llama2_zh.data.preferences import load_preferences
from tiny_llama2_zh.eval.preferences import pair_report, per_label_table
from tiny_llama2_zh.runfiles import panel_series
from tiny_llama2_zh.tokenizer import load_tokenizer
from tiny_llama2_zh.train.reward import RewardRecipeConfig, load_reward_model, reward, reward_arguments

REWARD_YAML = REPO_ROOT / "configs" / "reward" / "demo.yaml"
REVIEWS = ["这本书很好看", "质量太差了", "物流很快", "包装破损", "非常满意", "不推荐购买", "孩子很喜欢", "用了两天就坏"]


def write_pairs(folder: Path, name: str, count: int, offset: int = 0) -> Path:
    """A preference set any reward model can learn: the chosen reply is always 好的, the rejected one 不好."""
    path = folder / name / "preference-train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"prompt": f"评论{offset + i}：{REVIEWS[i % len(REVIEWS)]}", "chosen": "好的", "rejected": "不好"}
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def recipe(model_dir, tmp_path, *extra) -> RewardRecipeConfig:
    train = write_pairs(tmp_path / "train", "toy", 64)
    held_out = write_pairs(tmp_path / "test", "toy", 16, offset=1000)
    overrides = [
        f"model.init_from={model_dir}",
        f"data.train={train}",
        f"data.validation={held_out}",
        f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=30",
        "train.per_device_train_batch_size=8",
        "train.learning_rate=3e-3",
        "train.warmup_steps=0",
        "train.logging_steps=5",
        "train.eval_steps=15",
        "train.save_steps=15",
        "train.report_to=[]",
        "train.max_length=64",
        *extra,
    ]
    return load_config(RewardRecipeConfig, REWARD_YAML, overrides)


def test_the_reward_model_copies_the_backbone_and_adds_a_new_score_head(tiny_model_dir):
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    scorer = load_reward_model(str(tiny_model_dir), pad_token_id=0)
    policy_weights = policy.state_dict()
    scorer_weights = scorer.state_dict()
    assert scorer.config.num_labels == 1 and scorer_weights["score.weight"].shape == (1, policy.config.hidden_size)
    backbone = [name for name in scorer_weights if name.startswith("model.")]
    assert backbone and set(backbone) == {name for name in policy_weights if name.startswith("model.")}
    for name in backbone:
        torch.testing.assert_close(scorer_weights[name], policy_weights[name], rtol=0, atol=0)


def test_reward_recipe_learns_a_visible_preference_and_reports_it(tiny_model_dir, tmp_path, capsys):
    result = reward(recipe(tiny_model_dir, tmp_path))
    # a new head scores both replies about alike; the trained one separates them on prompts it never saw
    assert abs(result["initial"]["margin"]) < 0.5 < result["final"]["margin"] and result["final"]["accuracy"] == 1.0
    assert result["final"]["per_source"]["toy"]["pairs"] == 16
    assert {"longer reply", "SFT log-prob (sum)", "SFT log-prob (per token)"} <= set(result["baselines"])
    assert sum(bucket["pairs"] for bucket in result["final"]["calibration"]) == 16
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "eval_accuracy" in r]
    assert [r["step"] for r in evaluations][:3] == [0, 15, 30] and "eval_toy_accuracy" in evaluations[-1]
    assert not any("eval_perplexity" in r for r in records)  # a pairwise loss is not a language model's
    assert (run / "loss.png").is_file()
    assert {"pair accuracy", "reward margin (chosen - rejected)"} <= dict(panel_series(records)).keys()
    assert any(line.startswith("| reward model ") for line in (run / "reward_eval.md").read_text().splitlines())
    # the toy replies are two labels: the trained model's mean score of each, before and after training
    labels = result["final"]["per_source"]["toy"]["per_label"]
    assert labels["好的"]["replies"] == labels["不好"]["replies"] == 16
    assert labels["好的"]["mean_score"] > labels["不好"]["mean_score"] and labels["好的"]["mean_as_rejected"] is None
    assert "per_label" in result["initial"]["per_source"]["toy"]
    assert "per_label" not in result["baselines"]["longer reply"]["per_source"]["toy"]  # the same figures as before
    assert "## Mean reward-model score per reply label" in (run / "reward_eval.md").read_text()
    assert_shipped_folder_is_pickle_free(run / "final")

    from tiny_llama2_zh.cli import main

    capsys.readouterr()
    argv = ["reward", "score", "--model", str(run / "final"), "--prompt", "评论：不错", "--response", "好的", "不好"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    good, bad = (float(line.split("\t")[0]) for line in lines)
    assert good > bad


def test_bad_pairs_are_dropped_counted_and_located(tiny_model_dir, tmp_path):
    path = tmp_path / "mixed" / "preference-train.jsonl"
    path.parent.mkdir()
    lines = [
        json.dumps({"prompt": "问题", "chosen": "对", "rejected": "错"}, ensure_ascii=False),
        json.dumps({"prompt": "问题", "chosen": "一样", "rejected": " 一样 "}, ensure_ascii=False),
        json.dumps({"prompt": "问题", "chosen": "", "rejected": "错"}, ensure_ascii=False),
        json.dumps({"prompt": 3, "chosen": "对", "rejected": "错"}),
        "{not json",
        json.dumps({"prompt": "问题", "chosen": "长" * 400, "rejected": "错"}, ensure_ascii=False),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows, report = load_preferences(str(path), load_tokenizer(tiny_model_dir), max_length=64)
    assert len(rows) == 1 and rows[0]["source"] == "mixed" and rows[0]["chosen"][0]["content"] == "对"
    assert report.skipped == {
        "chosen equals rejected": 1,
        "empty reply": 1,
        "prompt is neither a string nor a list of messages": 1,
        "malformed line (JSONDecodeError)": 1,
        "longer than max_length 64": 1,
    }
    assert report.examples[0] == f"{path}:2: chosen equals rejected"


def test_pair_report_counts_ties_as_half_and_splits_by_source():
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0, 0.5]), torch.tensor([0.0, 0.0, 3.0, 0.0])
    report = pair_report(chosen, rejected, ["a", "a", "b", "b"], calibrate=True)
    assert report["accuracy"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert report["per_source"]["a"]["accuracy"] == pytest.approx(0.75) and report["per_source"]["b"]["pairs"] == 2
    assert sum(b["pairs"] for b in report["calibration"]) == 4


def test_per_label_means_are_computed_over_every_pair_a_label_is_in():
    chosen, rejected = torch.tensor([2.0, 0.5, 1.0, 4.0, 3.0]), torch.tensor([1.0, 1.5, -1.0, 2.0, 1.0])
    replies = [("正面", "负面"), ("负面", "正面"), ("正面", "负面"), ("a b", "a  b"), ("c d", "c  d")]
    sources = ["sentiment", "sentiment", "sentiment", "segmentation", "segmentation"]
    report = pair_report(chosen, rejected, sources, replies=replies)
    labels = report["per_source"]["sentiment"]["per_label"]
    # 正面: chosen 2.0 and 1.0, rejected 1.5; 负面: chosen 0.5, rejected 1.0 and -1.0
    assert labels["正面"] == {
        "replies": 3, "mean_score": pytest.approx(4.5 / 3), "mean_as_chosen": 1.5, "mean_as_rejected": 1.5
    }  # fmt: skip
    assert labels["负面"] == {
        "replies": 3, "mean_score": pytest.approx(0.5 / 3), "mean_as_chosen": 0.5, "mean_as_rejected": 0.0
    }  # fmt: skip
    assert "per_label" not in report["per_source"]["segmentation"]  # every reply new: no labels
    assert "per_label" not in pair_report(chosen, rejected, sources)["per_source"]["sentiment"]  # no texts given
    table = per_label_table({"reward model": report})
    assert "| reward model | sentiment | 正面 " in table and "+1.500" in table and "segmentation" not in table
    assert per_label_table({"longer reply": pair_report(chosen, rejected, sources)}) is None


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs" / "reward").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_reward_configs_are_valid_and_say_how_to_run_them(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith(f"# tinyllm reward --config configs/reward/{path.name}")
    args = reward_arguments(load_config(RewardRecipeConfig, path))
    assert args.max_length > 0 and args.center_rewards_coefficient is not None


def test_the_three_seed_preference_formats_train_one_reward_model_reported_per_set(tiny_model_dir, tmp_path):
    """rlhf_reward_zh (parquet), zhihu_rlhf_3k (TSV) and CValues (JSONL with pos_resp/neg_resp), each prepared into
    its own folder as the size configs expect, train one reward model that is scored on each set's held-out pairs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tiny_llama2_zh.data.prepare import PrepareOptions, prepare

    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [(f"问题{i}：{REVIEWS[i % len(REVIEWS)]}", "好的", "不好") for i in range(60)]
    parquet = raw / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows]), parquet)
    tsv = raw / "zhihu_3k_rlfh.tsv"
    header = "prompt\tchosen\trejected\tquestion_id\tupvotes_chosen\tupvotes_rejected\n"
    tsv.write_text(header + "".join(f"{p}\t{c}\t{r}\t1\t9\t1\n" for p, c, r in rows), encoding="utf-8")
    jsonl = raw / "train.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"prompt": p, "pos_resp": c, "neg_resp": r}, ensure_ascii=False) + "\n" for p, c, r in rows),
        encoding="utf-8",
    )
    for name, path in (("rlhf_reward_zh", parquet), ("zhihu_rlhf_3k", tsv), ("cvalues", jsonl)):
        prepare(PrepareOptions(str(tmp_path / "preference" / name), [(name, [str(path)])], validation_per_mille=250))
    config = recipe(
        tiny_model_dir,
        tmp_path,
        f"data.train={tmp_path / 'preference' / '*' / 'preference-train.jsonl'}",
        f"data.validation={tmp_path / 'preference' / '*' / 'preference-test.jsonl'}",
    )
    result = reward(config)
    per_set = result["final"]["per_source"]
    assert set(per_set) == {"rlhf_reward_zh", "zhihu_rlhf_3k", "cvalues"}
    assert all(values["pairs"] > 0 and values["accuracy"] == 1.0 for values in per_set.values())
