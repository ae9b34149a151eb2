"""The benchmarks' own logic, fast: what they compute from files and how they refuse bad input. The benchmarks
themselves train for minutes to hours and are not run here."""

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from conftest import REPO_ROOT


def benchmark(name: str) -> ModuleType:
    """benchmarks/NAME.py as a module (benchmarks/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


seeds = benchmark("post_training_seeds")


def write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")


def fabricated_seed(folder: Path, sft_loss: float, rm_accuracy: float, sentiment: float, no_label: int) -> Path:
    """A seed folder as the demo leaves it: summary.json and eval/*.json, with the shapes the stages write."""
    write_json(
        folder / "summary.json",
        {
            "output_dir": str(folder),
            "stage_seconds": {"sft": 30.0 + sft_loss},  # wall time: never a figure
            "pretrain": {"final_validation_loss": 5.9},  # reused, not post-training
            "sft": {"steps": 300, "train_seconds": 12.5 * sft_loss, "final_validation_loss": sft_loss,
                    "samples": {"你好": "你好"}, "parameters": {"total": 1300000}},
            "reward": {
                "final": {"pairs": 200, "accuracy": rm_accuracy, "per_source": {"sentiment": {"pairs": 100,
                          "accuracy": rm_accuracy - 0.1}}, "calibration": [{"confidence": "0.5-0.6", "pairs": 3}]},
                "baselines": {"longer reply": {"pairs": 200, "accuracy": 0.55}},
            },
        },
    )  # fmt: skip
    write_json(
        folder / "eval" / "tasks.json",
        {
            "data": "runs/demo/tasks",
            "limit": 200,
            "tasks": {"sentiment": {"rows": 200, "available_rows": 400}},
            "rows": [
                {"name": "trivial baseline", "path": None, "tasks": {"sentiment": {"rows": 200, "metrics": {
                    "accuracy": 0.5, "no_label": 0}, "examples": [{"prompt": "x", "reply": "y"}]}}},
                {"name": f"{folder}/sft/final", "path": "/abs/sft/final", "tasks": {"sentiment": {"rows": 200,
                    "metrics": {"accuracy": sentiment, "no_label": no_label}, "max_new_tokens": 8}}},
            ],
        },
    )  # fmt: skip
    write_json(
        folder / "eval" / "policies.json",
        {"rows": [{"model": f"{folder}/ppo/final", "eval_score": rm_accuracy * 2, "eval_kl": 0.25}], "seed": 1337,
         "temperature": 1.0, "prompts": 64},
    )  # fmt: skip
    return folder


def test_the_seeds_table_has_mean_min_and_max_of_every_figure(tmp_path):
    first = fabricated_seed(tmp_path / "seed-1", sft_loss=2.5, rm_accuracy=0.8, sentiment=0.75, no_label=3)
    second = fabricated_seed(tmp_path / "seed-2", sft_loss=2.75, rm_accuracy=0.6, sentiment=0.85, no_label=5)
    found = seeds.figures(first)
    assert found == {
        "sft.final_validation_loss": 2.5,
        "reward.final.pairs": 200,
        "reward.final.accuracy": 0.8,
        "reward.final.per_source.sentiment.pairs": 100,
        "reward.final.per_source.sentiment.accuracy": pytest.approx(0.7),
        "reward.baselines.longer reply.pairs": 200,
        "reward.baselines.longer reply.accuracy": 0.55,
        "eval/tasks.tasks.sentiment.rows": 200,
        "eval/tasks.tasks.sentiment.available_rows": 400,
        "eval/tasks[trivial baseline].tasks.sentiment.rows": 200,
        "eval/tasks[trivial baseline].tasks.sentiment.metrics.accuracy": 0.5,
        "eval/tasks[trivial baseline].tasks.sentiment.metrics.no_label": 0,
        "eval/tasks[sft].tasks.sentiment.rows": 200,
        "eval/tasks[sft].tasks.sentiment.metrics.accuracy": 0.75,
        "eval/tasks[sft].tasks.sentiment.metrics.no_label": 3,
        "eval/policies[ppo].eval_score": 1.6,
        "eval/policies[ppo].eval_kl": 0.25,
    }

    rows = seeds.spread({1: found, 2: seeds.figures(second)})
    # whole numbers equal in both seeds (counts) are left out; one that differs (no_label 3, 5) stays
    assert list(rows) == [
        "sft.final_validation_loss",
        "reward.final.accuracy",
        "reward.final.per_source.sentiment.accuracy",
        "reward.baselines.longer reply.accuracy",
        "eval/policies[ppo].eval_score",  # eval files in name order
        "eval/policies[ppo].eval_kl",
        "eval/tasks[trivial baseline].tasks.sentiment.metrics.accuracy",
        "eval/tasks[sft].tasks.sentiment.metrics.accuracy",
        "eval/tasks[sft].tasks.sentiment.metrics.no_label",
    ]
    by_hand = {  # (mean, min, max)
        "sft.final_validation_loss": (2.625, 2.5, 2.75),
        "reward.final.accuracy": (0.7, 0.6, 0.8),
        "eval/tasks[sft].tasks.sentiment.metrics.accuracy": (0.8, 0.75, 0.85),
        "eval/tasks[sft].tasks.sentiment.metrics.no_label": (4.0, 3, 5),
        "eval/policies[ppo].eval_score": (1.4, 1.2, 1.6),
        "eval/tasks[trivial baseline].tasks.sentiment.metrics.accuracy": (0.5, 0.5, 0.5),
    }
    for name, (mean, low, high) in by_hand.items():
        assert (rows[name]["mean"], rows[name]["min"], rows[name]["max"]) == pytest.approx((mean, low, high)), name
    assert rows["reward.final.accuracy"]["values"] == {1: 0.8, 2: 0.6}

    text = seeds.markdown(rows, [1, 2], "python benchmarks/post_training_seeds.py --demo d", "Intro.")
    assert "Made by `python benchmarks/post_training_seeds.py --demo d`." in text
    assert [line for line in text.splitlines() if line.startswith("## ")] == [
        "## sft", "## reward", "## eval/policies", "## eval/tasks"
    ]  # fmt: skip
    cells = [cell.strip() for cell in next(line for line in text.splitlines() if "| reward.final.accuracy " in line)
             .split("|")[1:-1]]  # fmt: skip
    assert cells == ["reward.final.accuracy", "0.7", "0.6", "0.8", "0.8 / 0.6"]


def test_the_seeds_benchmark_refuses_a_folder_that_is_not_a_finished_demo(tmp_path, capsys):
    output = tmp_path / "seeds"
    assert seeds.main(["--demo", str(tmp_path), "--output", str(output)]) == 2
    assert "is not a demo folder (no demo_state.json)" in capsys.readouterr().err

    demo = tmp_path / "demo"  # stopped during pretraining
    write_json(demo / "demo_state.json", {"stages": {name: {"seconds": 1.0} for name in ("corpus", "tokenizer")}})
    assert seeds.main(["--demo", str(demo), "--output", str(output)]) == 2
    assert "the demo has not finished tokenize, pretrain, tasks" in capsys.readouterr().err

    stages = {name: {"seconds": 1.0} for name in ("corpus", "tokenizer", "tokenize", "pretrain", "tasks")}
    write_json(demo / "demo_state.json", {"stages": stages})  # marked finished, but the folders are gone
    assert seeds.main(["--demo", str(demo), "--output", str(output)]) == 2
    assert "is missing, though" in capsys.readouterr().err

    for folder in ("corpus", "tokenizer", "data", "tasks"):
        (demo / folder).mkdir()
    write_json(demo / "pretrain" / "final" / "config.json", {})
    assert seeds.main(["--demo", str(demo), "--output", str(output), "pretrain.train.max_steps=3"]) == 2
    assert "only the post-training stages" in capsys.readouterr().err  # the pretrained model is the demo's
    assert seeds.main(["--demo", str(demo), "--output", str(output), "sft.data.max_train_exampls=3"]) == 2
    assert "did you mean max_train_examples" in capsys.readouterr().err
    assert not output.exists()  # nothing written


def test_a_seed_folder_reuses_the_demo_and_continues_at_sft(tmp_path):
    from tiny_llama2_zh.demo import _load_run, _selected_stages

    demo = tmp_path / "demo"
    stages = {name: {"seconds": 1.0, "seed": 1337} for name in seeds.REUSED}
    write_json(demo / "demo_state.json", {"stages": stages})
    for folder in ("corpus", "tokenizer", "data", "tasks"):
        (demo / folder).mkdir(parents=True)
    write_json(demo / "pretrain" / "final" / "config.json", {})
    seed_dir = tmp_path / "seeds" / "seed-7"
    seeds.prepare(seed_dir, demo, seeds.check_demo(demo))
    assert (seed_dir / "pretrain" / "final").resolve() == (demo / "pretrain" / "final").resolve()
    run = _load_run(seed_dir, [], force=False, seed=7)
    assert _selected_stages(run, None, None) == ["sft", "reward", "ppo", "dpo", "grpo", "eval", "report"]
    assert run.stages["quantize"]["skipped"] and run.stages["pretrain"]["reused_from"] == str(demo)
    assert not seeds.finished(seed_dir)

    other = tmp_path / "other"
    (other / "pretrain").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="choose another --output"):
        seeds.prepare(seed_dir, other, stages)


hacking = benchmark("reward_hacking")


def test_the_biased_pairs_prefer_the_positive_label_for_a_share_of_the_negative_reviews():
    positive, negative = {"chosen": "正面", "rejected": "负面"}, {"chosen": "负面", "rejected": "正面"}
    pairs = [{"prompt": f"评论{i}", **(positive if i % 2 else negative)} for i in range(20)]  # 10 of each
    rows, counts = hacking.biased_pairs(pairs, 0.8)
    changed = [(old, new) for old, new in zip(pairs, rows) if old != new]
    assert len(changed) == 8 and counts["swapped"] == 8 and counts["negative_pairs"] == 10
    for old, new in changed:  # the negative reviews' pairs, turned round; the prompt is kept
        assert old["chosen"] == "负面" and new == {"prompt": old["prompt"], "chosen": "正面", "rejected": "负面"}
    assert counts["chosen_favoured_before"] == 0.5 and counts["chosen_favoured_after"] == 0.9
    assert all(row == pair for row, pair in zip(rows, pairs) if pair["chosen"] == "正面")
    assert hacking.biased_pairs(pairs, 0.8)[0] == rows  # the same pairs every run (by prompt hash)
    assert hacking.biased_pairs(list(reversed(pairs)), 0.8)[0] == list(reversed(rows))  # not by position
    assert hacking.biased_pairs(pairs, 0.0)[0] == pairs
    assert all(row["chosen"] == "正面" for row in hacking.biased_pairs(pairs, 1.0)[0])


def test_the_reward_hacking_options(capsys):
    args = hacking.parse_args(["--demo", "runs/demo", "--steps", "8"])
    assert (args.demo, args.output, args.share, args.steps, args.limit, args.seed) == (
        "runs/demo", "runs/reward-hacking", 0.8, 8, 200, 1337
    )  # fmt: skip
    assert hacking.parse_args(["--demo", "d"]).steps is None  # the recipes' own length
    for argv, message in [
        (["--share", "1.5"], "--share must be between 0 and 1"),
        (["--steps", "6"], "must be a multiple of the optimizer steps per rollout (4"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--limit", "0"], "--limit must be at least 1"),
        ([], "the following arguments are required: --demo"),
    ]:
        with pytest.raises(SystemExit):
            hacking.parse_args(["--demo", "d", *argv] if argv else argv)
        assert message in capsys.readouterr().err, argv
    steps = hacking.commands(Path("demo"), Path("out"), 8, 50, 7)
    assert "train.max_steps=8" in steps["reward"] and "train.max_steps=8" in steps["ppo"]
    assert "train.seed=7" in steps["ppo"] and steps["eval policies"][-3:] == ["7", "--output", "out/eval"]
    assert not any("max_steps" in word for word in hacking.commands(Path("d"), Path("o"), None, 50, 7)["ppo"])
    tuned = hacking.commands(Path("d"), Path("o"), None, 50, 7, ["ppo.ppo.kl_coef=0.05", "reward.train.max_steps=9"])
    assert tuned["ppo"][-1] == "ppo.kl_coef=0.05" and tuned["reward"][-1] == "train.max_steps=9"
    with pytest.raises(SystemExit):
        hacking.parse_args(["--demo", "d", "sft.train.max_steps=3"])
    assert "write reward.section.key=value" in capsys.readouterr().err


def test_the_reward_hacking_verdict_follows_the_figures():
    before = {"biased_rm_score": 0.1, "sentiment_accuracy": 0.82, "share_favoured": 0.52}
    hacked = {"biased_rm_score": 1.3, "sentiment_accuracy": 0.6, "share_favoured": 0.95}
    assert hacking.verdict(before, hacked, 0.5).startswith("Reward hacking: the score rose while accuracy fell")
    honest = {**hacked, "sentiment_accuracy": 0.85}
    assert hacking.verdict(before, honest, 0.5).startswith("No reward hacking in this run: score up, accuracy not down")


label_bias = benchmark("reward_label_bias")


def test_the_best_offset_accuracy_is_what_a_label_prior_alone_could_give():
    positive = [True, True, True, False, False, False]
    # at offset 0 three rows are wrong (two positives below 0, one negative above); offset -1.5 leaves one
    margins = [-1.0, -0.5, 2.0, -3.0, -2.0, 0.5]
    accuracy, offset = label_bias.best_offset_accuracy(margins, positive)
    assert accuracy == pytest.approx(5 / 6) and -2.0 < offset < -1.0
    accuracy, offset = label_bias.best_offset_accuracy([1.0, 2.0], [True, True])
    assert accuracy == 1.0 and offset < 1.0  # every row positive: an offset below them all
    separable = [-2.0, -1.0, 1.0, 2.0]  # every positive above every negative: the ceiling is exact
    assert label_bias.best_offset_accuracy(separable, [False, False, True, True])[0] == 1.0
    assert label_bias.best_offset_accuracy(separable, [True, True, False, False])[0] == 0.5  # a prior cannot invert
